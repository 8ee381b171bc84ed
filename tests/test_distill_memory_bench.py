"""The memory benchmark's analytic part (benchmarks/distill_memory.py): parameter and byte counts of what
each method holds, the LoRA count against peft's, the fit and the extrapolation table; no training runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distill_memory as dm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return dm.tiny_unet_config(8, latent=8)


def test_the_meta_count_of_a_unet_equals_the_real_networks_parameters_and_peft_s_lora_factors(tiny):
    from diffusers import UNet2DConditionModel

    from fewstep.distill.families import UNET_LORA_TARGETS
    from fewstep.distill.lora import LoRA, inject, trainable_parameters

    counts = dm.unet_counts(tiny, lora_rank=4)
    torch.manual_seed(0)
    net = UNet2DConditionModel(**tiny)
    assert counts["params"] == sum(p.numel() for p in net.parameters())
    inject(net, LoRA(rank=4, targets=UNET_LORA_TARGETS))
    assert counts["lora_params"] == trainable_parameters(net)
    assert counts["activations"] > 0


def test_held_bytes_follow_the_methods_networks():
    P, L = 1000, 100
    pd = dm.held_model(dm.Setting("progressive"), P, L)
    # teacher, student, EMA and previous, all float32; AdamW two float32 states of the student
    assert pd["weights"] == 4 * P * 4 and pd["adamw"] == 8 * P and pd["grads"] == 4 * P
    sim = dm.held_model(dm.Setting("sim", lora=16, frozen_dtype="bfloat16"), P, L)
    # bf16 teacher; generator, fake and EMA keep float32 base weights plus their LoRA; two LoRA optimizers
    assert sim["networks"] == {"teacher": 2 * P, "student": 4 * (P + L), "fake": 4 * (P + L), "ema": 4 * (P + L)}
    assert sim["adamw"] == 2 * 8 * L and sim["grads"] == 4 * L
    noema = dm.held_model(dm.Setting("consistency", ema=False), P, L)
    assert set(noema["networks"]) == {"teacher", "student"}
    assert dm.host_model(dm.Setting("consistency"), P, {"vae": 10}) == 4 * (P + 10)


def test_the_fit_recovers_a_planted_activation_factor_and_the_table_marks_what_fits():
    points = [(p, 4 * a * b, 5e6 + 0.5 * p + 2.5 * 4 * a * b) for p, a in ((1e5, 1e6), (4e5, 2e6)) for b in (2, 8)]
    f = dm.fit(points)
    assert f["beta"] == pytest.approx(2.5) and f["rho"] == pytest.approx(0.5) and f["gamma"] == pytest.approx(5e6)
    reference = {"toy": {"params": 10**9, "lora_params": 10**7, "activations": 10**8}}
    rows = dm.table({dm.Setting("sim").key: f, dm.Setting("sim", lora=16).key: f}, reference)
    full, lora = rows
    assert full["gb"][0] < full["gb"][1] < full["gb"][2] and lora["fixed_gb"] < full["fixed_gb"]
    # full sim on a 1B UNet: 4 float32 networks (16 GB) + AdamW x2 (16 GB) + grads (4 GB) + 1 GiB slack
    assert full["fixed_gb"] == pytest.approx(36 + dm.GPU_SLACK / 1e9)
    assert dm.fits_in(20) == "24" and dm.fits_in(50) == "80" and dm.fits_in(90) == "no"
    assert dm._setting(dm.Setting("fdistill", 16, "bfloat16", True).key) == dm.Setting("fdistill", 16, "bfloat16", True)
