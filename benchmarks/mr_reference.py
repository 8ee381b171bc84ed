"""Each departure of our MR Sampler from the MRS code, measured on the exact MR testbed.

    python benchmarks/mr_reference.py

Testbed as benchmarks/mr_table.py's "strong degradation" (4-D Gaussian data, condition mu, IR-SDE cosine
schedule, T = 100), exact 2-Wasserstein distance of the output law to the data (no Monte-Carlo error),
every run started from the exact marginal at t_max. Rows go from our default to the MRS code's run one
change at a time: the theta_0 offset in the schedule (``MRSchedule(theta_offset=True)``), ending at
that schedule's noisy t = 0 (sigma = 2.2e-3) instead of clean data (which makes the last step full
order) and MRS's order rule (12212 at 5 NFE). Both use MRS's third-order weight (our default; the
"Taylor" row shows the third-order one). ``reference`` is ``MRSampler(reference=True)``. Print-only.
"""

from __future__ import annotations

import torch

from fewstep.samplers.mr import MRSampler, MRSchedule, make_mr_solver
from fewstep.testbed import ExactMRDenoiser, GaussianMixture, affine_output_law, w2_gaussian

F64 = torch.float64
MU = torch.tensor([0.3, 0.5, 0.1, 0.9], dtype=F64)
DATA = GaussianMixture(means=[(MU + torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)).tolist()],
                       variances=[[0.1, 0.2, 0.05, 0.1]])
OURS, OFFSET = MRSchedule(t_min=0.1), MRSchedule(theta_offset=True)
NFES = [5, 10, 20, 50]


def w2(schedule, nfe, final="zero", **solver_options):
    den = ExactMRDenoiser(DATA, schedule, MU)
    smp = MRSampler(den, nfe, solver=make_mr_solver(**solver_options), final=final)
    a, s = schedule.alpha(schedule.t_max).item(), schedule.sigma(schedule.t_max).item()
    y = den.mixture
    mean, var = affine_output_law(smp.solver, smp.grid, den, a * y.means[0], a * a * y.variances[0] + s * s)
    return w2_gaussian(mean, torch.diag(var), y.means[0], torch.diag(y.variances[0])).item()


def rows(parameterization, order):
    base = dict(method="ode", parameterization=parameterization, order=order)
    yield "ours (default)", OURS, "zero", base
    if order == 3:
        yield "ours, Taylor 3rd-order weight", OURS, "zero", {**base, "third_order": "taylor"}
    yield "ours + MRS order rule", OURS, "zero", {**base, "order_rule": "mrs"}
    yield "+ theta_0 offset", OFFSET, "zero", base
    yield "+ offset, end at t = 0", OFFSET, "t_min", base
    yield "reference (+ MRS order rule)", OFFSET, "t_min", {**base, "order_rule": "mrs"}


def main():
    for parameterization in ("data", "noise"):
        for order in (1, 2, 3):
            print(f"\nODE-{order}, {parameterization} prediction: exact W2 to the data")
            print("| variant | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
            print("|---|" + "---|" * len(NFES))
            for label, schedule, final, options in rows(parameterization, order):
                print(f"| {label} | " + " | ".join(f"{w2(schedule, n, final, **options):.3g}" for n in NFES) + " |")


if __name__ == "__main__":
    main()
