"""Fitted grids against fixed ones on the exact Gaussian-mixture testbed (issue 23's first "Show" bullet).

    python benchmarks/tune_testbed.py [--dim 16] [--components 8] [--nfe 3 4 5 6 7 8]
        [--samplers ddim dpmpp_2m unipc] [--fit-seeds 1024] [--val-seeds 1024] [--ref-steps 200]

The teacher is ``ExactDenoiser`` of a seeded ``GaussianMixture.random(dim, components)`` on DDPM's linear
schedule. Each grid is fitted (``fewstep.samplers.tune.fit_timesteps``) to the teacher's own DPM-Solver++(2M)
trajectories from ``--fit-seeds`` noises; every grid is then scored on ``--val-seeds`` other noises by its
mean per-sample RMS endpoint error against the **exact** PF-ODE solution (``mixture_pf_ode_solution``).
Prints a Markdown table: one row per sampler x NFE, the fitted grid's error, each fixed grid's, and
whether the fitted one is <= every fixed one.
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.samplers.tune import (FIXED_GRIDS, ddim_cost_matrix, endpoint_errors, fit_timesteps, fixed_grid_times,
                                   reference_trajectory)
from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution


def run(dim=16, components=8, nfes=(3, 4, 5, 6, 7, 8), samplers=("ddim", "dpmpp_2m", "unipc"), fit_seeds=1024,
        val_seeds=1024, ref_steps=200, seed=0, report=print) -> list[dict]:
    schedule = DiscreteVPSchedule.from_diffusers_config({})
    mixture = GaussianMixture.random(dim, components, seed=seed)
    teacher = ExactDenoiser(mixture, schedule)
    g = torch.Generator().manual_seed(seed)
    x_fit = torch.randn(fit_seeds, dim, generator=g, dtype=torch.float64)
    x_val = torch.randn(val_seeds, dim, generator=g, dtype=torch.float64)
    reference = reference_trajectory(teacher, x_fit, steps=ref_steps)
    exact = mixture_pf_ode_solution(mixture, schedule, x_val, schedule.t_max, None, rtol=1e-9, atol=1e-9)
    cost = ddim_cost_matrix(reference, schedule)
    rows = []
    report("| sampler | NFE | fitted | " + " | ".join(FIXED_GRIDS) + " | GITS DP alone | fitted <= all fixed | fitted grid |")
    report("|---|---|---|" + "---|" * len(FIXED_GRIDS) + "---|---|---|")
    for name in samplers:
        for nfe in nfes:
            start = time.perf_counter()
            fit = fit_timesteps(teacher, name, nfe, reference, cost=cost)
            errors = {g: float(endpoint_errors(teacher, name, fixed_grid_times(schedule, g, fit.steps), x_val, exact).mean())
                      for g in FIXED_GRIDS}
            gits = float(endpoint_errors(teacher, name, fit.gits_timesteps, x_val, exact).mean())
            fitted = float(endpoint_errors(teacher, name, fit.timesteps, x_val, exact).mean())
            ok = fitted <= min(errors.values())
            rows.append(dict(sampler=name, nfe=nfe, fitted=fitted, gits=gits, ok=ok, timesteps=fit.timesteps,
                             seconds=time.perf_counter() - start, **errors))
            report(f"| {name} | {nfe} | **{fitted:.4f}** | " + " | ".join(f"{errors[g]:.4f}" for g in FIXED_GRIDS)
                   + f" | {gits:.4f} | {'yes' if ok else 'NO'} | {[int(round(t)) for t in fit.timesteps]} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"])
    p.add_argument("--fit-seeds", type=int, default=1024)
    p.add_argument("--val-seeds", type=int, default=1024)
    p.add_argument("--ref-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(a.dim, a.components, a.nfe, a.samplers, a.fit_seeds, a.val_seeds, a.ref_steps, a.seed)
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} cells: fitted <= every fixed grid; "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
