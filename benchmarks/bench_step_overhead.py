"""Per-step solver overhead of fewstep (diffusers adapter and native Sampler) vs diffusers' own schedulers.

    python benchmarks/bench_step_overhead.py [--batch 16] [--size 32] [--steps 10] [--reps 5] [--threads 1]
    python benchmarks/bench_step_overhead.py --step-cost [--runs 25]     # the issue's protocol
    python benchmarks/bench_step_overhead.py --teacher-share [--batch 16]  # the embedded teacher

``--step-cost`` (issue 16's protocol): one process, random model outputs (no network), batch
16 x 3 x 32 x 32, one thread; for every sampler the time inside ``scheduler.step`` per call, fastest of
``--runs`` runs interleaved with diffusers' own scheduler for the same method where one exists
(``set_timesteps`` excluded), and the ratio adapter / diffusers.

``--teacher-share``: the share of a sampling run's wall time that is not the network, on the embedded
Fashion-MNIST teacher (``fewstep.teachers.FMNIST``), for the adapter in its ``DDPMPipeline`` and for
the native ``Sampler``, fastest of ``--runs`` runs.

Default mode:

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
import inspect
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


# (label, diffusers scheduler or None, adapter keywords): the --step-cost table
STEP_CASES = [
    ("ddim", lambda: DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), {"sampler": "ddim"}),
    ("dpmpp_2m", lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing"), {"sampler": "dpmpp_2m"}),
    ("euler", lambda: EulerDiscreteScheduler(timestep_spacing="trailing"), {"sampler": "euler"}),
    ("plms", lambda: PNDMScheduler(skip_prk_steps=True, timestep_spacing="trailing"), {"sampler": "plms"}),
    ("pndm", lambda: PNDMScheduler(timestep_spacing="trailing"), {"sampler": "pndm"}),
    ("ddpm", lambda: _d("DDPMScheduler", clip_sample=False, timestep_spacing="trailing"), {"sampler": "ddpm"}),
    ("dpmpp_3m", lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", solver_order=3), {"sampler": "dpmpp_3m"}),
    ("sde_dpmpp_2m", lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", algorithm_type="sde-dpmsolver++"),
     {"sampler": "sde_dpmpp_2m"}),
    ("dpmsolver_2m", lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", algorithm_type="dpmsolver",
                                                         final_sigmas_type="sigma_min"), {"sampler": "dpmsolver_2m"}),
    ("heun", lambda: _d("HeunDiscreteScheduler", timestep_spacing="trailing"), {"sampler": "heun"}),
    ("unipc", lambda: _d("UniPCMultistepScheduler", timestep_spacing="trailing"), {"sampler": "unipc"}),
    ("lms", lambda: _d("LMSDiscreteScheduler", timestep_spacing="trailing"), {"sampler": "lms"}),
]


def _d(name, **kw):
    import diffusers

    return getattr(diffusers, name)(**kw)


#: Flow-matching pipelines (SD3 / Flux): ours is built from the diffusers scheduler's own config.
FLOW_CASES = [
    ("flow euler", lambda: _d("FlowMatchEulerDiscreteScheduler", shift=3.0), {"sampler": "euler"}),
    ("flow ddim", lambda: _d("FlowMatchEulerDiscreteScheduler", shift=3.0), {"sampler": "ddim"}),
    ("flow dpmpp_2m", lambda: _d("DPMSolverMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0,
                                 prediction_type="flow_prediction"), {"sampler": "dpmpp_2m"}),
]


def _step_cases():
    """Every registry sampler (those with a diffusers counterpart first), Time-Shift, then the flow cases."""
    from fewstep.samplers import SAMPLERS

    paired = {kw["sampler"] for _, _, kw in STEP_CASES}
    rest = [(name, None, {"sampler": name}) for name in SAMPLERS if name not in paired]
    ts = ("time_shift", None, {"sampler": "time_shift", "sampler_options": {"solver": "ddim", "window": 30, "cutoff": 300}})
    return STEP_CASES + rest + [ts] + FLOW_CASES


@torch.no_grad()
def time_steps(scheduler, x_T, outputs, steps):
    """Seconds inside ``step`` for one run (model outputs ``eps = x + 0.01 r``, r drawn beforehand)."""
    scheduler.set_timesteps(steps)
    x, total = x_T, 0.0
    extra = {"generator": torch.Generator().manual_seed(1)} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for k, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x  # FlowMatchEuler has none
        out = scaled + outputs[k % len(outputs)]
        start = time.perf_counter()
        x = scheduler.step(out, t, x, **extra).prev_sample
        total += time.perf_counter() - start
    return total, len(scheduler.timesteps)


def step_cost(args):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # from_config's notes on keys of other schedulers
    torch.set_num_threads(1)
    shape = (args.batch, 3, args.size, args.size)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    outputs = [0.01 * torch.randn(shape, generator=g) for _ in range(8)]
    print(f"step() per call (us), random model outputs, batch {' x '.join(map(str, shape))}, {args.steps} steps, "
          f"fastest of {args.runs} interleaved runs, 1 thread, torch {torch.__version__}")
    print(f"{'sampler':<18} {'NFE':>4} {'diffusers':>10} {'adapter':>10} {'ratio':>7}")
    for label, make_reference, kw in _step_cases():
        if args.only and not any(name in label for name in args.only):
            continue
        flow = (label, make_reference, kw) in FLOW_CASES
        config = make_reference().config if flow else DDIMScheduler(clip_sample=False).config
        ours_best = ref_best = float("inf")
        for _ in range(args.runs):
            seconds, nfe = time_steps(FewstepScheduler.from_config(config, **kw), x_T, outputs, args.steps)
            ours_best = min(ours_best, seconds / nfe)
            if make_reference is not None:
                seconds, ref_nfe = time_steps(make_reference(), x_T, outputs, args.steps)
                ref_best = min(ref_best, seconds / ref_nfe)
        ref = f"{ref_best * 1e6:>10.0f}" if make_reference is not None else f"{'-':>10}"
        ratio = f"{ours_best / ref_best:>7.2f}" if make_reference is not None else f"{'-':>7}"
        print(f"{label:<18} {nfe:>4} {ref} {ours_best * 1e6:>10.0f} {ratio}")


def teacher_share(args):
    """Non-network share of a sampling run on the embedded teacher (adapter in its pipeline; native)."""
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    from fewstep.teachers import FMNIST

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    pipe = DDPMPipeline.from_pretrained(str(FMNIST))
    pipe.set_progress_bar_config(disable=True)
    unet, config = pipe.unet.eval(), dict(pipe.scheduler.config)
    timed = TimedModel(unet)
    pipe.unet = _TimedModule(unet, timed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    print(f"embedded teacher {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, batch {args.batch} x "
          f"{channels} x {size} x {size}, {args.threads} thread(s), fastest of {args.runs} runs")
    print(f"{'sampler':<10} {'NFE':>4} {'path':<8} {'run (ms)':>9} {'network (ms)':>13} {'non-network':>12}")
    x_T = torch.randn(args.batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "dpmpp_2m", "euler", "plms", "ghvb"):
        for path in ("adapter", "native"):
            best = None
            for _ in range(args.runs):
                timed.seconds, timed.calls = 0.0, 0
                start = time.perf_counter()
                with torch.no_grad():
                    if path == "adapter":
                        pipe.scheduler = FewstepScheduler.from_config(config, sampler=name)
                        pipe(batch_size=args.batch, num_inference_steps=args.steps, output_type="np",
                             generator=torch.Generator().manual_seed(0))
                    else:
                        den = ModelDenoiser(timed, DiscreteVPSchedule.from_diffusers_config(config))
                        Sampler(den, name, steps=args.steps).sample(x_T)
                total = time.perf_counter() - start
                if best is None or total < best[0]:
                    best = (total, timed.seconds, timed.calls)
            total, net, calls = best
            print(f"{name:<10} {calls:>4} {path:<8} {total * 1e3:>9.1f} {net * 1e3:>13.1f} {1 - net / total:>11.1%}")


class _TimedModule(torch.nn.Module):
    """The pipeline's UNet, timed (keeps ``config``, ``dtype``, ``device`` for the pipeline)."""

    def __init__(self, unet, timed):
        super().__init__()
        self.unet, self.timed = unet, timed
        self.config = unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, *args, **kwargs):
        return self.timed(*args, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-share", action="store_true", help="non-network share of a run on the teacher")
    parser.add_argument("--step-cost", action="store_true", help="issue 16's protocol: step() alone, random outputs")
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny convs: 1 is fastest)")
    parser.add_argument("--only", nargs="+", default=None, help="--step-cost: rows whose label contains one of these")
    args = parser.parse_args(argv)
    if args.step_cost:
        return step_cost(args)
    if args.teacher_share:
        return teacher_share(args)
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
