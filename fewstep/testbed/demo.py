"""``fewstep demo --testbed``: a short sampler comparison on exact ground truth (no network, no GPU).

Data is a seeded Gaussian mixture, so the denoiser is exact (``testbed.ExactDenoiser``) and every
error in the table is the solver's alone. The schedule is diffusers' default DDPM schedule (linear
betas, 1000 training steps). For each sampler and NFE:

- **ODE error**: RMSE (over samples, Euclidean norm per sample) between the sampler's output and the
  exact probability-flow ODE endpoint from the same ``x_T`` (``testbed.mixture_pf_ode_solution``,
  DOP853 at ``rtol = atol = 1e-8``, ~1e-6 off the exact map). Only for deterministic samplers; a stochastic one does not follow
  the ODE.
- **Sliced W2**: ``testbed.sliced_wasserstein`` between the samples and fresh data draws. Its floor
  is the distance between two independent data sets of the same size, printed under the table.

    rows = run_demo(nfes=(5, 10, 20), samplers=("ddim", "dpmpp_2m"))
    print(format_tables(rows))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from fewstep.samplers.registry import ALIASES, SAMPLERS, resolve_name
from fewstep.samplers.sampler import NFEUnreachable, Sampler
from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.samplers.timesteps import check_steps, make_timesteps
from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution, sliced_wasserstein

__all__ = ["DemoRow", "DemoResult", "run_demo", "format_tables", "main"]

#: Registry entries left out by default, with the reason printed under the tables (name them with
#: ``samplers=`` to see them anyway).
LEFT_OUT: dict[str, str] = {
    "pndm": "its Runge-Kutta warm-up spends 4 model calls per step, so at 5 NFE one RK4 step crosses the whole "
            "trajectory and diverges (RMSE ~145); use plms (improved-Euler warm-up) at few steps",
    "sde_dpmsolver_2m": "noise-prediction SDE solver: diverges below ~10 NFE on this schedule (sliced W2 ~78 at 5)",
    "mrs_data": "MR Sampler solvers are for mean-reverting SDEs (restoration, fewstep.samplers.mr); this problem "
                "is not mean-reverting, where they are the DPM-Solver(++) rows again",
}
for _name in ("mrs_noise", "mrs_sde_data", "mrs_sde_noise"):
    LEFT_OUT[_name] = LEFT_OUT["mrs_data"]

#: Samplers compared by default: the registry in its order, without ``LEFT_OUT``.
DEFAULT_SAMPLERS: tuple[str, ...] = tuple(n for n in SAMPLERS if n not in LEFT_OUT)
#: An ODE error above this (the data's scale is ~1) is a diverged run, flagged under the table.
DIVERGED_RMSE = 10.0
DEFAULT_NFES: tuple[int, ...] = (5, 10, 20)


@dataclass(frozen=True)
class DemoRow:
    """One (sampler, NFE) cell. ``steps`` is None when the sampler cannot spend exactly ``nfe`` calls
    (then both metrics are None); ``ode_rmse`` is None for stochastic samplers."""

    sampler: str
    nfe: int
    steps: int | None
    stochastic: bool
    ode_rmse: float | None
    sliced_w2: float | None
    seconds: float


@dataclass
class DemoResult:
    """The rows plus the setting and the reference numbers a reader needs to judge them."""

    rows: list[DemoRow]
    nfes: tuple[int, ...]
    samplers: tuple[str, ...]
    setting: str
    #: sliced W2 of the exact PF-ODE endpoints to the data (what a perfect ODE solver reaches)
    exact_ode_sliced_w2: float
    #: sliced W2 between two independent data sets of the same size (the metric's noise floor)
    data_floor_sliced_w2: float
    reference_seconds: float

    def __iter__(self):
        return iter(self.rows)

    def cell(self, sampler: str, nfe: int) -> DemoRow:
        for row in self.rows:
            if row.sampler == sampler and row.nfe == nfe:
                return row
        raise KeyError((sampler, nfe))


def check_samplers(names: Sequence[str]) -> tuple[str, ...]:
    """Registry names (aliases resolved), validated (``ValueError`` naming the known ones otherwise)."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in SAMPLERS and n not in ALIASES]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}; expected some of {list(SAMPLERS)} (aliases: {list(ALIASES)})")
    if not names:
        raise ValueError("no samplers given")
    return tuple(dict.fromkeys(resolve_name(n) for n in names))  # an alias is its registry entry


def _rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).reshape(len(x), -1).sum(-1).mean().sqrt())


def run_demo(nfes: Sequence[int] = DEFAULT_NFES, samplers: Sequence[str] = DEFAULT_SAMPLERS, seed: int = 0,
             dim: int = 2, n_components: int = 8, n_samples: int = 2000, timesteps: str | None = None,
             n_projections: int = 256) -> DemoResult:
    """Compare ``samplers`` at each NFE in ``nfes`` on a seeded ``dim``-D mixture of ``n_components``.

    ``timesteps``: a name for ``make_timesteps`` (default: each sampler's default, ``"trailing"`` on
    this discrete schedule). All runs share one ``x_T``; stochastic ones draw noise from ``seed + 1``.
    """
    nfes = tuple(check_steps(n) for n in nfes)
    samplers = check_samplers(samplers)
    if dim < 1 or n_components < 1 or n_samples < 2:
        raise ValueError("need dim >= 1, n_components >= 1, n_samples >= 2")
    if timesteps is not None:
        make_timesteps(timesteps)  # fail early on a bad name
    schedule = DiscreteVPSchedule.from_diffusers_config({})
    mixture = GaussianMixture.random(dim, n_components, seed=seed)
    denoiser = ExactDenoiser(mixture, schedule)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)  # VP prior at t_max: N(0, I)
    data = mixture.sample(n_samples, generator=g)
    data_floor = float(sliced_wasserstein(mixture.sample(n_samples, generator=g), data, n_projections, seed))

    references: dict[float, torch.Tensor] = {}  # exact endpoint per grid start time
    ref_seconds = 0.0

    def reference(t_start: float) -> torch.Tensor:
        nonlocal ref_seconds
        if t_start not in references:
            t0 = time.perf_counter()
            references[t_start] = mixture_pf_ode_solution(mixture, schedule, x_T, t_start, rtol=1e-8, atol=1e-8)
            ref_seconds += time.perf_counter() - t0
        return references[t_start]

    kwargs = {} if timesteps is None else {"timesteps": timesteps}
    rows = []
    for name in samplers:
        for nfe in nfes:
            t0 = time.perf_counter()
            try:
                sampler = Sampler.for_nfe(denoiser, name, nfe, **kwargs)
            except NFEUnreachable:  # any other error is the user's to see
                rows.append(DemoRow(name, nfe, None, SAMPLERS[name].make().stochastic, None, None, 0.0))
                continue
            x0 = sampler.sample(x_T, generator=torch.Generator().manual_seed(seed + 1))
            seconds = time.perf_counter() - t0
            stochastic = sampler.solver.stochastic
            rmse = None if stochastic else _rmse(x0, reference(float(sampler.grid.t[0])))
            sw = float(sliced_wasserstein(x0, data, n_projections, seed))
            rows.append(DemoRow(name, nfe, sampler.steps, stochastic, rmse, sw, seconds))

    exact_sw = float(sliced_wasserstein(reference(float(schedule.t_max)), data, n_projections, seed))
    spacing = timesteps or "trailing"
    setting = (f"{dim}-D Gaussian mixture ({n_components} components, seed {seed}), exact denoiser, "
               f"DDPM linear schedule (1000 steps), {spacing} timesteps, {n_samples} samples")
    return DemoResult(rows, nfes, samplers, setting, exact_sw, data_floor, ref_seconds)


def _fmt(value: float | None, row: DemoRow) -> str:
    if row.steps is None:
        return "-"
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if value < 1e3 else f"{value:.2e}"


def _table(result: DemoResult, metric: str) -> list[str]:
    header = ["sampler"] + [f"NFE {n}" for n in result.nfes]
    body = []
    for name in result.samplers:
        cells = [result.cell(name, nfe) for nfe in result.nfes]
        label = name + (" (sde)" if any(c.stochastic for c in cells) else "")
        body.append([label] + [_fmt(getattr(c, metric), c) for c in cells])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return [line(header), rule] + [line(r) for r in body]


def format_tables(result: DemoResult) -> str:
    """Both tables as Markdown, with the setting and the reference numbers."""
    out = [f"fewstep demo: {result.setting}", "",
           "RMSE to the exact PF-ODE endpoint from the same x_T (lower is better; n/a: stochastic sampler;",
           "-: the sampler cannot spend exactly this many model calls)", ""]
    out += _table(result, "ode_rmse")
    out += ["", "Sliced W2 to fresh data samples (lower is better)", ""]
    out += _table(result, "sliced_w2")
    out += ["",
            f"Exact PF-ODE endpoints from the same x_T: {result.exact_ode_sliced_w2:.3g} (deterministic samplers "
            f"converge to this, not to 0);",
            f"two independent data sets of this size: {result.data_floor_sliced_w2:.3g} (the metric's sampling noise)."]
    diverged = sorted({r.sampler for r in result.rows if r.ode_rmse is not None and r.ode_rmse > DIVERGED_RMSE})
    if diverged:
        out.append(f"Diverged (RMSE > {DIVERGED_RMSE:g}: the steps are too large for the solver): {', '.join(diverged)}.")
    left_out = [n for n in SAMPLERS if n in LEFT_OUT and n not in result.samplers]
    if left_out:
        out += ["", "Left out (name them with --samplers to see them):"]
        out += [f"- {', '.join(n for n in left_out if LEFT_OUT[n] == why)}: {why}"
                for why in dict.fromkeys(LEFT_OUT[n] for n in left_out)]
    return "\n".join(out)


def main(nfe: Sequence[int] = DEFAULT_NFES, samplers: Sequence[str] | None = None, seed: int = 0, dim: int = 2,
         components: int = 8, n_samples: int = 2000, timesteps: str | None = None) -> int:
    """Entry point of ``fewstep demo --testbed``: run, print the tables and the time taken."""
    t0 = time.perf_counter()
    result = run_demo(nfes=nfe, samplers=samplers or DEFAULT_SAMPLERS, seed=seed, dim=dim,
                      n_components=components, n_samples=n_samples, timesteps=timesteps)
    print(format_tables(result))
    print(f"({time.perf_counter() - t0:.1f} s, of which {result.reference_seconds:.1f} s exact ODE reference)")
    return 0
