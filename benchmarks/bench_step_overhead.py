"""Per-step solver overhead of fewstep (diffusers adapter and native Sampler) vs diffusers' own schedulers.

    python benchmarks/bench_step_overhead.py [--batch 16] [--size 32] [--steps 10] [--reps 5] [--threads 1]

One process, one random ~1M-parameter UNet2DModel, one batch. Every sampler runs the same sampling
problem ``reps`` times, taking the median run:

- overhead / call: (wall time of the whole run - time inside the UNet) / model calls: everything a
  sampler adds to the network (set_timesteps, scale_model_input, step, prediction conversion, grids);
- step(): time inside ``scheduler.step`` alone (the two diffusers-style schedulers);
- end-to-end: wall time of the whole run per image, UNet included.

The UNet's output is made near-consistent (``eps = x + 0.01 unet(x, t)``) so samples stay finite and
no run is slowed by infinities or denormals. Print-only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       UNet2DModel)
from diffusers.models.unets.unet_2d import UNet2DOutput

from fewstep.samplers import DiffusersSpacing, DiscreteVPSchedule, ModelDenoiser, Sampler
from fewstep.samplers.schedulers import FewstepScheduler

# (label, diffusers scheduler, fewstep sampler, spacing, fewstep endpoint)
CASES = [
    ("DDIM", lambda: DDIMScheduler(clip_sample=False), "ddim", "leading", "zero"),
    ("DPM-Solver++ 2M", lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing"), "dpmpp_2m", "trailing",
     "zero"),
    ("PNDM (PLMS)", lambda: PNDMScheduler(skip_prk_steps=True), "plms", "leading", "t_min"),
    ("Euler", lambda: EulerDiscreteScheduler(timestep_spacing="leading"), "euler", "leading", "zero"),
]


class NearConsistentUNet(UNet2DModel):
    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        value = sample + 0.01 * super().forward(sample, timestep, *args, **kwargs).sample
        return UNet2DOutput(sample=value) if return_dict else (value,)


class TimedModel:
    """Calls the UNet and accumulates the seconds spent inside it."""

    def __init__(self, unet):
        self.unet, self.seconds, self.calls = unet, 0.0, 0

    def __call__(self, x, t, **kwargs):
        start = time.perf_counter()
        out = self.unet(x, t, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def make_unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return NearConsistentUNet(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                              block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                              up_block_types=("UpBlock2D",) * 3, norm_num_groups=8).eval()


@torch.no_grad()
def run_scheduler(scheduler, model: TimedModel, x_T, steps):
    """Stable Diffusion's loop; returns (total seconds, seconds inside step())."""
    start, in_step = time.perf_counter(), 0.0
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t).sample
        s = time.perf_counter()
        x = scheduler.step(out, t, x).prev_sample
        in_step += time.perf_counter() - s
    return time.perf_counter() - start, in_step


@torch.no_grad()
def run_native(unet, config, name, spacing, final, model: TimedModel, x_T, steps):
    start = time.perf_counter()
    denoiser = ModelDenoiser(model, DiscreteVPSchedule.from_diffusers_config(config))
    Sampler(denoiser, name, steps=steps, timesteps=DiffusersSpacing(spacing), final=final).sample(x_T)
    return time.perf_counter() - start, float("nan")


def measure(run, unet, reps):
    """Median over ``reps`` runs of (overhead per call, step() per call, end-to-end) in seconds."""
    rows = []
    for _ in range(reps):
        model = TimedModel(unet)
        total, in_step = run(model)
        rows.append(((total - model.seconds) / model.calls, in_step / model.calls, total, model.calls))
    return [statistics.median(col) for col in zip(*rows)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny convs: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    unet = make_unet(args.size)
    x_T = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel {params / 1e6:.2f}M params, batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"{args.steps} steps, median of {args.reps} runs, {args.threads} thread(s), torch {torch.__version__}")
    measure(lambda m: run_scheduler(DDIMScheduler(), m, x_T, 2), unet, 1)  # warm-up

    head = (f"{'':<21} | {'overhead / model call (us)':^34} | {'overhead ratio':^17} | "
            f"{'step() (us)':^17} | {'end-to-end (ms/image)':^25}")
    sub = (f"{'sampler':<16} {'NFE':>4} | {'diffusers':>10} {'adapter':>10} {'native':>10}   | {'ada/dif':>8} {'nat/dif':>8} | "
           f"{'diffusers':>9} {'adapter':>7} | {'diffusers':>9} {'adapter':>7} {'native':>7}")
    print(head, sub, "-" * len(sub), sep="\n")
    for label, make_reference, name, spacing, final in CASES:
        config = make_reference().config
        endpoint = "zero" if final == "zero" else "sigma_min"
        ref = measure(lambda m: run_scheduler(make_reference(), m, x_T, args.steps), unet, args.reps)
        ada = measure(lambda m: run_scheduler(
            FewstepScheduler.from_config(config, sampler=name, timestep_spacing=spacing, final_sigmas_type=endpoint),
            m, x_T, args.steps), unet, args.reps)
        nat = measure(lambda m: run_native(unet, config, name, spacing, final, m, x_T, args.steps), unet, args.reps)
        us, ms = 1e6, 1e3 / args.batch
        print(f"{label:<16} {int(ref[3]):>4} | {ref[0] * us:>10.0f} {ada[0] * us:>10.0f} {nat[0] * us:>10.0f}   | "
              f"{ada[0] / ref[0]:>8.2f} {nat[0] / ref[0]:>8.2f} | {ref[1] * us:>9.0f} {ada[1] * us:>7.0f} | "
              f"{ref[2] * ms:>9.2f} {ada[2] * ms:>7.2f} {nat[2] * ms:>7.2f}")


if __name__ == "__main__":
    main()
