"""The native sampler interface: a solver over a denoiser and a timestep grid, ``sample(x_T) -> x_0``.

    sampler = Sampler(denoiser, "dpmpp_2m", steps=10)
    sampler.nfe               # 10, known before running
    x0 = sampler.sample(torch.randn(16, 3, 32, 32, generator=g), generator=g)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .denoisers import Denoiser, Prediction
from .registry import make_solver
from .schedules import DiscreteVPSchedule, Schedule
from .solvers import NoiseFn, Solver
from .timesteps import DiffusersSpacing, Grid, LogSNRUniform, Timesteps, check_steps, make_timesteps

__all__ = ["Sampler", "default_timesteps", "run_solver", "randn_noise", "sigma_bar_at"]


def default_timesteps(schedule: Schedule) -> Timesteps:
    """Integer ``"trailing"`` timesteps on discrete schedules (they reach t = T - 1), else log-SNR uniform."""
    return DiffusersSpacing("trailing") if isinstance(schedule, DiscreteVPSchedule) else LogSNRUniform()


def randn_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Standard normal noise drawn from ``generator`` (as diffusers' ``randn_tensor`` does on CPU)."""

    def noise(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    return noise


def sigma_bar_at(grid: Grid, t: float) -> float:
    """``sigma / alpha`` at time ``t``: k-diffusion's VE noise level ``sigma``. A grid point's own value
    where ``t`` is one (bit-equal to ``grid.sigma_bar``), else the grid's schedule at ``t`` (PNDM's
    midpoints)."""
    hits = (grid.t == t).nonzero()
    if len(hits):
        return grid.sigma_bar[hits[0, 0]].item()
    tt = torch.tensor(t, dtype=torch.float64)
    return (grid.schedule.sigma(tt) / grid.schedule.alpha(tt)).item()


def run_solver(solver: Solver, grid: Grid, denoiser: Callable[[Tensor, Any], Prediction], x: Tensor,
               noise: NoiseFn, callback: Callable[[dict], None] | None = None, progress=None) -> Tensor:
    """Drive ``solver`` over ``grid`` from ``x``, calling ``denoiser(x, t)`` once per planned time.

    ``callback`` gets, after every model call, k-diffusion's payload ``{"x", "i", "sigma", "sigma_hat",
    "denoised"}`` plus ours, ``"t"`` and ``"eps"``: ``i`` counts model calls, ``sigma`` is the VE noise
    level ``sigma_t / alpha_t`` of ``x`` at ``t`` (``sigma_bar_at``; for VP schedules the ``sigma`` that
    k-diffusion's wrappers see), ``sigma_hat = sigma`` (no solver here raises the noise level, k-diffusion's
    churn), ``denoised`` and ``eps`` the prediction at ``(x, t)``.
    """
    run = solver.steps(grid, noise)
    _, t = next(run)
    k = 0
    while t is not None:
        pred = denoiser(x, t)
        if callback is not None:
            sigma = sigma_bar_at(grid, t)
            callback({"x": x, "i": k, "sigma": sigma, "sigma_hat": sigma, "denoised": pred.x0, "t": t,
                      "eps": pred.eps})
        x_next, t = run.send((x, pred))
        x, k = x_next, k + 1
        if progress is not None:
            progress.update(1)
    return x


class Sampler:
    """A solver over ``denoiser`` on a timestep grid of ``steps`` steps.

    ``solver``: a registry name or alias (``registry.SAMPLERS``, ``registry.ALIASES``) or a ``Solver``;
    extra keyword options go to the
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
        ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` plus ``"t"``, ``"eps"`` (see ``run_solver``); ``progress`` shows a progress bar over model calls.
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
