"""Train a teacher: a diffusers ``UNet2DModel`` on a standard DDPM noise schedule, with the training core.

    fewstep train-teacher --config configs/teacher_fmnist.yaml

The config has sections ``train`` (``TrainConfig``), ``model`` (``UNet2DModel`` keyword arguments),
``scheduler`` (``DDPMScheduler`` keyword arguments) and ``data`` (``load_images`` arguments). The
result is saved as a diffusers ``DDPMPipeline`` (safetensors) in ``train.output_dir/pipeline``, so
``DDPMPipeline.from_pretrained(path)`` loads it offline and any fewstep sampler swaps in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.data import load_images
from .trainer import TrainConfig, Trainer, load_config

__all__ = ["eps_loss", "build_teacher", "train_teacher", "main"]


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


def build_teacher(config: dict):
    """``(unet, scheduler)`` from a config's ``model`` and ``scheduler`` sections."""
    from diffusers import DDPMScheduler, UNet2DModel

    model_cfg = dict(config.get("model", {}))
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in model_cfg:
            model_cfg[key] = tuple(model_cfg[key])
    return UNet2DModel(**model_cfg), DDPMScheduler(**config.get("scheduler", {}))


def train_teacher(config: dict, max_steps: int | None = None, output_dir: str | None = None) -> Path:
    """Train (resuming if a checkpoint exists) and export the EMA teacher; returns the pipeline folder."""
    from diffusers import DDPMPipeline

    from fewstep.samplers.schedules import DiscreteVPSchedule

    unknown = sorted(set(config) - {"train", "model", "scheduler", "data", "eval"})
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected train, model, scheduler, data")
    train_cfg = dict(config.get("train", {}))
    if output_dir is not None:
        train_cfg["output_dir"] = output_dir
    tc = TrainConfig.from_dict(train_cfg)
    torch.manual_seed(tc.seed)  # the initial weights are part of the run
    unet, scheduler = build_teacher(config)
    data = load_images(**config.get("data", {"name": "fashion_mnist"}))
    if data.shape[1:] != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise ValueError(f"data of shape {tuple(data.shape[1:])} does not fit the model's "
                         f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} input")
    schedule = DiscreteVPSchedule.from_diffusers_config(scheduler.config)
    trainer = Trainer(tc, unet, eps_loss(schedule.alphas_cumprod, scheduler.config.prediction_type), data,
                      recipe={k: config.get(k, {}) for k in ("model", "scheduler", "data")})
    start = time.perf_counter()
    ema = trainer.fit(max_steps=max_steps)
    trainer.write_history()
    path = Path(tc.output_dir) / "pipeline"
    if trainer.accelerator.is_main_process:
        DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(path)
        info = {"steps": trainer.step, "seconds_this_run": time.perf_counter() - start, "seed": tc.seed,
                "parameters": sum(p.numel() for p in ema.parameters()), "examples": len(data)}
        (Path(tc.output_dir) / "train_info.json").write_text(json.dumps(info, indent=1))
    return path


def cli(config_path: str, max_steps: int | None = None, output_dir: str | None = None) -> int:
    """``fewstep train-teacher --config FILE.yaml``."""
    print(train_teacher(load_config(config_path), max_steps, output_dir))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="fewstep train-teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/teacher_fmnist.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps (resumable)")
    p.add_argument("--output-dir", default=None, help="override train.output_dir")
    args = p.parse_args(argv)
    print(train_teacher(load_config(args.config), args.max_steps, args.output_dir))


if __name__ == "__main__":
    main()
