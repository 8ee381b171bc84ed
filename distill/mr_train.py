"""Train a small mean-reverting (MR) restoration model on the training core, and restore with MRS.

    fewstep train-mr --config configs/mr_fmnist.yaml [train.steps=8000 ...]

The task: Gaussian denoising (``mu`` = clean image + ``noise_std`` noise in [-1, 1]). The network is a
``UNet2DModel`` that sees ``[x_t, mu]`` (two channels) and predicts, for
``x_t = mu + alpha_t (x0 - mu) + sigma_t eps`` on ``MRSchedule``'s discrete times 1..T, either the noise
``eps`` (``mr.target: noise``, IR-SDE's ``fit_target="noise"``) or the clean image ``x0``
(``mr.target: data``, the example's choice). Why data: near ``t = T`` the MR signal ``alpha_t`` is
``~eps = 0.005``, so ``x0 = mu + (x_t - mu - sigma_t eps_hat) / alpha_t`` multiplies a noise model's error
by ``sigma_t / alpha_t ~ 40``; a data model has no such factor, which is what MRS's data-prediction
solvers need at 10-20 NFE. ``MRMethod`` is one network with EMA on ``mr_loss``, run by
``fewstep.distill.core.fit`` (checkpoints ``output_dir/checkpoint-<step>.pt``; rerunning the command
resumes). The EMA model is exported, atomically, as ``output_dir/model``: ``unet/`` (diffusers format) plus
``mr.json``, the layout ``load_mr_model`` reads (as ``teachers/mr_fmnist/``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fewstep.config import MRTrainConfig, from_dict, given
from fewstep.data import load_images
from fewstep.io import atomic_dir, atomic_write_bytes
from fewstep.samplers.mr import MRDenoiser, MRSchedule

from .core import LossMethod, OptimizerConfig, fit, from_train_config

__all__ = ["MR_TARGETS", "degrade", "mr_loss", "MRMethod", "unet_mr_model", "load_mr_model", "train_mr", "cli"]


def degrade(x0: Tensor, noise_std: float, g: torch.Generator) -> Tensor:
    """The low-quality observation ``mu``: additive Gaussian noise."""
    return x0 + noise_std * torch.randn(x0.shape, generator=g).to(x0.device)


def unet_mr_model(unet: nn.Module):
    """``model(x, t, mu=...)`` for ``MRDenoiser`` over a two-channel UNet."""

    def model(x: Tensor, t: Tensor, mu: Tensor) -> Tensor:
        return unet(torch.cat([x, mu], dim=1), t).sample

    return model


MR_TARGETS = ("noise", "data")


def mr_loss(schedule: MRSchedule, noise_std: float, target: str = "noise"):
    """Mean squared error of the network's ``eps`` (``target="noise"``) or ``x0`` (``"data"``) at uniform
    discrete times 1..T."""
    if target not in MR_TARGETS:
        raise ValueError(f"unknown MR training target {target!r}; expected one of {list(MR_TARGETS)}")

    def loss(unet: nn.Module, x0: Tensor, g: torch.Generator) -> Tensor:
        mu = degrade(x0, noise_std, g)
        t = torch.randint(1, int(schedule.t_max) + 1, (x0.shape[0],), generator=g).to(torch.float64)
        a = schedule.alpha(t).float().view(-1, 1, 1, 1).to(x0.device)
        s = schedule.sigma(t).float().view(-1, 1, 1, 1).to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = mu + a * (x0 - mu) + s * eps
        out = unet(torch.cat([x_t, mu], dim=1), t.float().to(x0.device)).sample
        return (out - (eps if target == "noise" else x0)).pow(2).mean()

    return loss


class MRMethod(LossMethod):
    """An MR restoration model: one trainable two-channel UNet (with EMA) on ``mr_loss``."""

    name = "mr"

    def __init__(self, unet: nn.Module, schedule: MRSchedule, noise_std: float, target: str, optim: OptimizerConfig,
                 settings: dict | None = None):
        super().__init__(unet, mr_loss(schedule, noise_std, target), optim, settings)


def load_mr_model(path: str | Path) -> tuple[MRDenoiser, dict]:
    """``(MRDenoiser, info)`` from a folder written by ``train_mr``."""
    from diffusers import UNet2DModel

    path = Path(path)
    info = json.loads((path / "mr.json").read_text())
    unet = UNet2DModel.from_pretrained(path / "unet").eval()
    schedule = MRSchedule(sigma_inf=info["sigma_inf"], T=info["T"])
    # Images live in [-1, 1]; clamping the data prediction keeps every solver's x0 there.
    return MRDenoiser(unet_mr_model(unet), schedule, info.get("target", "noise"), clip=(-1.0, 1.0)), info


def train_mr(config: MRTrainConfig | dict, max_steps: int | None = None) -> Path:
    """Train (resuming from the newest checkpoint) and export ``output_dir/model`` (``unet/`` and
    ``mr.json``); returns that folder."""
    from diffusers import UNet2DModel

    config = config if isinstance(config, MRTrainConfig) else from_dict(MRTrainConfig, config)
    tc, mr = config.train, config.mr
    core, optim = from_train_config(tc)
    schedule = MRSchedule(sigma_inf=mr.sigma_inf, T=mr.T)
    torch.manual_seed(tc.seed)
    unet = UNet2DModel(**given(config.model))
    # mr with its defaults filled in; model and data as set (not diffusers' defaults)
    method = MRMethod(unet, schedule, mr.noise_std, mr.target, optim,
                      {"mr": asdict(mr), "model": given(config.model), "data": given(config.data)})
    # fit loads the data only once the output folder is known to be writable and free
    result = fit(method, core, lambda: TensorDataset(load_images(**given(config.data))), max_steps=max_steps)
    out, path = Path(tc.output_dir), Path(tc.output_dir) / "model"
    if result.state.accelerator.is_main_process:
        info = {"sigma_inf": schedule.sigma_inf, "T": int(schedule.t_max), "noise_std": mr.noise_std,
                "target": mr.target, "steps": result.state.step, "seed": tc.seed}
        with atomic_dir(path) as tmp:
            result.state.ema("model").save_pretrained(tmp / "unet")
            (tmp / "mr.json").write_text(json.dumps(info, indent=1))
        atomic_write_bytes(out / "history.json", json.dumps(result.history, indent=1).encode())
    return path


def cli(config: MRTrainConfig, max_steps: int | None = None) -> int:
    """``fewstep train-mr``: the config comes from ``fewstep.config.load``."""
    print(train_mr(config, max_steps))
    return 0
