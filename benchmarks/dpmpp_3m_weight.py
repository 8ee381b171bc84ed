"""DPM-Solver++(3M): our third-order weight ("taylor") against the reference code's ("reference", the
weight of DPM-Solver, diffusers and k-diffusion) at the NFEs few-step users run, on the exact testbed.

    python benchmarks/dpmpp_3m_weight.py [--nfe 4 5 6 8 10 12 15 20] [--n 256]

RMSE of the endpoint against the exact PF-ODE solution from the same x_T (n draws), Karras grid ending
at clean data, default options (``lower_order_final=True``), on diffusers' DDPM schedule (linear betas,
T = 1000) and on the continuous linear VP schedule; data: the 4-D Gaussian of tests/test_solvers.py and
an 8-component 4-D mixture (``GaussianMixture.random(4, 8, seed=0)``). DPM-Solver++(2M) for scale. The
embedded teacher's FD-fmnist at the same NFEs: ``benchmarks/faithfulness_teacher.py --only dpmpp_3m``.
"""

from __future__ import annotations

import argparse

import torch

from fewstep.samplers import ContinuousVPSchedule, DiscreteVPSchedule, Sampler
from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution

DATA = {
    "4-D Gaussian": GaussianMixture(means=[[0.5, -1.0, 0.2, 0.0]], variances=[[0.3, 0.05, 1.0, 2.0]]),
    "8-component mixture": GaussianMixture.random(4, 8, seed=0),
}
SCHEDULES = {"DDPM linear (T=1000)": DiscreteVPSchedule.from_diffusers_config({}),
             "continuous linear VP": ContinuousVPSchedule("linear")}
VARIANTS = {"2M": ("dpmpp_2m", {}), "3M taylor (ours)": ("dpmpp_3m", {"third_order": "taylor"}),
            "3M reference": ("dpmpp_3m", {"third_order": "reference"})}


def rmse(data, schedule, name, options, nfe, n) -> float:
    den = ExactDenoiser(data, schedule)
    sampler = Sampler.for_nfe(den, name, nfe, timesteps="karras", **options)
    x_T = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mixture_pf_ode_solution(data, schedule, x_T, sampler.grid.t[0].item(), None)
    return (sampler.sample(x_T) - exact).pow(2).mean().sqrt().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 12, 15, 20])
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for data_name, data in DATA.items():
        for sched_name, schedule in SCHEDULES.items():
            print(f"\n{data_name}, {sched_name}, Karras grid: endpoint RMSE")
            print("| sampler | " + " | ".join(f"NFE {k}" for k in args.nfe) + " |")
            print("|---|" + "---|" * len(args.nfe))
            for label, (name, options) in VARIANTS.items():
                cells = [f"{rmse(data, schedule, name, options, k, args.n):.3g}" for k in args.nfe]
                print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
