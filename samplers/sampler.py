"""The native sampler interface: a solver over a denoiser and a timestep grid, ``sample(x_T) -> x_0``.

    sampler = Sampler(denoiser, "dpmpp_2m", steps=10)
    sampler.nfe               # 10, known before running
    x0 = sampler.sample(torch.randn(16, 3, 32, 32, generator=g), generator=g)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .denoisers import Denoiser, Prediction
from .registry import make_solver
from .schedules import DiscreteVPSchedule, FlowMatchingSchedule, Schedule
from .solvers import NoiseFn, Solver
from .timesteps import DiffusersSpacing, FlowUniform, Grid, LogSNRUniform, Timesteps, check_steps, make_timesteps

__all__ = ["Sampler", "NFEUnreachable", "NonFiniteModelOutput", "default_timesteps", "run_solver", "randn_noise", "sigma_bar_at"]


class NFEUnreachable(ValueError):
    """The solver runs, but no number of steps spends exactly the asked number of model calls."""


class NonFiniteModelOutput(RuntimeWarning):
    """The model returned NaN or inf during sampling (``Sampler.sample`` names the first such call)."""


def default_timesteps(schedule: Schedule) -> Timesteps:
    """Integer ``"trailing"`` timesteps on discrete schedules (they reach t = T - 1); on a flow schedule that
    reaches pure noise (``t = 1``, where log-SNR is -inf) FlowMatchEuler's uniform grid (``FlowUniform``);
    else log-SNR uniform."""
    if isinstance(schedule, DiscreteVPSchedule):
        return DiffusersSpacing("trailing")
    if isinstance(schedule, FlowMatchingSchedule) and schedule.t_max == 1:
        return FlowUniform()
    return LogSNRUniform()


def randn_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Standard normal noise drawn from ``generator`` (as diffusers' ``randn_tensor`` does on CPU)."""

    def noise(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    return noise


def sigma_bar_at(grid: Grid, t: float | Tensor) -> float | Tensor:
    """``sigma / alpha`` at time ``t``: k-diffusion's VE noise level ``sigma``. A grid point's own value
    where ``t`` is one (bit-equal to ``grid.sigma_bar``), else the grid's schedule at ``t`` (PNDM's
    midpoints)."""
    if torch.is_tensor(t) and t.ndim > 0:  # per-sample times (Time-Shift's shifted stages)
        t = t.to(torch.float64)
        return grid.schedule.sigma(t) / grid.schedule.alpha(t)
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
    def for_nfe(cls, denoiser: Denoiser, solver: str | Solver, nfe: int, timesteps: str | Timesteps | None = None,
                **kwargs) -> "Sampler":
        """The sampler with exactly ``nfe`` model calls. ``NFEUnreachable`` when the solver runs but no
        number of steps spends exactly that many; any other error (an unknown sampler, timestep grid or
        option, a bad option value) is raised as it is, never hidden behind the NFE."""
        nfe = check_steps(nfe)
        options = {k: v for k, v in kwargs.items() if k != "final"}
        make_solver(solver, **options)  # unknown names and bad options fail here, with their own message
        if timesteps is not None:
            make_timesteps(timesteps)
        first_error = None
        built = False
        for steps in range(nfe, 0, -1):
            try:
                candidate = cls(denoiser, solver, steps=steps, timesteps=timesteps, **kwargs)
            except ValueError as err:  # some step counts may not exist on a grid; others may
                first_error = first_error or err
                continue
            built = True
            if candidate.nfe == nfe:
                return candidate
            if candidate.nfe < nfe:
                break
        if not built and first_error is not None:
            raise first_error  # no step count works at all: the cause is not the NFE
        raise NFEUnreachable(f"sampler {solver!r} cannot be run with exactly {nfe} model calls")

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
        if not torch.is_floating_point(x_T):
            raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype} (integer noise would be "
                             "sampled and returned as truncated integers); pass x_T.float()")
        if not torch.isfinite(x_T).all():
            raise ValueError("x_T contains NaN or inf; every sample from it would be NaN")
        dtype = x_T.dtype
        x = x_T.float() if dtype in (torch.float16, torch.bfloat16) else x_T  # solver math in >= fp32
        noise = noise if noise is not None else randn_noise(generator)
        finite, times = [], []  # per model call: a 0-d bool tensor (no device sync until the end)

        def checked(x, t):
            pred = self.denoiser(x, t)
            raw = getattr(pred, "_x0", None)  # what the model returned, unconverted (no extra conversion)
            raw = raw if raw is not None else getattr(pred, "_eps", None)
            if raw is not None:
                finite.append(torch.isfinite(raw).all())
                times.append(t)
            return pred

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.nfe, desc=f"{self.solver.name} ({self.nfe} NFE)")
        try:
            out = run_solver(self.solver, self.grid, checked, x, noise, callback, bar)
        finally:
            if bar is not None:
                bar.close()
        if finite and not bool(torch.stack(finite).all()):
            i = int((~torch.stack(finite)).nonzero()[0, 0])
            t = times[i]
            warnings.warn(f"the model returned NaN or inf at model call {i + 1} of {len(finite)} "
                          f"(t={float(t):.6g}); the samples from it are not finite", NonFiniteModelOutput,
                          stacklevel=2)
        return out.to(dtype)

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``x_T`` from the prior: standard normal for VP schedules (diffusers' ``init_noise_sigma = 1``),
        ``sigma(t_0) z`` otherwise (EDM / flow matching, where the signal is negligible at ``t_0``)."""
        z = torch.randn(shape, generator=generator, device=device)
        return z if self.schedule.variance_preserving else z * float(self.grid.sigma[0])

    def __repr__(self) -> str:
        return (f"Sampler({self.solver!r}, steps={self.steps}, nfe={self.nfe}, timesteps={self.timesteps!r}, "
                f"final={self.final!r})")
