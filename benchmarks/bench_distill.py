"""Distillation throughput against the teacher's own training step, same machine, same process.

    python benchmarks/bench_distill.py [--batch 64] [--steps 20] [--threads 2]

On the embedded teacher (teachers/fmnist) and random data of its shape, times one optimizer step of: the
teacher's denoising loss (the baseline), progressive distillation (2 teacher calls + 1 student step) and
multistep consistency distillation (1 teacher call + the student's stop-gradient bootstrap + 1 student
step). Prints student updates/s, teacher calls/s and each as a ratio to the teacher's training step.
Median of ``--steps`` timed steps after 3 warm-up steps, the methods interleaved.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from fewstep.distill.consistency import MultistepConsistency
from fewstep.distill.core import CoreConfig, StepContext, TrainState
from fewstep.distill.progressive import ProgressiveDistillation
from fewstep.distill.teacher import eps_loss
from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.teachers import FMNIST


class _CountCalls(nn.Module):
    """Counts forward calls of a frozen teacher (to report teacher calls per step)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x, t, *args, **kwargs):
        self.calls += x.shape[0]
        return self.module(x, t, *args, **kwargs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(FMNIST)
    schedule = DiscreteVPSchedule.from_diffusers_config(pipe.scheduler.config)
    accelerator = Accelerator(cpu=True)
    config = CoreConfig(output_dir="unused", steps=10_000, batch_size=args.batch)
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    teacher_model = copy.deepcopy(pipe.unet).train().requires_grad_(True)  # the methods freeze theirs
    teacher_opt = torch.optim.AdamW(teacher_model.parameters(), lr=1e-5)
    loss_fn = eps_loss(schedule.alphas_cumprod)

    def teacher_step(k):
        loss = loss_fn(teacher_model, x, torch.Generator().manual_seed(k))
        loss.backward()
        teacher_opt.step()
        teacher_opt.zero_grad(set_to_none=True)
        return 0

    def method_step(method):
        state = TrainState(method.networks(), accelerator)
        counted = _CountCalls(state.modules["teacher"])
        state.modules["teacher"] = counted
        rounds = method.round_steps(10_000) if isinstance(method, ProgressiveDistillation) else [10_000]

        def step(k):
            counted.calls = 0
            ctx = StepContext(state, config, rounds, torch.Generator().manual_seed(k), micro=0)
            method.train_step(ctx, x)
            return counted.calls

        return step

    frozen = pipe.unet.eval()
    runs = {
        "teacher training step": teacher_step,
        "progressive distillation": method_step(ProgressiveDistillation(frozen, "epsilon", schedule, 32, 1)),
        "multistep consistency (S=4)": method_step(MultistepConsistency(frozen, "epsilon", schedule, 4)),
    }
    times = {name: [] for name in runs}
    calls = {name: 0 for name in runs}
    for k in range(args.steps + 3):
        for name, run in runs.items():  # interleaved, so machine load hits all alike
            start = time.perf_counter()
            c = run(k)
            if k >= 3:
                times[name].append(time.perf_counter() - start)
                calls[name] += c
    base = statistics.median(times["teacher training step"])
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.steps} steps\n")
    print("| step | s/step | student updates/s | teacher calls/s | time vs teacher step |")
    print("|---|---|---|---|---|")
    for name in runs:
        med = statistics.median(times[name])
        per_s = calls[name] / sum(times[name]) if calls[name] else 0.0
        print(f"| {name} | {med:.3f} | {1 / med:.2f} | {per_s:.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
