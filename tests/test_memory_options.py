"""Memory settings of the training core: a frozen teacher held in bfloat16 (inputs cast to it, outputs back)
and gradient checkpointing of the trainable networks, which must not change what is trained."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.distill.core import checkpoint_paths
from fewstep.distill.run import distill

from test_distill import _config, tiny_teacher  # noqa: F401  (the fixture)

MCM = {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 16, "anneal_updates": 4}


def _student(path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(path / "unet").state_dict()


def _losses(out):
    return [h["loss"] for h in json.loads((out / "history.json").read_text())]


def test_a_bfloat16_teacher_trains_nearly_the_fp32_student(tiny_teacher, idx_folder, tmp_path):
    (full,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "fp32", method="consistency", consistency=MCM,
                              train={"steps": 3}))
    (half,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "bf16", method="consistency", consistency=MCM,
                              train={"steps": 3, "frozen_dtype": "bfloat16"}))
    saved = torch.load(checkpoint_paths(tmp_path / "bf16")[-1], weights_only=True)["state"]["networks"]
    assert "teacher" not in saved  # rebuilt from the teacher folder on resume (its identity is in the recipe)
    assert {v.dtype for v in saved["student"].values() if v.is_floating_point()} == {torch.float32}
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert a != b and all(abs(x - y) <= 0.05 * abs(x) for x, y in zip(a, b)), (a, b)  # bf16 targets: ~0.4 % each
    sa, sb = _student(full), _student(half)
    assert all(torch.isfinite(sb[k]).all() for k in sb)
    with pytest.raises(ValueError, match="frozen_dtype must be one of float32, bfloat16, float16"):
        distill(_config(tiny_teacher, idx_folder, tmp_path / "bad", train={"frozen_dtype": "int8"}))


@pytest.mark.parametrize("method,options", [("consistency", {"consistency": MCM}), ("sim", {})])
def test_gradient_checkpointing_trains_the_same_student(tiny_teacher, idx_folder, tmp_path, monkeypatch, method,
                                                        options):
    from diffusers import UNet2DModel

    calls = []
    real = UNet2DModel.enable_gradient_checkpointing
    monkeypatch.setattr(UNet2DModel, "enable_gradient_checkpointing", lambda self: (calls.append(1), real(self)))
    (plain,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "plain", method=method, **options,
                               train={"steps": 3}))
    assert not calls
    # sim: the generator's loss back-propagates through the checkpointed fake score (frozen weights)
    (ckpt,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "ckpt", method=method, **options,
                              train={"steps": 3, "gradient_checkpointing": True}))
    assert calls  # the student was checkpointed
    sa, sb = _student(plain), _student(ckpt)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-6
