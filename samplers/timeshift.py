"""Time-Shift sampling (Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with
Shifted Time Steps", ICLR 2024).

A trained network's samples ``x_t`` drift from the marginal at ``t`` (exposure bias). The sampler
picks, per sample, the time ``t_s`` near the nominal one whose noise level matches the sample's
variance best, ``t_s = argmin_tau (Var(x) - (alpha_tau^2 v + sigma_tau^2))^2`` over a window
(``v``: the data's per-coordinate variance, 0 in the official code, which matches ``1 - abar_tau``).
The official backbones apply it in four ways; all are here, named by what they shift:

- ``"model"`` (``TimeShiftDenoiser``; the DEIS backbone): query the network at ``t_s`` around the
  current time, keep the solver's coefficients nominal (``eps`` from ``t_s``, ``x0`` re-derived at
  ``t``). Works with every sampler, and in diffusers pipelines through ``TimeShiftUNet``.
- ``"target"`` (``TimeShift``): move the end of each step to a variance-matched time, by the rule of
  one backbone: ``rule="pndm"`` (TS-DPM's DDIM/PNDM loop: window around ``t_{i+1}``, variance of the
  step's start ``x_i``; the default), ``"adm"`` (TS-DPM-ADM: window around the current ``t_i``) or
  ``"dpm_solver"`` (TS-DPM's DPM-Solver: variance of the noise prediction, the sample re-timed).

Model-time skips the first model call of a run (``skip_first``), target-time the first step; both
skip every time at or below ``cutoff`` and record the chosen shifts. Window and cutoff are in the
schedule's time units (training-index units for diffusers schedules). The departures from the
official code that remain are listed in docs/faithfulness.md.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .denoisers import Denoiser, Prediction, broadcast_like
from .registry import make_solver
from .schedules import DiscreteVPSchedule, Schedule
from .solvers import PNDM, DPMSolver, DPMSolverPP, Solver, _multistep_order
from .updates import dpmpp_first_order, dpmpp_second_order, dpmsolver_first_order, dpmsolver_second_order
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


class _FirstCall:
    """Tells the first model call of each run: the first after construction or ``reset()``, or a call at
    a time above the previous call's (times never increase within a run). Two consecutive runs of one
    step at the same time look like one run: call ``reset()`` between them."""

    def __init__(self):
        self.last = None

    def __call__(self, t: float) -> bool:
        first = self.last is None or t > self.last
        self.last = t
        return first


class TimeShiftDenoiser(Denoiser):
    """Model-time shifting: the network sees ``t_s`` (per sample), the solver keeps its nominal ``t``.

    ``skip_first=True`` never shifts the first model call of a run, wherever the grid starts (see
    ``_FirstCall``); ``False`` shifts it too, as the official DEIS backbone does. ``window = 0`` (or
    every ``t <= cutoff``) reproduces ``denoiser`` exactly. ``record`` lists ``{"t": nominal,
    "t_shifted": [B] tensor}`` for every call; ``reset()`` clears it and starts a new run.
    """

    def __init__(self, denoiser: Denoiser, window: float = 30.0, cutoff: float = 300.0, data_variance: float = 0.0,
                 skip_first: bool = True):
        super().__init__()
        _check_window(window, cutoff, denoiser.schedule)
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.window, self.cutoff, self.data_variance, self.skip_first = float(window), float(cutoff), data_variance, skip_first
        self.record: list[dict] = []
        self._first = _FirstCall()

    def reset(self):
        self.record = []
        self._first = _FirstCall()

    def forward(self, x: Tensor, t) -> Prediction:
        t = torch.as_tensor(t, dtype=_F64)
        first = t.ndim == 0 and self._first(float(t)) and self.skip_first
        if self.window == 0 or t.ndim != 0 or float(t) <= self.cutoff or first:
            self.record.append({"t": t.clone(), "t_shifted": t.expand(x.shape[0]).clone()})
            return self.denoiser(x, t)
        t_s = variance_matched_times(x, float(t), self.schedule, self.window, self.data_variance)
        self.record.append({"t": t.clone(), "t_shifted": t_s})
        eps = self.denoiser(x, t_s).eps
        alpha, sigma = self.coefficients(t, x)
        return Prediction(eps=eps, x=x, alpha=broadcast_like(alpha, x), sigma=broadcast_like(sigma, x))


#: Target-time rules of the official backbones (TS-DPM and TS-DPM-ADM); see ``TimeShift``.
RULES = ("pndm", "adm", "dpm_solver")


class TimeShift(Solver):
    """Target-time shifting around a deterministic solver (by name or instance), by one of the official
    backbones' rules (``rule``):

    - ``"pndm"`` (TS-DPM's ``PNMSolver``, DDIM and PNDM): after step ``i -> i+1`` (``i >= 1``,
      ``t_{i+1} > cutoff``, not the step to clean data) the step ends at the time ``t_s`` matched to
      the variance of the step's *start* ``x_i`` in a window around ``t_{i+1}``; the next step treats
      the result as being at the nominal ``t_{i+1}``.
    - ``"adm"`` (TS-DPM-ADM's ``ddim_sample``): the window is centred on the *current* time: ``t_s``
      matched to ``Var(x_i)`` around ``t_i``, gated by ``t_i > cutoff`` (``i >= 1``), and the step ends at
      ``t_{i+1} + (t_s - t_i)``; the next step again starts from the nominal ``t_{i+1}``.
    - ``"dpm_solver"`` (TS-DPM's DPM-Solver backbone; ``dpmsolver_2m`` / ``dpmpp_2m`` only): from step
      ``i = order - 1`` on, the target is matched to the variance of the solver's newest *prediction*
      (the noise prediction in the official code: ``variance_of="prediction"``; ``"x"`` takes the
      sample's), in a window around ``t_{i+1}``; the sample is then *re-timed*: the next model call and
      the next steps' log-SNR steps use the shifted time (per sample).

    ``prk`` (``rule="pndm"`` on PNDM's Runge-Kutta warm-up): ``"official"`` places the warm-up step's
    stages between ``t_i`` and the shifted end, as TS-DPM does; ``"stretch"`` (fewstep's earlier rule) runs
    the step to ``t_{i+1}`` and extends its chord to ``t_s``. Every other step of DDIM, PNDM, PLMS and
    the DPM-Solver family is linear in ``x / alpha`` along ``sigma_bar`` through its result, so
    extending the chord to ``t_s`` *is* the official transfer to ``t_s`` for them; for multi-stage
    solvers (Heun, PLMS's first step, RK warm-ups under ``"stretch"``) it is an approximation.

    ``prk_midpoint`` (``prk="official"``): where the warm-up's stage time ``(t_i + t_s) / 2`` falls between
    training steps, ``"interpolate"`` (the default) moves the sample to the schedule interpolated at that
    time, the time the network is given; ``"floor"`` moves it to ``alphas_cumprod`` at the floor of that
    time while the network still gets the fractional time, as the official ``transfer`` does
    (``alphas_cump[t.long()]``). Discrete schedules only; docs/faithfulness.md gives the difference.
    ``window = 0`` is the wrapped solver. ``record`` lists ``{"t", "t_shifted"}`` per shifted step.
    """

    name = "time_shift"

    def __init__(self, solver: str | Solver, window: float = 30.0, cutoff: float = 300.0, data_variance: float = 0.0,
                 rule: str = "pndm", prk: str = "official", variance_of: str | None = None,
                 prk_midpoint: str = "interpolate", **solver_options):
        _check_window(window, cutoff)
        if rule not in RULES:
            raise ValueError(f"unknown time-shift rule {rule!r}; expected one of {RULES}")
        if prk not in ("official", "stretch"):
            raise ValueError(f"unknown prk {prk!r}; expected 'official' or 'stretch'")
        if prk_midpoint not in ("interpolate", "floor"):
            raise ValueError(f"unknown prk_midpoint {prk_midpoint!r}; expected 'interpolate' or 'floor'")
        if prk_midpoint == "floor" and (rule, prk) != ("pndm", "official"):
            raise ValueError("prk_midpoint='floor' is the official PNDM loop's rule: it needs rule='pndm', "
                             f"prk='official', not rule={rule!r}, prk={prk!r}")
        variance_of = variance_of or ("prediction" if rule == "dpm_solver" else "x")
        if variance_of not in ("x", "prediction") or (variance_of == "prediction" and rule != "dpm_solver"):
            raise ValueError(f"variance_of={variance_of!r}: 'x', or 'prediction' with rule='dpm_solver'")
        self.solver = make_solver(solver, **solver_options)
        if self.solver.stochastic:
            raise ValueError(f"target-time shifting needs a deterministic solver, not {self.solver!r} "
                             "(use TimeShiftDenoiser, model-time shifting, with stochastic samplers)")
        if rule == "dpm_solver" and not (isinstance(self.solver, (DPMSolver, DPMSolverPP)) and self.solver.order <= 2):
            raise ValueError(f"rule='dpm_solver' re-times DPM-Solver (dpmsolver_2m) or DPM-Solver++ of order 1-2, "
                             f"not {self.solver!r}")
        self.window, self.cutoff, self.data_variance = float(window), float(cutoff), data_variance
        self.rule, self.prk, self.variance_of, self.prk_midpoint = rule, prk, variance_of, prk_midpoint
        self.record: list[dict] = []

    def steps(self, grid, noise):
        _check_window(self.window, self.cutoff, grid.schedule)
        self.record = []
        if self.rule == "dpm_solver":
            return (yield from self._retimed_steps(grid))
        if self.rule == "pndm" and self.prk == "official" and isinstance(self.solver, PNDM):
            stages = _floored(grid) if self.prk_midpoint == "floor" else grid
            return (yield from self.solver.steps(stages, noise, target=lambda i, x: self._pndm_target(i, x, grid)))
        return (yield from self._stretched_steps(grid, noise))

    def _shifted(self, x: Tensor, center: float, nominal: float, schedule) -> Tensor:
        t_s = variance_matched_times(x, center, schedule, self.window, self.data_variance)
        target = (t_s + (nominal - center)).clamp(schedule.t_min, schedule.t_max)
        self.record.append({"t": nominal, "t_shifted": target})
        return target

    def _pndm_target(self, i: int, x_i: Tensor, grid: Grid) -> Tensor | None:
        if not (self.window > 0 and i >= 1 and float(grid.sigma[i + 1]) > 0 and float(grid.t[i + 1]) > self.cutoff):
            return None
        t_next = float(grid.t[i + 1])
        return self._shifted(x_i, t_next, t_next, grid.schedule)

    def _target(self, i: int, x_i: Tensor, grid: Grid) -> Tensor | None:
        """The shifted end of step ``i`` (per sample) under ``rule``, or None where it is not shifted."""
        if self.rule == "pndm":
            return self._pndm_target(i, x_i, grid)
        t_i = float(grid.t[i])
        if not (self.window > 0 and i >= 1 and float(grid.sigma[i + 1]) > 0 and t_i > self.cutoff):
            return None
        return self._shifted(x_i, t_i, float(grid.t[i + 1]), grid.schedule)

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

    def _stretched_steps(self, grid, noise):
        """Run the wrapped solver to the nominal grid and extend each shifted step's chord to its target."""
        starts = self._step_starts(grid)
        boundary = {k: i for i, k in enumerate(starts)}
        alpha, sigma = grid.alpha.tolist(), grid.sigma.tolist()
        run = self.solver.steps(grid, noise)
        x_out, t_eval = next(run)
        x_i, k = None, 0
        while t_eval is not None:
            x, pred = yield x_out, t_eval
            if k in boundary:
                x_i, i = x, boundary[k]
            x_out, t_eval = run.send((x, pred))
            k += 1
            if (k in boundary) or t_eval is None:
                target = self._target(i, x_i, grid)
                if target is not None:
                    x_out = _extend_chord(x_i, x_out, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], target,
                                          grid.schedule)
        yield x_out, None

    def _retimed_steps(self, grid):
        """DPM-Solver's multistep loop with TS-DPM's re-timing: each sample carries its own current time."""
        solver, schedule = self.solver, grid.schedule
        n, t = grid.n_steps, grid.t.tolist()
        cur_t = torch.tensor(t[0], dtype=_F64)  # scalar, then per-sample once a step is shifted
        history, lams, x_next = [], [], None
        for i in range(n):
            x, pred = yield x_next, (float(cur_t) if cur_t.ndim == 0 else cur_t)
            history = (history + [getattr(pred, solver.prediction)])[-2:]
            nxt = torch.tensor(t[i + 1], dtype=_F64)
            last = float(grid.sigma[i + 1]) == 0
            if self.window > 0 and i + 1 >= solver.order and not last and t[i + 1] > self.cutoff:
                watched = history[-1] if self.variance_of == "prediction" else x
                nxt = self._shifted(watched, t[i + 1], t[i + 1], schedule)
            a, s = _coefficients(schedule, cur_t, grid, i)
            a1, s1 = _coefficients(schedule, nxt, grid, i + 1)
            lam, lam1 = torch.log(a) - torch.log(s), torch.log(a1) - torch.log(s1)
            lams = (lams + [lam])[-2:]
            order = _multistep_order(i, n, solver.order, solver.lower_order_final, grid.ends_at_data,
                                     solver.order_rule)
            x_next = _per_sample_update(solver, x, history, lams, lam1, (a, s, a1, s1), order)
            cur_t = nxt
        yield x_next, None

    def options(self) -> dict:
        return {"solver": self.solver, "window": self.window, "cutoff": self.cutoff,
                "data_variance": self.data_variance, "rule": self.rule, "prk": self.prk,
                "variance_of": self.variance_of, "prk_midpoint": self.prk_midpoint}


class _FlooredSchedule:
    """A discrete schedule read as the official ``transfer`` reads it: ``alphas_cumprod`` at ``floor(t)``.
    Only off-grid reads (PNDM's warm-up stages and the moved ends) go through it; the grid's own
    ``alpha`` / ``sigma`` stay as they are."""

    def __init__(self, schedule: DiscreteVPSchedule):
        self.schedule, self.t_min, self.t_max = schedule, schedule.t_min, schedule.t_max

    def alpha(self, t) -> Tensor:
        return self.schedule.alpha(torch.floor(self.schedule.check_times(t)))

    def sigma(self, t) -> Tensor:
        return self.schedule.sigma(torch.floor(self.schedule.check_times(t)))


def _floored(grid: Grid) -> Grid:
    if not isinstance(grid.schedule, DiscreteVPSchedule):
        raise ValueError("prk_midpoint='floor' reads alphas_cumprod at an integer time: it needs a discrete "
                         f"schedule, not {grid.schedule!r}")
    return dataclasses.replace(grid, schedule=_FlooredSchedule(grid.schedule))


def _extend_chord(x_i, x_next, a_i, s_i, a_next, s_next, t_s, schedule) -> Tensor:
    """Move ``x_next`` along the step's chord in ``(sigma_bar, x / alpha)`` to the times ``t_s``."""
    sb_i, sb_next = s_i / a_i, s_next / a_next
    slope = (x_next / a_next - x_i / a_i) / (sb_next - sb_i)
    a_s, s_s = schedule.alpha(t_s), schedule.sigma(t_s)
    sb_s = broadcast_like(s_s / a_s, x_i)
    return broadcast_like(a_s, x_i) * (x_i / a_i + (sb_s - sb_i) * slope)


def _coefficients(schedule, t: Tensor, grid: Grid, i: int):
    """``(alpha, sigma)`` at ``t`` (scalar or per sample) as float64 tensors; grid point ``i``'s own values
    where ``t`` is that grid point (clean data has no time)."""
    if t.ndim == 0 and (float(t) == float(grid.t[i]) or float(grid.sigma[i]) == 0):
        return grid.alpha[i].clone(), grid.sigma[i].clone()
    return schedule.alpha(t), schedule.sigma(t)


def _per_sample_update(solver, x, history, lams, lam1, ends, order) -> Tensor:
    """One DPM-Solver(++) step with per-sample times: the same update functions, sample by sample."""
    a, s, a1, s1 = (c.expand(x.shape[0]) if c.ndim == 0 else c for c in ends)
    lam_now, lam_prev = (v.expand(x.shape[0]) if v.ndim == 0 else v for v in (lams[-1], lams[0]))
    lam1 = lam1.expand(x.shape[0]) if lam1.ndim == 0 else lam1
    first = dpmsolver_first_order if solver.prediction == "eps" else dpmpp_first_order
    second = dpmsolver_second_order if solver.prediction == "eps" else dpmpp_second_order
    out = []
    for b in range(x.shape[0]):
        e = [m[b:b + 1] for m in history]
        sc = (float(a[b]), float(s[b]), float(a1[b]), float(s1[b]))
        h = float(lam1[b] - lam_now[b])
        if order == 1 or len(history) < 2:
            out.append(first(x[b:b + 1], e[-1], *sc, h))
        else:
            out.append(second(x[b:b + 1], e[-1], e[-2], *sc, h, float(lam_now[b] - lam_prev[b]), solver.solver_type))
    return torch.cat(out)


class TimeShiftUNet(nn.Module):
    """Model-time shifting inside a diffusers pipeline: ``pipe.unet = TimeShiftUNet(pipe.unet,
    pipe.scheduler.config, window=30, cutoff=300)``. Each call replaces the timestep by the per-sample
    variance-matched one; the scheduler keeps the nominal step (so eps-prediction networks only).
    ``skip_first`` as ``TimeShiftDenoiser``'s: the first call of each pipeline run is not shifted."""

    def __init__(self, unet: nn.Module, scheduler_config, window: float = 30.0, cutoff: float = 300.0,
                 data_variance: float = 0.0, skip_first: bool = True):
        super().__init__()
        if dict(scheduler_config).get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("TimeShiftUNet keeps the scheduler's nominal coefficients: eps prediction only")
        self.unet = unet
        self.schedule = DiscreteVPSchedule.from_diffusers_config(scheduler_config)
        _check_window(window, cutoff, self.schedule)
        self.window, self.cutoff, self.data_variance = float(window), float(cutoff), data_variance
        self.skip_first = skip_first
        self.record: list[dict] = []
        self._first = _FirstCall()

    def reset(self):
        self.record = []
        self._first = _FirstCall()

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
        first = self._first(t) and self.skip_first
        if self.window > 0 and t > self.cutoff and not first:
            t_s = variance_matched_times(sample, t, self.schedule, self.window, self.data_variance)
            self.record.append({"t": t, "t_shifted": t_s})
            timestep = t_s.to(device=sample.device, dtype=torch.float32)
        return self.unet(sample, timestep, *args, **kwargs)
