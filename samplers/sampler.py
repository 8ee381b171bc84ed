"""The native sampler interface: a solver over a denoiser and a timestep grid, ``sample(x_T) -> x_0``.

    sampler = Sampler(denoiser, "dpmpp_2m", steps=10)
    sampler.nfe               # 10, known before running
    x0 = sampler.sample(torch.randn(16, 3, 32, 32, generator=g), generator=g)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .denoisers import Denoiser, Prediction
from .schedules import DiscreteVPSchedule, Schedule
from .solvers import DDIM, DDPM, PNDM, DPMSolverPP, Euler, Heun, NoiseFn, SDEDPMSolverPP, Solver
from .timesteps import DiffusersSpacing, Grid, LogSNRUniform, Timesteps, check_steps, make_timesteps

__all__ = ["Sampler", "SAMPLERS", "SamplerSpec", "make_solver", "default_timesteps", "run_solver", "randn_noise"]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its solver factory, options fixed by the name, overridable defaults,
    and a one-line description."""

    factory: Callable[..., Solver]
    fixed: dict
    summary: str
    defaults: dict = field(default_factory=dict)

    def make(self, **options) -> Solver:
        clash = set(options) & set(self.fixed)
        if clash:
            raise ValueError(f"options {sorted(clash)} are fixed by this sampler's name")
        return self.factory(**{**self.defaults, **options}, **self.fixed)


#: Name -> spec. ``fewstep samplers`` lists this table.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(DDIM, {}, "DDIM (Song et al. 2021); eta=0 deterministic, eta>0 stochastic"),
    "ddpm": SamplerSpec(DDPM, {}, "DDPM ancestral sampling (Ho et al. 2020); variance='small'|'large'"),
    "dpmpp_2m": SamplerSpec(DPMSolverPP, {"order": 2}, "DPM-Solver++(2M) (Lu et al. 2022b), second order"),
    "dpmpp_3m": SamplerSpec(DPMSolverPP, {"order": 3}, "DPM-Solver++(3M), third order"),
    "sde_dpmpp_2m": SamplerSpec(SDEDPMSolverPP, {"order": 2}, "SDE-DPM-Solver++(2M), stochastic"),
    "pndm": SamplerSpec(PNDM, {}, "PNDM / F-PNDM (Liu et al. 2022): RK warm-up, then AB4", {"warmup": "prk"}),
    "plms": SamplerSpec(PNDM, {}, "PLMS: improved-Euler warm-up, then AB2..AB4 (diffusers skip_prk_steps)",
                        {"warmup": "heun"}),
    "euler": SamplerSpec(Euler, {}, "Euler on the PF ODE in sigma_bar (Karras et al. 2022)"),
    "heun": SamplerSpec(Heun, {}, "Heun's 2nd-order method (Karras et al. 2022, Algorithm 1)"),
}


def make_solver(name: str | Solver, **options) -> Solver:
    """A solver by registry name (``SAMPLERS``) with its options; a ``Solver`` passes through."""
    if isinstance(name, Solver):
        if options:
            raise ValueError("options are only accepted with a sampler name, not a Solver instance")
        return name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[name].make(**options)
    except TypeError as err:  # an option the solver does not take
        raise ValueError(f"bad option for sampler {name!r}: {err}") from None


def default_timesteps(schedule: Schedule) -> Timesteps:
    """Integer ``"trailing"`` timesteps on discrete schedules (they reach t = T - 1), else log-SNR uniform."""
    return DiffusersSpacing("trailing") if isinstance(schedule, DiscreteVPSchedule) else LogSNRUniform()


def randn_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Standard normal noise drawn from ``generator`` (as diffusers' ``randn_tensor`` does on CPU)."""

    def noise(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    return noise


def run_solver(solver: Solver, grid: Grid, denoiser: Callable[[Tensor, Any], Prediction], x: Tensor,
               noise: NoiseFn, callback: Callable[[dict], None] | None = None, progress=None) -> Tensor:
    """Drive ``solver`` over ``grid`` from ``x``, calling ``denoiser(x, t)`` once per planned time."""
    run = solver.steps(grid, noise)
    _, t = next(run)
    k = 0
    while t is not None:
        pred = denoiser(x, t)
        if callback is not None:
            callback({"i": k, "t": t, "x": x, "denoised": pred.x0, "eps": pred.eps})
        x_next, t = run.send((x, pred))
        x, k = x_next, k + 1
        if progress is not None:
            progress.update(1)
    return x


class Sampler:
    """A solver over ``denoiser`` on a timestep grid of ``steps`` steps.

    ``solver``: a registry name (``SAMPLERS``) or a ``Solver``; extra keyword options go to the
    solver (e.g. ``eta=0.5``). ``timesteps``: a ``Timesteps`` or its name (default:
    ``default_timesteps``). ``final``: ``"zero"`` ends at clean data, ``"t_min"`` at the schedule's
    smallest time. ``nfe`` (model calls) is known before running.
    """

    def __init__(self, denoiser: Denoiser, solver: str | Solver = "dpmpp_2m", steps: int = 10,
                 timesteps: str | Timesteps | None = None, final: str = "zero", **solver_options):
        self.denoiser = denoiser
        self.schedule: Schedule = denoiser.schedule
        self.solver = make_solver(solver, **solver_options)
        self.steps = check_steps(steps)
        self.timesteps = default_timesteps(self.schedule) if timesteps is None else make_timesteps(timesteps)
        self.final = final
        self.grid = self.timesteps.grid(self.schedule, self.steps, final=final)
        self.plan = self.solver.plan(self.grid)

    @property
    def nfe(self) -> int:
        return len(self.plan)

    @classmethod
    def for_nfe(cls, denoiser: Denoiser, solver: str | Solver, nfe: int, **kwargs) -> "Sampler":
        """The sampler with exactly ``nfe`` model calls (raises if the solver cannot spend that many)."""
        nfe = check_steps(nfe)
        for steps in range(nfe, 0, -1):
            try:
                candidate = cls(denoiser, solver, steps=steps, **kwargs)
            except ValueError:
                continue
            if candidate.nfe == nfe:
                return candidate
            if candidate.nfe < nfe:
                break
        raise ValueError(f"sampler {solver!r} cannot be run with exactly {nfe} model calls")

    @torch.no_grad()
    def sample(self, x_T: Tensor, generator: torch.Generator | None = None, noise: NoiseFn | None = None,
               callback: Callable[[dict], None] | None = None, progress: bool = False) -> Tensor:
        """Integrate from ``x_T`` (noise at the grid's first time, scaled for ``alpha``/``sigma`` there:
        ``x_T = sigma(t_0) z`` plus signal; for VP ``z`` itself is standard) to the endpoint.

        ``noise`` (or ``generator``) feeds stochastic solvers; ``callback`` gets k-diffusion's payload
        ``{"i", "t", "x", "denoised", "eps"}``; ``progress`` shows a progress bar over model calls.
        """
        if not torch.is_tensor(x_T) or x_T.ndim < 1:
            raise ValueError("x_T must be a batched tensor")
        dtype = x_T.dtype
        x = x_T.float() if dtype in (torch.float16, torch.bfloat16) else x_T  # solver math in >= fp32
        noise = noise if noise is not None else randn_noise(generator)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.nfe, desc=f"{self.solver.name} ({self.nfe} NFE)")
        try:
            out = run_solver(self.solver, self.grid, self.denoiser, x, noise, callback, bar)
        finally:
            if bar is not None:
                bar.close()
        return out.to(dtype)

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``x_T`` from the prior: standard normal for VP schedules (diffusers' ``init_noise_sigma = 1``),
        ``sigma(t_0) z`` otherwise (EDM / flow matching, where the signal is negligible at ``t_0``)."""
        z = torch.randn(shape, generator=generator, device=device)
        return z if self.schedule.variance_preserving else z * float(self.grid.sigma[0])

    def __repr__(self) -> str:
        return (f"Sampler({self.solver!r}, steps={self.steps}, nfe={self.nfe}, timesteps={self.timesteps!r}, "
                f"final={self.final!r})")
