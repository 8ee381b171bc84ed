"""Train a teacher: a diffusers ``UNet2DModel`` on a standard DDPM noise schedule, with the training core.

    fewstep train-teacher --config configs/teacher_fmnist.yaml [train.lr=1e-4 ...]

The config (``fewstep.config.TeacherConfig``) has sections ``train`` (``TrainConfig``), ``model``
(``UNet2DModel`` keyword arguments), ``scheduler`` (``DDPMScheduler`` keyword arguments) and ``data``
(``load_images`` arguments); ``fewstep train-teacher --help`` lists every key. ``TeacherMethod`` is one
network with EMA on ``eps_loss``, run by ``fewstep.distill.core.fit`` (checkpoints
``train.output_dir/checkpoint-<step>.pt``; rerunning the command resumes). The result is saved, atomically,
as a diffusers ``DDPMPipeline`` (safetensors) in ``train.output_dir/pipeline``, so
``DDPMPipeline.from_pretrained(path)`` loads it offline and any fewstep sampler swaps in.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fewstep.config import TeacherConfig, from_dict, given
from fewstep.data import load_images
from fewstep.io import atomic_dir, atomic_write_bytes

from .core import LossMethod, OptimizerConfig, fit, from_train_config

__all__ = ["eps_loss", "TeacherMethod", "build_teacher", "train_teacher", "cli"]


def eps_loss(alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
    """DDPM's simple loss (Ho et al. 2020, eq. 14): ``|eps - eps_theta(sqrt(a) x0 + sqrt(1 - a) eps, t)|^2``
    at ``t ~ U{0..T-1}``; ``v_prediction`` regresses ``v = sqrt(a) eps - sqrt(1 - a) x0`` instead."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"teacher prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    ac = alphas_cumprod.float()

    def loss(model: nn.Module, x0: Tensor, g: torch.Generator) -> Tensor:
        t = torch.randint(0, len(ac), (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        a = ac[t].sqrt().view(-1, 1, 1, 1).to(x0.device)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1).to(x0.device)
        target = eps if prediction_type == "epsilon" else a * eps - s * x0
        out = model(a * x0 + s * eps, t.to(x0.device)).sample
        return (out.float() - target).pow(2).mean()

    return loss


class TeacherMethod(LossMethod):
    """A teacher: one trainable UNet (with EMA) on DDPM's ``eps_loss`` under ``scheduler``'s schedule."""

    name = "teacher"

    def __init__(self, unet: nn.Module, scheduler, optim: OptimizerConfig, settings: dict | None = None):
        from fewstep.samplers.schedules import DiscreteVPSchedule

        schedule = DiscreteVPSchedule.from_diffusers_config(scheduler.config)
        super().__init__(unet, eps_loss(schedule.alphas_cumprod, scheduler.config.prediction_type), optim, settings)


def _typed(config: TeacherConfig | dict) -> TeacherConfig:
    return config if isinstance(config, TeacherConfig) else from_dict(TeacherConfig, config)


def build_teacher(config: TeacherConfig | dict):
    """``(unet, scheduler)`` from a config's ``model`` and ``scheduler`` sections."""
    from diffusers import DDPMScheduler, UNet2DModel

    config = _typed(config)
    return UNet2DModel(**given(config.model)), DDPMScheduler(**given(config.scheduler))


def _images(config, unet) -> TensorDataset:
    data = load_images(**given(config.data))
    if data.shape[1:] != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise ValueError(f"data of shape {tuple(data.shape[1:])} does not fit the model's "
                         f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} input")
    return TensorDataset(data)


def _write_json(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def train_teacher(config: TeacherConfig | dict, max_steps: int | None = None, output_dir: str | None = None) -> Path:
    """Train (resuming from the newest checkpoint) and export the EMA teacher; returns the pipeline folder."""
    from diffusers import DDPMPipeline

    config = _typed(config)
    tc = config.train if output_dir is None else replace(config.train, output_dir=output_dir)
    core, optim = from_train_config(tc)
    torch.manual_seed(tc.seed)  # the initial weights are part of the run
    unet, scheduler = build_teacher(config)
    # The recipe holds the keys that are set (not diffusers' defaults), as before the config system.
    method = TeacherMethod(unet, scheduler, optim, {k: given(getattr(config, k)) for k in ("model", "scheduler", "data")})
    start = time.perf_counter()
    # fit loads the data only once the output folder is known to be writable and free
    result = fit(method, core, lambda: _images(config, unet), max_steps=max_steps)
    out, path = Path(tc.output_dir), Path(tc.output_dir) / "pipeline"
    if result.state.accelerator.is_main_process:
        ema = result.state.ema("model")
        with atomic_dir(path) as tmp:
            DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(tmp)
        _write_json(out / "history.json", result.history)
        _write_json(out / "train_info.json", {
            "steps": result.state.step, "seconds_this_run": time.perf_counter() - start, "seed": tc.seed,
            "parameters": sum(p.numel() for p in ema.parameters()), "examples": result.examples})
    return path


def cli(config: TeacherConfig, max_steps: int | None = None, output_dir: str | None = None) -> int:
    """``fewstep train-teacher``: the config comes from ``fewstep.config.load``."""
    print(train_teacher(config, max_steps, output_dir))
    return 0
