"""Mixed precision is honoured: one rule for ``train.mixed_precision`` against ``accelerate launch`` /
``accelerate config`` (the config's when set, else the launcher's, else no; both and different: an error),
and a bf16 run on the CPU really runs in bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.distill.core import LAUNCH_PRECISION, CoreConfig, LossMethod, OptimizerConfig, fit, resolve_precision


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state and refuses another precision in the same process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("configured,launched,expected", [
    (None, None, "no"), (None, "", "no"), (None, "bf16", "bf16"), ("bf16", None, "bf16"), ("no", "no", "no"),
    ("bf16", "bf16", "bf16"), ("no", None, "no")])
def test_the_config_wins_only_when_set_and_the_launcher_is_heard(configured, launched, expected):
    assert resolve_precision(configured, launched) == expected


@pytest.mark.parametrize("configured,launched", [("no", "bf16"), ("bf16", "fp16"), ("fp16", "no")])
def test_a_conflict_is_an_error_naming_both(configured, launched):
    with pytest.raises(ValueError, match=f"train.mixed_precision={configured} but accelerate launch/config set "
                                         f"{launched}"):
        resolve_precision(configured, launched)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 16))
        self.seen: set[torch.dtype] = set()

    def forward(self, x):
        h = self.net[0](x)
        self.seen.add(h.dtype)  # the dtype autocast computed the matmul in
        return self.net[2](self.net[1](h))


def _run(tmp_path, name, precision, monkeypatch, launched=None):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if launched is None:
        monkeypatch.delenv(LAUNCH_PRECISION, raising=False)
    else:
        monkeypatch.setenv(LAUNCH_PRECISION, launched)
    torch.manual_seed(0)
    model = _Regression()
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    method = LossMethod(model, lambda m, x, g: (m(x) - x.flip(1)).pow(2).mean(), OptimizerConfig(lr=1e-2))
    config = CoreConfig(output_dir=str(tmp_path / name), steps=4, batch_size=16, cpu=True, progress=False,
                        mixed_precision=precision)
    result = fit(method, config, data, log=lambda *_: None)
    return result.state.accelerator.mixed_precision, model  # read now: the state is process-wide


def test_bf16_from_accelerate_launch_is_honoured_on_the_cpu(tmp_path, monkeypatch, fresh_accelerate):
    fp32, m32 = _run(tmp_path, "fp32", None, monkeypatch)
    launched, mbf = _run(tmp_path, "launched", None, monkeypatch, launched="bf16")
    configured, mcf = _run(tmp_path, "configured", "bf16", monkeypatch)
    assert fp32 == "no" and m32.seen == {torch.float32}
    assert launched == "bf16" and mbf.seen == {torch.bfloat16}
    assert configured == "bf16" and mcf.seen == {torch.bfloat16}
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (m32, mbf))
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # trained, and not silently in fp32
    for x, y in zip(mbf.parameters(), mcf.parameters()):  # the same precision however it was chosen
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    saved = torch.load(sorted((tmp_path / "launched").glob("checkpoint-*.pt"))[-1], weights_only=True)
    assert saved["recipe"]["train"]["mixed_precision"] == "bf16"


def test_resuming_in_another_precision_is_refused(tmp_path, monkeypatch, fresh_accelerate):
    from fewstep.distill.core import Refused

    _run(tmp_path, "run", None, monkeypatch)
    with pytest.raises(Refused, match="train.mixed_precision: 'no' -> 'bf16'"):
        _run(tmp_path, "run", "bf16", monkeypatch)
