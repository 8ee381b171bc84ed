"""Train a small mean-reverting (MR) restoration model on the training core, and restore with MRS.

    fewstep train-mr --config configs/mr_fmnist.yaml [train.steps=8000 ...]

The task: Gaussian denoising (``mu`` = clean image + ``noise_std`` noise in [-1, 1]). The network is a
``UNet2DModel`` that sees ``[x_t, mu]`` (two channels) and predicts, for
``x_t = mu + alpha_t (x0 - mu) + sigma_t eps`` on ``MRSchedule``'s discrete times 1..T, either the noise
``eps`` (``mr.target: noise``, IR-SDE's ``fit_target="noise"``) or the clean image ``x0``
(``mr.target: data``, the example's choice). Why data: near ``t = T`` the MR signal ``alpha_t`` is
``~eps = 0.005``, so ``x0 = mu + (x_t - mu - sigma_t eps_hat) / alpha_t`` multiplies a noise model's error
by ``sigma_t / alpha_t ~ 40``; a data model has no such factor, which is what MRS's data-prediction
solvers need at 10-20 NFE. Saved as ``output_dir/unet`` (diffusers format) plus ``mr.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.config import MRTrainConfig, from_dict, given
from fewstep.samplers.mr import MRDenoiser, MRSchedule

from fewstep.data import load_images

from .trainer import Trainer

__all__ = ["MR_TARGETS", "degrade", "mr_loss", "unet_mr_model", "load_mr_model", "train_mr", "cli"]


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
    """Train (resuming if a checkpoint exists) and save ``output_dir/unet`` and ``mr.json``."""
    from diffusers import UNet2DModel

    config = config if isinstance(config, MRTrainConfig) else from_dict(MRTrainConfig, config)
    tc, mr = config.train, config.mr
    target = mr.target
    schedule = MRSchedule(sigma_inf=mr.sigma_inf, T=mr.T)
    torch.manual_seed(tc.seed)
    unet = UNet2DModel(**given(config.model))
    data = load_images(**given(config.data))
    # mr with its defaults filled in; model and data as set (not diffusers' defaults)
    trainer = Trainer(tc, unet, mr_loss(schedule, mr.noise_std, target), data,
                      recipe={"mr": asdict(mr), "model": given(config.model), "data": given(config.data)})
    ema = trainer.fit(max_steps=max_steps)
    trainer.write_history()
    out = Path(tc.output_dir)
    if trainer.accelerator.is_main_process:
        ema.save_pretrained(out / "unet")
        info = {"sigma_inf": schedule.sigma_inf, "T": int(schedule.t_max), "noise_std": mr.noise_std,
                "target": target, "steps": trainer.step, "seed": tc.seed}
        (out / "mr.json").write_text(json.dumps(info, indent=1))
    return out


def cli(config: MRTrainConfig, max_steps: int | None = None) -> int:
    """``fewstep train-mr``: the config comes from ``fewstep.config.load``."""
    print(train_mr(config, max_steps))
    return 0
