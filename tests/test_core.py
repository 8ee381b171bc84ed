"""The training core: exact resume (accumulation, dropout, rounds, SIGKILL), refusals said out loud, locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fewstep.distill.core import (CoreConfig, Interrupted, Method, Network, OptimizerConfig, RunLock,
                                  StepBatchSampler, checkpoint_paths, fit)


class ToyMethod(Method):
    """Regress y = sin(3x) with a dropout MLP; a frozen 'teacher' copied from the student each round
    (so rounds matter), and a second trainable head updated every other step (two optimizers)."""

    name = "toy"

    def __init__(self, rounds=(3, 3), dropout=0.1, seed=0):
        self.rounds, self.dropout = list(rounds), dropout
        torch.manual_seed(seed)
        self.student = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Dropout(dropout), nn.Linear(32, 1))
        self.head = nn.Linear(1, 1)
        self.teacher = nn.Linear(1, 1)

    def networks(self):
        return {"student": Network(self.student, OptimizerConfig(lr=1e-2, anneal="linear", ema_decay=0.9)),
                "head": Network(self.head, OptimizerConfig(lr=1e-2)),
                "teacher": Network(self.teacher)}

    def round_steps(self, steps):
        assert steps == sum(self.rounds)
        return self.rounds

    def begin_round(self, k, state):
        state.unwrapped("teacher").weight.data.fill_(float(k + 1))

    def train_step(self, ctx, batch):
        x = batch
        noise = torch.randn(x.shape, generator=ctx.generator)
        target = torch.sin(3 * x) + 0.01 * noise + 0.0 * ctx.net("teacher")(x)
        loss = (ctx.net("student")(x) - target).square().mean()
        out = {"loss": ctx.update("student", loss)}
        if ctx.step % 2 == 0:
            head_loss = (ctx.net("head")(x) - ctx.net("teacher")(x)).square().mean()
            out["head"] = ctx.update("head", head_loss)
        return out


def _data(n=40):
    return TensorDataset(torch.linspace(-1, 1, n)[:, None])


def _run(tmp, steps_total=6, max_steps=None, rounds=(3, 3), accumulation=2, data=None, **kw):
    method = ToyMethod(rounds)
    config = CoreConfig(output_dir=str(tmp), steps=steps_total, batch_size=8, accumulation=accumulation,
                        checkpoint_every=1, log_every=1, progress=False, cpu=True, **kw)
    result = fit(method, config, data if data is not None else _data(), max_steps=max_steps, log=lambda *_: None)
    return result


def _weights(result):
    return {f"{name}.{k}": v.clone() for name in ("student", "head", "teacher")
            for k, v in result.state.unwrapped(name).state_dict().items()} | {
        f"ema.{k}": v.clone() for k, v in result.state.ema("student").state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_steps_count_optimizer_steps_with_accumulation(tmp_path):
    result = _run(tmp_path, steps_total=6, accumulation=2)
    assert result.state.step == 6
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    # Adam's own step counter: one per optimizer step, not per micro-batch.
    opt = result.state.optimizers["student"]
    assert int(next(iter(opt.state.values()))["step"]) == 3  # fresh optimizer in round 1 (steps 4-6)


@pytest.mark.parametrize("stop_after", [2, 3, 4])  # mid-round, at the round boundary, in the second round
def test_an_interrupted_run_resumed_equals_the_uninterrupted_one(tmp_path, stop_after):
    whole = _weights(_run(tmp_path / "whole"))
    _run(tmp_path / "split", max_steps=stop_after)
    resumed = _run(tmp_path / "split")
    assert resumed.resumed_from == stop_after
    _assert_same(whole, _weights(resumed))


def test_checkpoints_are_rotated(tmp_path):
    _run(tmp_path, keep_checkpoints=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["checkpoint-00000005.pt", "checkpoint-00000006.pt"]


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    whole = _weights(_run(tmp_path / "whole"))
    _run(tmp_path / "split", max_steps=4)
    newest = checkpoint_paths(tmp_path / "split")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    resumed = _run(tmp_path / "split")
    assert resumed.resumed_from == 3
    _assert_same(whole, _weights(resumed))


def test_a_checkpoint_past_the_configured_steps_is_refused(tmp_path):
    _run(tmp_path, steps_total=6)
    with pytest.raises(ValueError, match="past the configured steps 5"):
        _run(tmp_path, steps_total=5, rounds=(3, 2))


def test_resuming_with_changed_data_or_settings_is_refused(tmp_path):
    _run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="data.examples: 40 -> 30"):
        _run(tmp_path, data=_data(30))
    with pytest.raises(ValueError, match="train.seed: 0 -> 1"):
        _run(tmp_path, seed=1)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RuntimeError, match="in use by another run"):
            _run(tmp_path)


def test_a_read_only_output_folder_fails_before_any_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot write to the output folder"):
            _run(tmp_path / "out")
    finally:
        tmp_path.chmod(0o700)


def test_the_step_batches_cover_each_epoch_once():
    sampler = StepBatchSampler(10, 4, 2, seed=0, start=0, stop=5)  # 5 steps x 4 = 2 epochs of 10
    seen = [i for micro in sampler for i in micro]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    resumed = StepBatchSampler(10, 4, 2, seed=0, start=3, stop=5)
    assert [i for m in resumed for i in m] == seen[12:]


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_core import ToyMethod, _data
    from fewstep.distill.core import CoreConfig, fit

    class Slow(ToyMethod):
        def train_step(self, ctx, batch):
            time.sleep({sleep})
            return super().train_step(ctx, batch)

    config = CoreConfig(output_dir={out!r}, steps=12, batch_size=8, accumulation=2, checkpoint_every=1,
                        log_every=1, progress=False, cpu=True)
    fit(Slow(rounds=(6, 6)), config, _data(), log=lambda *_: None)
""")


def _script(tmp_path, out, sleep):
    path = tmp_path / f"run_{sleep}.py"
    path.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), sleep=sleep))
    return path


def test_a_run_killed_with_sigkill_mid_round_resumes_bitwise(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path, out, 0.15))])
    deadline = time.time() + 60
    while time.time() < deadline and len(checkpoint_paths(out)) < 2:  # killed in round 0 (steps 1-6)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint_paths(out)[-1].stem.split("-")[1])
    assert 1 <= killed_at < 12
    subprocess.run([sys.executable, str(_script(tmp_path, out, 0.0))], check=True)
    subprocess.run([sys.executable, str(_script(tmp_path, tmp_path / "whole", 0.0))], check=True)
    a = torch.load(checkpoint_paths(out)[-1], weights_only=False)["state"]
    b = torch.load(checkpoint_paths(tmp_path / "whole")[-1], weights_only=False)["state"]
    for name in ("student", "head", "teacher"):
        for k, v in b["networks"][name].items():
            assert torch.equal(a["networks"][name][k], v), (name, k)
    assert a["counters"] == b["counters"] == {"step": 12, "round": 1, "step_in_round": 6}


def test_sigterm_saves_and_says_where_it_resumes(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path, out, 0.2))], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not checkpoint_paths(out):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "run the same command again to resume" in err
    saved = checkpoint_paths(out)[-1]
    assert f"saved step {int(saved.stem.split('-')[1])}" in err


def test_interrupted_is_raised_after_saving(tmp_path, monkeypatch):
    class Stopper(ToyMethod):
        def train_step(self, ctx, batch):
            if ctx.step == 2 and ctx.micro == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(ctx, batch)

    config = CoreConfig(output_dir=str(tmp_path), steps=6, batch_size=8, accumulation=2, checkpoint_every=5,
                        log_every=1, progress=False, cpu=True)
    with pytest.raises(Interrupted) as info:
        fit(Stopper(), config, _data(), log=lambda *_: None)
    assert info.value.step == 3 and checkpoint_paths(tmp_path)[-1].name == "checkpoint-00000003.pt"
