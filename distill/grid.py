"""Sample a grid of images from a diffusers DDPM-style pipeline with any fewstep sampler.

    fewstep grid --pipeline teachers/fmnist --sampler dpmpp_2m --steps 20 --out docs/teacher_samples.png
"""

from __future__ import annotations

import torch

from fewstep.io import save_grid
from fewstep.samplers import ModelDenoiser, Sampler

__all__ = ["sample_grid", "cli"]


@torch.no_grad()
def sample_grid(pipeline_path: str, sampler: str = "dpmpp_2m", steps: int = 20, n: int = 64, seed: int = 0,
                **options) -> torch.Tensor:
    """``n`` samples in [-1, 1] from the pipeline's UNet and scheduler config."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline_path)
    unet = pipe.unet.eval()
    denoiser = ModelDenoiser.from_diffusers(unet, pipe.scheduler.config)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Sampler(denoiser, sampler, steps=steps, **options).sample(x_T, generator=torch.Generator().manual_seed(seed))


def cli(pipeline: str, sampler: str = "dpmpp_2m", steps: int = 20, n: int = 64, seed: int = 0,
        out: str = "samples.png") -> int:
    """``fewstep grid``: sample and save an ``8``-wide grid; prints the file written."""
    print(save_grid(sample_grid(pipeline, sampler, steps, n, seed), out))
    return 0
