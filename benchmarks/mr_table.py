"""MR Sampler vs the IR-SDE baselines on the exact MR testbed: NFE vs distance to the data, and ODE orders.

    python benchmarks/mr_table.py [--mixture 20000]

Data ``x0 ~ N(m, diag v)`` in 4-D with a condition ``mu``, MR schedule of IR-SDE (cosine theta, T = 100,
sigma_inf = 50/255, eps = 0.005; t_min = 0.1 so MRS's linspace grid fits 1000 steps), the Bayes-optimal
denoiser, MRS's ``linspace`` grid ending at clean data, every run started from the exact marginal at
t_max. Distance: the exact 2-Wasserstein distance between the output's law and the data, computed by
``testbed.affine_output_law`` (no Monte-Carlo error). Two testbeds: a strong degradation (``|m - mu| ~ 1``,
``v ~ 0.1``) and a mild one (``|m - mu| ~ 0.3``, ``v ~ 0.03``).

``--mixture N``: also a 6-component mixture (per-coordinate std 0.05, means in [0, 1]^4), scored by the
sliced Wasserstein distance of ``N`` samples against ``N`` data samples (prints the two-sample floor). Slow.
Print-only.
"""

from __future__ import annotations

import argparse

import torch

from fewstep.samplers import Sampler
from fewstep.testbed.convergence import endpoint_error, measured_order
from fewstep.samplers.mr import MRSampler, MRSchedule
from fewstep.samplers.solvers import DPMSolver, DPMSolverPP
from fewstep.testbed import (ExactMRDenoiser, GaussianMixture, affine_output_law, sliced_wasserstein,
                              w2_gaussian)

F64 = torch.float64
SCHED = MRSchedule(t_min=0.1)
MU = torch.tensor([0.3, 0.5, 0.1, 0.9], dtype=F64)
TESTBEDS = {
    "strong degradation": GaussianMixture(means=[(MU + torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)).tolist()],
                                          variances=[[0.1, 0.2, 0.05, 0.1]]),
    "mild degradation": GaussianMixture(means=[[0.6, 0.3, 0.5, 0.8]], variances=[[0.02, 0.05, 0.01, 0.04]]),
}
NFES = [5, 10, 20, 50, 100, 200, 1000]
# (label, method, parameterization, order)
METHODS = [
    ("MRS ODE-1 data", "ode", "data", 1),
    ("MRS ODE-2 data", "ode", "data", 2),
    ("MRS ODE-1 noise", "ode", "noise", 1),
    ("MRS ODE-2 noise", "ode", "noise", 2),
    ("MRS SDE-1 data", "sde", "data", 1),
    ("MRS SDE-2 data", "sde", "data", 2),
    ("MRS SDE-1 noise", "sde", "noise", 1),
    ("MRS SDE-2 noise", "sde", "noise", 2),
    ("posterior sampling", "posterior", "data", 1),
    ("Euler-Maruyama", "euler_maruyama", "data", 1),
]


def exact_w2(data: GaussianMixture, nfe: int, method: str, parameterization: str, order: int) -> float:
    den = ExactMRDenoiser(data, SCHED, MU)
    smp = MRSampler(den, nfe, method=method, parameterization=parameterization, order=order)
    a, s = SCHED.alpha(SCHED.t_max).item(), SCHED.sigma(SCHED.t_max).item()
    y = den.mixture
    mean, var = affine_output_law(smp.solver, smp.grid, den, a * y.means[0], a * a * y.variances[0] + s * s)
    return w2_gaussian(mean, torch.diag(var), y.means[0], torch.diag(y.variances[0])).item()


def table(title: str, score) -> None:
    print(f"\n{title}")
    print(f"| {'method':<20} | " + " | ".join(f"{n:>8}" for n in NFES) + " |")
    print(f"|{'-' * 22}|" + "|".join("-" * 10 for _ in NFES) + "|")
    for label, method, par, order in METHODS:
        cells = []
        for n in NFES:
            try:
                cells.append(f"{score(n, method, par, order):8.2e}")
            except ValueError:
                cells.append(f"{'-':>8}")
        print(f"| {label:<20} | " + " | ".join(cells) + " |")


def orders() -> None:
    data = TESTBEDS["mild degradation"]
    cases = [("MRS ODE-1 data", DPMSolverPP(1)), ("MRS ODE-2 data (taylor)", DPMSolverPP(2, "heun", False)),
             ("MRS ODE-1 noise", DPMSolver(1)), ("MRS ODE-2 noise (taylor)", DPMSolver(2, "heun")),
             ("DPM-Solver-2M noise (midpoint)", DPMSolver(2, "midpoint"))]
    steps = [16, 32, 64, 128]
    print("\nODE convergence orders (max endpoint error vs the exact PF-ODE in y, log-SNR grid to t_min, 64 draws)")
    print(f"| {'solver':<30} | " + " | ".join(f"{n:>8}" for n in steps) + " | order |")
    print(f"|{'-' * 32}|" + "|".join("-" * 10 for _ in steps) + "|-------|")
    for label, solver in cases:
        den = ExactMRDenoiser(data, SCHED, MU)
        g = torch.Generator().manual_seed(0)
        y_T = den.mixture.noised(SCHED.alpha(SCHED.t_max), SCHED.sigma(SCHED.t_max)).sample(64, g)
        errs = [endpoint_error(Sampler(den, solver, steps=n, timesteps="log_snr", final="t_min"), den.mixture, y_T)
                for n in steps]
        print(f"| {label:<30} | " + " | ".join(f"{e:8.2e}" for e in errs) + f" | {measured_order(errs, steps):5.2f} |")


def mixture_table(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(means=torch.rand(6, 4, generator=g, dtype=F64), variances=0.05**2)
    ref = mix.sample(n, torch.Generator().manual_seed(99))
    floor = sliced_wasserstein(ref, mix.sample(n, torch.Generator().manual_seed(98))).item()
    den = ExactMRDenoiser(mix, SCHED, MU)
    y_T = den.mixture.noised(SCHED.alpha(SCHED.t_max), SCHED.sigma(SCHED.t_max)).sample(n, g)

    def score(nfe, method, par, order):
        smp = MRSampler(den, nfe, method=method, parameterization=par, order=order)
        x = smp.sample(MU.expand(n, 4), generator=torch.Generator().manual_seed(1), y_T=y_T)
        return sliced_wasserstein(x, ref).item()

    table(f"6-component mixture: sliced W2 of {n} samples (two-sample floor {floor:.2e})", score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", type=int, default=0, help="also the mixture table with this many samples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"schedule: {SCHED!r}; grid: MRS linspace to t = 0 (clean data)")
    for name, data in TESTBEDS.items():
        table(f"{name}: exact W2(output law, data) vs NFE",
              lambda nfe, method, par, order, data=data: exact_w2(data, nfe, method, par, order))
    orders()
    if args.mixture:
        mixture_table(args.mixture)


if __name__ == "__main__":
    main()
