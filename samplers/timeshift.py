"""Time-Shift sampling (Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with
Shifted Time Steps", ICLR 2024).

A trained network's samples ``x_t`` drift from the marginal at ``t`` (exposure bias). The sampler
picks, per sample, the time ``t_s`` near the nominal one whose noise level matches the sample's
variance best, ``t_s = argmin_tau (Var(x) - (alpha_tau^2 v + sigma_tau^2))^2`` over a window
(``v``: the data's per-coordinate variance, 0 in the official code, which matches ``1 - abar_tau``).
The official backbones apply it in two ways; both are here, named by what they shift:

- ``"model"`` (``TimeShiftDenoiser``; the DEIS backbone): query the network at ``t_s`` around the
  current time, keep the solver's coefficients nominal (``eps`` from ``t_s``, ``x0`` re-derived at
  ``t``). Works with every sampler, and in diffusers pipelines through ``TimeShiftUNet``.
- ``"target"`` (``TimeShift``; the PNDM/DDIM and ADM backbones): after each step ``i -> i+1``
  retarget the step to ``t_s`` around ``t_{i+1}``, matched to the variance of the *current* sample
  ``x_i`` (as the official code does), by extending the step linearly in ``x / alpha`` against
  ``sigma / alpha``; the next step treats the result as being at the nominal ``t_{i+1}``.

Both skip the first step and every time at or below ``cutoff``, and record the chosen shifts.
Window and cutoff are in the schedule's time units (training-index units for diffusers schedules).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .denoisers import Denoiser, Prediction, broadcast_like
from .registry import make_solver
from .schedules import DiscreteVPSchedule, Schedule
from .solvers import Solver
from .timesteps import Grid

__all__ = ["variance_matched_times", "TimeShiftDenoiser", "TimeShift", "TimeShiftUNet"]

_F64 = torch.float64


def _check_window(window: float, cutoff: float, schedule: Schedule | None = None):
    if not window >= 0:
        raise ValueError(f"time-shift window must be >= 0, got {window}")
    if cutoff is None or not cutoff == cutoff:
        raise ValueError(f"time-shift cutoff must be a number, got {cutoff}")
    if schedule is not None and not schedule.t_min <= cutoff <= schedule.t_max:
        raise ValueError(f"time-shift cutoff {cutoff} lies outside the schedule's times "
                         f"[{schedule.t_min:.6g}, {schedule.t_max:.6g}] (t_max: never shift)")


def variance_matched_times(x: Tensor, t_center: float, schedule: Schedule, window: float,
                           data_variance: float = 0.0, n_candidates: int = 65) -> Tensor:
    """Per-sample ``argmin_tau (Var(x) - (alpha_tau^2 v + sigma_tau^2))^2`` over ``|tau - t_center| <= window/2``.

    ``Var`` is the unbiased variance over all of a sample's coordinates (as the official code). On
    a discrete schedule the candidates are the integer timesteps in the window, else ``n_candidates``
    evenly spaced times. Returns float64 times, shape ``[B]``.
    """
    lo, hi = max(t_center - window / 2, schedule.t_min), min(t_center + window / 2, schedule.t_max)
    if isinstance(schedule, DiscreteVPSchedule):
        candidates = torch.arange(int(torch.ceil(torch.tensor(lo))), int(hi) + 1, dtype=_F64)
        if len(candidates) == 0:
            candidates = torch.tensor([t_center], dtype=_F64)
    else:
        candidates = torch.linspace(lo, hi, n_candidates, dtype=_F64)
    target = schedule.alpha(candidates) ** 2 * data_variance + schedule.sigma(candidates) ** 2
    flat = x.detach().reshape(x.shape[0], -1).to(_F64)
    var = flat.var(dim=1, correction=1 if flat.shape[1] > 1 else 0).cpu()
    best = torch.argmin((var[:, None] - target[None, :]) ** 2, dim=1)
    return candidates[best]


class TimeShiftDenoiser(Denoiser):
    """Model-time shifting: the network sees ``t_s`` (per sample), the solver keeps its nominal ``t``.

    ``window = 0`` (or every ``t <= cutoff``) reproduces ``denoiser`` exactly. ``record`` lists
    ``{"t": nominal, "t_shifted": [B] tensor}`` for every call; ``reset()`` clears it.
    """

    def __init__(self, denoiser: Denoiser, window: float = 30.0, cutoff: float = 300.0, data_variance: float = 0.0,
                 skip_first: bool = True):
        super().__init__()
        _check_window(window, cutoff, denoiser.schedule)
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.window, self.cutoff, self.data_variance, self.skip_first = float(window), float(cutoff), data_variance, skip_first
        self.record: list[dict] = []

    def reset(self):
        self.record = []

    def forward(self, x: Tensor, t) -> Prediction:
        t = torch.as_tensor(t, dtype=_F64)
        first = self.skip_first and t.ndim == 0 and float(t) >= self.schedule.t_max - 1e-9
        if self.window == 0 or t.ndim != 0 or float(t) <= self.cutoff or first:
            self.record.append({"t": t.clone(), "t_shifted": t.expand(x.shape[0]).clone()})
            return self.denoiser(x, t)
        t_s = variance_matched_times(x, float(t), self.schedule, self.window, self.data_variance)
        self.record.append({"t": t.clone(), "t_shifted": t_s})
        eps = self.denoiser(x, t_s).eps
        alpha, sigma = self.coefficients(t, x)
        return Prediction(eps=eps, x=x, alpha=broadcast_like(alpha, x), sigma=broadcast_like(sigma, x))


class TimeShift(Solver):
    """Target-time shifting around any deterministic solver (by name or instance).

    After step ``i -> i+1`` (``i >= 1``, ``t_{i+1} > cutoff``, not the step to clean data) the result
    is moved along the step's own direction in ``(sigma_bar, x / alpha)`` to the variance-matched
    ``t_s`` near ``t_{i+1}``. Every solver step here starts from ``x_i`` and is linear in
    ``x / alpha`` along ``sigma_bar`` through its result (DDIM, PNDM, DPM-Solver++ alike), so this
    is the official "transfer to t_next" for all of them. ``window = 0`` is the wrapped solver.
    """

    name = "time_shift"

    def __init__(self, solver: str | Solver, window: float = 30.0, cutoff: float = 300.0, data_variance: float = 0.0,
                 **solver_options):
        _check_window(window, cutoff)
        self.solver = make_solver(solver, **solver_options)
        if self.solver.stochastic:
            raise ValueError(f"target-time shifting needs a deterministic solver, not {self.solver!r} "
                             "(use TimeShiftDenoiser, model-time shifting, with stochastic samplers)")
        self.window, self.cutoff, self.data_variance = float(window), float(cutoff), data_variance
        self.record: list[dict] = []

    def _step_starts(self, grid: Grid) -> list[int]:
        """Index in the plan of the call that starts each step (where the solver holds ``x_i``): the last
        call at ``t_i`` before the first call below ``t_i`` (Heun and PNDM call twice at a grid time)."""
        plan, starts = self.solver.plan(grid), []
        for i in range(grid.n_steps):
            t_i = float(grid.t[i])
            below = next((k for k, tk in enumerate(plan) if tk < t_i), len(plan))
            at = [k for k in range(below) if plan[k] == t_i]
            if not at:
                raise ValueError(f"{self.solver!r} does not call the model at grid time {t_i}; cannot time-shift it")
            starts.append(at[-1])
        return starts

    def steps(self, grid, noise):
        _check_window(self.window, self.cutoff, grid.schedule)
        self.record = []
        starts = self._step_starts(grid)
        boundary = {k: i for i, k in enumerate(starts)}
        t, alpha, sigma = grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist()
        run = self.solver.steps(grid, noise)
        x_out, t_eval = next(run)
        x_i, k = None, 0
        while t_eval is not None:
            x, pred = yield x_out, t_eval
            if k in boundary:
                x_i, i = x, boundary[k]
            x_out, t_eval = run.send((x, pred))
            k += 1
            ends_step = (k in boundary) or t_eval is None
            if ends_step and self._applies(i, grid):
                x_out = self._retarget(x_i, x_out, i, t, alpha, sigma, grid.schedule)
        yield x_out, None

    def _applies(self, i: int, grid: Grid) -> bool:
        t_next = float(grid.t[i + 1])
        return self.window > 0 and i >= 1 and float(grid.sigma[i + 1]) > 0 and t_next > self.cutoff

    def _retarget(self, x_i, x_next, i, t, alpha, sigma, schedule) -> Tensor:
        sb_i, sb_next = sigma[i] / alpha[i], sigma[i + 1] / alpha[i + 1]
        slope = (x_next / alpha[i + 1] - x_i / alpha[i]) / (sb_next - sb_i)
        t_s = variance_matched_times(x_i, t[i + 1], schedule, self.window, self.data_variance)
        self.record.append({"t": t[i + 1], "t_shifted": t_s})
        a_s, s_s = schedule.alpha(t_s), schedule.sigma(t_s)
        sb_s = broadcast_like(s_s / a_s, x_i)
        return broadcast_like(a_s, x_i) * (x_i / alpha[i] + (sb_s - sb_i) * slope)

    def options(self) -> dict:
        return {"solver": self.solver, "window": self.window, "cutoff": self.cutoff,
                "data_variance": self.data_variance}


class TimeShiftUNet(nn.Module):
    """Model-time shifting inside a diffusers pipeline: ``pipe.unet = TimeShiftUNet(pipe.unet,
    pipe.scheduler.config, window=30, cutoff=300)``. Each call replaces the timestep by the per-sample
    variance-matched one; the scheduler keeps the nominal step (so eps-prediction networks only)."""

    def __init__(self, unet: nn.Module, scheduler_config, window: float = 30.0, cutoff: float = 300.0,
                 data_variance: float = 0.0):
        super().__init__()
        if dict(scheduler_config).get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("TimeShiftUNet keeps the scheduler's nominal coefficients: eps prediction only")
        self.unet = unet
        self.schedule = DiscreteVPSchedule.from_diffusers_config(scheduler_config)
        _check_window(window, cutoff, self.schedule)
        self.window, self.cutoff, self.data_variance = float(window), float(cutoff), data_variance
        self.record: list[dict] = []

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample: Tensor, timestep, *args, **kwargs):
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        if self.window > 0 and self.cutoff < t < self.schedule.t_max:
            t_s = variance_matched_times(sample, t, self.schedule, self.window, self.data_variance)
            self.record.append({"t": t, "t_shifted": t_s})
            timestep = t_s.to(device=sample.device, dtype=torch.float32)
        return self.unet(sample, timestep, *args, **kwargs)
