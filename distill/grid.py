"""Sample a grid of images from a diffusers DDPM-style pipeline with any fewstep sampler.

    fewstep grid --pipeline teachers/fmnist --sampler dpmpp_2m --steps 20 --out docs/teacher_samples.png
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.io import save_grid
from fewstep.samplers import ModelDenoiser, Sampler

from .families import TeacherError, load_pipeline

__all__ = ["sample_grid", "cli", "PIPELINES"]

#: Pipeline classes ``sample_grid`` reads: a ``UNet2DModel`` ``unet`` and a DDPM-family ``scheduler``.
PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def _check_pipeline(path: str) -> None:
    """A one-line ``TeacherError`` for a folder that is not a DDPM/DDIM pipeline, before diffusers' own refusal."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"--pipeline {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise TeacherError(f"{index} is not a diffusers model index (not a JSON mapping)") from None
    if name not in PIPELINES:
        raise TeacherError(f"--pipeline {path} is a {name}; grid samples {' or '.join(PIPELINES)} folders "
                           "(a UNet2DModel and a DDPM-family scheduler)")


@torch.no_grad()
def sample_grid(pipeline_path: str, sampler: str = "dpmpp_2m", steps: int = 20, n: int = 64, seed: int = 0,
                **options) -> torch.Tensor:
    """``n`` samples in [-1, 1] from the pipeline's UNet and scheduler config."""
    from diffusers import DDPMPipeline

    _check_pipeline(pipeline_path)
    pipe = load_pipeline(pipeline_path, DDPMPipeline, "--pipeline")
    unet = pipe.unet.eval()
    denoiser = ModelDenoiser.from_diffusers(unet, pipe.scheduler.config)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Sampler(denoiser, sampler, steps=steps, **options).sample(x_T, generator=torch.Generator().manual_seed(seed))


def cli(pipeline: str, sampler: str = "dpmpp_2m", steps: int = 20, n: int = 64, seed: int = 0,
        out: str = "samples.png") -> int:
    """``fewstep grid``: sample and save an ``8``-wide grid (its folder made if needed); prints the file written."""
    print(save_grid(sample_grid(pipeline, sampler, steps, n, seed), out))
    return 0
