"""Print each solver's measured convergence order on the exact Gaussian testbed.

    python benchmarks/convergence_orders.py

Error = max |x_end - exact PF-ODE solution| over 64 draws of a 4-D Gaussian; order = least-squares
slope of log error over log steps. "exact start k": the first k solver results are replaced by the
exact solution (a multistep method's own order, free of its warm-up error).
"""

from __future__ import annotations

import argparse

import torch

from fewstep.samplers import ContinuousVPSchedule, EDMSchedule, Sampler, TimeUniform
from fewstep.testbed.convergence import endpoint_error, measured_order
from fewstep.testbed import ExactDenoiser, GaussianMixture

GAUSS = GaussianMixture(means=[[0.5, -1.0, 0.2, 0.0]], variances=[[0.3, 0.05, 1.0, 2.0]])
VP, EDM = ContinuousVPSchedule("linear"), EDMSchedule()
EDM_WINDOW = TimeUniform(t_start=3.0, t_end=0.5)  # uniform in sigma_bar: genuine fixed-step AB

CASES = [
    ("DDIM", VP, "ddim", "log_snr", {}, 0, [16, 32, 64, 128], 1),
    ("Euler", VP, "euler", "log_snr", {}, 0, [16, 32, 64, 128], 1),
    ("Heun", VP, "heun", "log_snr", {}, 0, [16, 32, 64, 128], 2),
    ("DPM-Solver++ 2M", VP, "dpmpp_2m", "log_snr", {"lower_order_final": False}, 0, [16, 32, 64, 128], 2),
    ("DPM-Solver++ 3M (warm-up)", VP, "dpmpp_3m", "karras", {"lower_order_final": False, "third_order": "taylor"}, 0,
     [64, 128, 256, 512], "3*"),
    ("DPM-Solver++ 3M (exact start 2)", VP, "dpmpp_3m", "karras", {"lower_order_final": False, "third_order": "taylor"}, 2,
     [64, 128, 256, 512], 3),
    ("DPM-Solver++ 3M reference coeff.", VP, "dpmpp_3m", "karras",
     {"lower_order_final": False, "third_order": "reference"}, 2, [64, 128, 256, 512], 2),
    ("PNDM (RK warm-up), EDM window", EDM, "pndm", EDM_WINDOW, {}, 0, [64, 128, 256], 4),
    ("PLMS (Heun warm-up), EDM window", EDM, "plms", EDM_WINDOW, {}, 0, [64, 128, 256], "4*"),
    ("AB4 (exact start 3), EDM window", EDM, "plms", EDM_WINDOW, {"warmup": "lower_order"}, 3,
     [64, 128, 256], 4),
    ("AB4 (AB1 warm-up), EDM window", EDM, "plms", EDM_WINDOW, {"warmup": "lower_order"}, 0,
     [64, 128, 256], 2),
]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print("| solver | grid | steps | max error | measured order | theory |")
    print("|---|---|---|---|---|---|")
    for label, sched, name, ts, opts, exact, steps, theory in CASES:
        errs = []
        for n in steps:
            sampler = Sampler(ExactDenoiser(GAUSS, sched), name, steps=n, timesteps=ts, final="t_min", **opts)
            errs.append(endpoint_error(sampler, GAUSS, x_T, exact))
        grid = ts if isinstance(ts, str) else "sigma uniform [0.5, 3]"
        print(f"| {label} | {type(sched).__name__} {grid} | {steps[0]}..{steps[-1]} | "
              f"{' '.join(f'{e:.1e}' for e in errs)} | {measured_order(errs, steps):.2f} | {theory} |")
    print("\n* asymptotically capped by the warm-up's local error (2 for 3M's Euler start, 3 for PLMS's "
          "improved-Euler start); here the warm-up runs where the solution is smooth and its error is negligible.")


if __name__ == "__main__":
    main()
