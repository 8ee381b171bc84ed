"""Sample a grid of images from a diffusers DDPM-style pipeline with any fewstep sampler.

    python -m fewstep.distill.grid --pipeline teachers/fmnist --sampler dpmpp_2m --steps 20 --out docs/teacher_samples.png
"""

from __future__ import annotations

import argparse

import torch

from fewstep.io import save_grid
from fewstep.samplers import ModelDenoiser, Sampler

__all__ = ["sample_grid", "main"]


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    args = p.parse_args(argv)
    print(save_grid(sample_grid(args.pipeline, args.sampler, args.steps, args.n, args.seed), args.out))


if __name__ == "__main__":
    main()
