"""Timestep grids fitted to a teacher's own trajectories (``fewstep tune``), and the scheduler that carries them.

The fit has three stages; all see only the teacher and a batch of fitting seeds ``x_T``:

1. **Reference.** The same teacher's probability-flow ODE solved accurately from each ``x_T``
   (``reference_trajectory``: DPM-Solver++(2M) on ``steps`` log-SNR-uniform times, integers on DDPM
   schedules), keeping every state ``x(t_m)`` and the teacher's data prediction there.
2. **Dynamic programming (GITS, Chen et al. 2024, sec. 4).** On the reference times as candidates, the
   grid that minimises the summed local error of first-order (DDIM) steps taken *from the reference
   states*: ``cost(i, j) = RMS(ddim(x(t_i), x0(t_i); t_i -> t_j) - x(t_j))``, additive along the grid, so
   DP finds the exact optimum of that surrogate for every NFE at once (``gits_grid``). It costs no model
   call beyond the reference's.
3. **Global refinement.** The surrogate is not the error a multistep solver makes (its steps use history,
   its last steps drop order), so the grid is refined on the real objective: the RMS endpoint error of the
   *chosen* sampler run from ``x_T`` against the reference endpoint (``refine_grid``: a pattern search that
   moves one time at a time to a neighbouring candidate, with shrinking moves, accepting only
   improvements). It starts from the best of the DP grid and the fixed grids (trailing, Karras, log-SNR,
   time-quadratic) on the same seeds, so on the fitting seeds the result is never worse than any of them.
   The per-sample distance is a parameter (``rms`` by default; a feature-space distance plugs in).

Why not Align Your Steps' objective: AYS minimises a KL upper bound between the discretised and true SDE,
which needs the data (or a score-matching estimate over a data set) and stochastic simulation; the
endpoint error to the teacher's own ODE needs only the teacher, and is what a deterministic few-step
sampler is judged by. Why not DP alone: on the exact testbed the DDIM-surrogate grid loses to trailing for
DPM-Solver++(2M) and UniPC at most NFE 3-8 (``benchmarks/tune_testbed.py``); refinement wins everywhere.

Validation uses other seeds (``endpoint_errors``). The grids are saved in ``FewstepScheduler``'s config key
``tuned_timesteps`` (steps -> timesteps), read by ``set_timesteps(num_inference_steps)``; ``TunedScheduler``
is ``FewstepScheduler`` under the name ``fewstep tune`` saves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .denoisers import Denoiser
from .registry import make_solver
from .sampler import Sampler, run_solver
from .schedules import DiscreteVPSchedule, FlowMatchingSchedule, Schedule
from .schedulers import FewstepScheduler
from .timesteps import ExplicitTimesteps, FlowUniform, LogSNRUniform, Timesteps, make_timesteps

__all__ = ["FIXED_GRIDS", "FLOW_FIXED_GRIDS", "fixed_grids", "Reference", "CallCounter", "candidate_times", "reference_trajectory", "ddim_cost_matrix",
           "gits_grid", "refine_grid", "rms", "endpoint_errors", "fixed_grid_times", "fit_timesteps", "FitResult",
           "TunedScheduler", "tuned_scheduler", "published_scheduler", "PUBLISHED"]

_F64 = torch.float64

#: The fixed grids a fitted one is compared with (``timesteps.make_timesteps`` names).
FIXED_GRIDS = ("trailing", "karras", "log_snr", "time_quadratic")
#: The fixed grids of a rectified flow that starts at pure noise (t = 1, where log-SNR is -inf):
#: FlowMatchEuler's uniform grid, unshifted and at SD3's shift 3.
FLOW_FIXED_GRIDS = ("flow_uniform", "flow_shift3")


def fixed_grids(schedule: Schedule) -> tuple[str, ...]:
    """The fixed grids a tuned grid is compared with on ``schedule``."""
    return FLOW_FIXED_GRIDS if _pure_noise_flow(schedule) else FIXED_GRIDS


def _pure_noise_flow(schedule: Schedule) -> bool:
    return isinstance(schedule, FlowMatchingSchedule) and schedule.t_max == 1

#: Published schedules that load through the same format (Sabour et al. 2024, Align Your Steps, 10 steps;
#: the lists diffusers ships as ``diffusers.schedulers.AysSchedules``).
PUBLISHED = {
    "ays-sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "ays-sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
}


class CallCounter(Denoiser):
    """A denoiser that counts its model calls (batched calls and images) and their seconds."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.inner, self.schedule = denoiser, denoiser.schedule
        self.calls = self.images = 0
        self.seconds = 0.0

    def forward(self, x, t, **cond):
        start = time.perf_counter()
        out = self.inner(x, t, **cond)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.images += x.shape[0]
        return out


def candidate_times(schedule: Schedule, m: int, integer: bool | None = None) -> Tensor:
    """About ``m`` descending times from ``t_max`` to ``t_min``, uniform in log-SNR; on DDPM schedules
    (``integer`` default) rounded to integer timesteps, duplicates dropped (what a DDPM UNet was trained on).
    A flow schedule reaching pure noise: ``t = 1`` (where ``x_T`` is drawn), then log-SNR uniform from
    ``1 - 1e-3`` down to ``1e-3`` (both log-SNR ends are infinite)."""
    if _pure_noise_flow(schedule):
        inner = LogSNRUniform(t_start=1 - 1e-3, t_end=max(1e-3, schedule.t_min)).spaced(schedule, m - 1)
        return torch.cat([torch.ones(1, dtype=_F64), inner])
    t = LogSNRUniform().spaced(schedule, m)
    integer = isinstance(schedule, DiscreteVPSchedule) if integer is None else integer
    if integer:
        t = torch.unique(torch.round(t)).flip(0)
    return t.to(_F64)


def _all_candidates(schedule: Schedule) -> Tensor:
    """The refinement's candidate times: every integer timestep on DDPM schedules, else 1000 log-SNR-uniform."""
    if isinstance(schedule, DiscreteVPSchedule):
        return torch.arange(schedule.num_train_timesteps - 1, -1, -1, dtype=_F64)
    return candidate_times(schedule, 1000, integer=False)


@dataclass
class Reference:
    """The teacher's accurate ODE trajectories from a batch of ``x_T``: at each of ``times`` (descending,
    ``times[0]`` the start) the state and the teacher's data prediction there, and the endpoint (clean data)."""

    x_T: Tensor
    times: Tensor  # [M]
    states: Tensor  # [M, B, ...]
    x0: Tensor  # [M, B, ...]
    end: Tensor  # [B, ...]
    images: int = 0  # model evaluations spent (images x calls)
    seconds: float = 0.0


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch)])


@torch.no_grad()
def reference_trajectory(denoiser: Denoiser, x_T: Tensor, steps: int = 100, solver: str = "dpmpp_2m",
                         times: Tensor | None = None, batch: int = 256, keep_states: bool = True,
                         progress=None) -> Reference:
    """The teacher's trajectories from ``x_T``: ``solver`` over ``times`` (default ``candidate_times(steps)``)
    ending at clean data. ``keep_states=False`` keeps only the endpoint (validation seeds)."""
    schedule = denoiser.schedule
    times = candidate_times(schedule, steps) if times is None else torch.as_tensor(times, dtype=_F64)
    sampler = Sampler(denoiser, solver, steps=len(times), timesteps=ExplicitTimesteps(times.tolist()))
    states, preds, ends = [], [], []
    counted = CallCounter(denoiser)
    for chunk in x_T.split(batch):
        xs, x0s = [], []

        def keep(payload):
            if keep_states:
                xs.append(payload["x"].detach().clone())
                x0s.append(payload["denoised"].detach().clone())

        ends.append(run_solver(sampler.solver, sampler.grid, counted, chunk, lambda like: torch.zeros_like(like),
                               keep, progress))
        if keep_states:
            states.append(torch.stack(xs))
            preds.append(torch.stack(x0s))
    cat = (lambda parts: torch.cat(parts, dim=1)) if keep_states else (lambda parts: torch.empty(0))
    return Reference(x_T=x_T, times=times, states=cat(states), x0=cat(preds), end=torch.cat(ends),
                     images=counted.images, seconds=counted.seconds)


def ddim_cost_matrix(reference: Reference, schedule: Schedule) -> Tensor:
    """``C[i, j]``: RMS error of one DDIM step from the reference state at ``times[i]`` to ``times[j]``
    (``j = M``: clean data) against the reference there; ``inf`` for ``j <= i``.

    DDIM in data prediction (Lu et al. 2022b, eq. 5 with order 1): ``x_j = (sigma_j / sigma_i) x_i +
    (alpha_j - alpha_i sigma_j / sigma_i) x0_i``."""
    t = reference.times
    M = len(t)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    states = reference.states.flatten(2).to(_F64)  # [M, B, D]
    x0 = reference.x0.flatten(2).to(_F64)
    targets = torch.cat([states, reference.end.flatten(1).to(_F64)[None]])  # [M + 1, B, D]
    a_next = torch.cat([alpha, alpha.new_ones(1)])
    s_next = torch.cat([sigma, sigma.new_zeros(1)])
    cost = torch.full((M, M + 1), math.inf, dtype=_F64)
    for i in range(M):
        r = s_next[i + 1:] / sigma[i]  # [K]
        pred = r[:, None, None] * states[i] + (a_next[i + 1:] - alpha[i] * r)[:, None, None] * x0[i]
        err = pred - targets[i + 1:]
        cost[i, i + 1:] = err.pow(2).mean(dim=(1, 2)).sqrt()
    return cost


def gits_grid(cost: Tensor, times: Tensor, steps: int) -> list[float]:
    """The ``steps`` evaluation times (``times[0]`` first) minimising the summed ``cost`` of the steps
    between them and on to clean data (index ``M``): dynamic programming over the candidates (GITS)."""
    M = cost.shape[0]
    if not 1 <= steps <= M:
        raise ValueError(f"{steps} steps need at least that many candidate times, got {M}")
    best = torch.full((steps + 1, M + 1), math.inf, dtype=_F64)  # best[k, j]: k steps from index 0 reach j
    back = torch.zeros((steps + 1, M + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1, :M, None] + cost  # [i, j]
        value, arg = total.min(dim=0)
        best[k], back[k] = value, arg
    path, j = [], M
    for k in range(steps, 0, -1):
        j = int(back[k, j])
        path.append(j)
    return [float(times[i]) for i in reversed(path)]


def rms(out: Tensor, target: Tensor) -> Tensor:
    """Per-sample RMS difference (the default distance of the fit)."""
    return (out.to(_F64) - target.to(_F64)).flatten(1).pow(2).mean(1).sqrt()


@torch.no_grad()
def endpoint_errors(denoiser: Denoiser, sampler: str, times: Sequence[float], x_T: Tensor, target: Tensor,
                    batch: int = 256, distance: Callable[[Tensor, Tensor], Tensor] = rms, **options) -> Tensor:
    """Per-sample ``distance`` (default RMS) of ``sampler`` on evaluation ``times`` (ending at clean data)
    from ``x_T`` to ``target`` (the reference endpoint, or the exact ODE solution)."""
    s = Sampler(denoiser, sampler, steps=len(times), timesteps=ExplicitTimesteps(list(times)), **options)
    out = _batched(lambda x: s.sample(x), x_T, batch)
    return distance(out, target)


def fixed_grid_times(schedule: Schedule, name: str | Timesteps, steps: int) -> list[float]:
    """The evaluation times of a fixed grid (``"trailing"``, ``"karras"``, ``"flow_shift3"``, ...) with ``steps``
    steps."""
    if name == "flow_shift3":
        return FlowUniform(shift=3.0).times(schedule, steps).tolist()
    return make_timesteps(name).times(schedule, steps).tolist()


def _valid(times: Sequence[float]) -> bool:
    return all(a > b for a, b in zip(times, times[1:]))


def refine_grid(objective: Callable[[list[float]], float], start: Sequence[float], candidates: Tensor,
                moves: Sequence[int] | None = None, sweeps: int = 2, progress=None) -> tuple[list[float], float, int]:
    """Pattern search on ``objective(times)``: each time but the first moves to the candidate ``m``
    positions earlier or later (``candidates`` descending) while that improves, for each ``m`` in
    ``moves`` (default: from an eighth of the mean gap down to 1, by quarters), at most ``sweeps`` passes
    per ``m``. Returns ``(times, value, evaluations)``; the value never exceeds ``objective(start)``."""
    cand = candidates.tolist()
    times = [float(t) for t in start]
    k = len(times)
    if moves is None:
        m, moves = max(1, len(cand) // (8 * k)), []
        while m > 1:
            moves.append(m)
            m = max(1, m // 4)
        moves.append(1)
    best, evals = objective(times), 1
    if progress is not None:
        progress.update(1)

    def nearest(t: float) -> int:
        return min(range(len(cand)), key=lambda i: abs(cand[i] - t))

    for m in moves:
        for _ in range(sweeps):
            improved = False
            for i in range(1, k):
                for sign in (1, -1):
                    while True:  # keep going in a direction that improves
                        j = nearest(times[i]) + sign * m
                        if not 0 <= j < len(cand):
                            break
                        trial = times[:i] + [cand[j]] + times[i + 1:]
                        if not _valid(trial):
                            break
                        value = objective(trial)
                        evals += 1
                        if progress is not None:
                            progress.update(1)
                        if not value < best:
                            break
                        times, best, improved = trial, value, True
            if not improved:
                break
    return times, best, evals


@dataclass
class FitResult:
    """One NFE's fit: the grid, how it was found, and its errors on the fitting seeds."""

    sampler: str
    nfe: int
    steps: int
    timesteps: list[float]
    fit_error: float  # mean per-sample RMS endpoint error on the fitting seeds
    start: str  # the starting grid of the refinement: "gits" or a fixed grid's name
    fit_errors_fixed: dict[str, float] = field(default_factory=dict)
    gits_timesteps: list[float] = field(default_factory=list)
    evaluations: int = 0  # objective evaluations (each one sampler run over the fitting seeds)
    images: int = 0  # model evaluations spent on the search (images x calls), the reference's excluded
    seconds: float = 0.0


def _steps_for_nfe(denoiser: Denoiser, sampler: str, nfe: int, **options) -> int:
    return Sampler.for_nfe(denoiser, sampler, nfe, **options).steps


def fit_timesteps(denoiser: Denoiser, sampler: str, nfe: int, reference: Reference, batch: int = 256,
                  cost: Tensor | None = None, candidates: Tensor | None = None, fixed: Sequence[str] | None = None,
                  progress=None, distance: Callable[[Tensor, Tensor], Tensor] = rms, **options) -> FitResult:
    """Fit the grid of ``sampler`` (with its ``options``) at ``nfe`` model calls to ``reference``: GITS DP
    on the reference's DDIM local errors, then the pattern search on the sampler's own endpoint error,
    the mean per-sample ``distance`` (default RMS; e.g. a feature-space distance) to the reference endpoint."""
    start_time = time.perf_counter()
    make_solver(sampler, **options)  # a bad name or option fails here
    schedule = denoiser.schedule
    steps = _steps_for_nfe(denoiser, sampler, nfe, **options)
    counted = CallCounter(denoiser)
    cost = ddim_cost_matrix(reference, schedule) if cost is None else cost
    candidates = _all_candidates(schedule) if candidates is None else candidates
    cache: dict[tuple, float] = {}

    def objective(times: list[float]) -> float:
        key = tuple(round(t, 9) for t in times)
        if key not in cache:
            errors = endpoint_errors(counted, sampler, times, reference.x_T, reference.end, batch, distance,
                                     **options)
            cache[key] = float(errors.mean())
        return cache[key]

    gits = gits_grid(cost, reference.times, steps)
    starts = {"gits": gits}
    for name in fixed_grids(schedule) if fixed is None else fixed:
        try:
            starts[name] = fixed_grid_times(schedule, name, steps)
        except ValueError:  # a spacing this schedule does not have (trailing on a continuous schedule)
            continue
    scores = {name: objective(times) for name, times in starts.items()}
    first = min(scores, key=scores.get)
    times, best, evals = refine_grid(objective, starts[first], candidates, progress=progress)
    return FitResult(sampler=sampler, nfe=nfe, steps=steps, timesteps=times, fit_error=best, start=first,
                     fit_errors_fixed={k: v for k, v in scores.items() if k != "gits"}, gits_timesteps=gits,
                     evaluations=len(cache), images=counted.images, seconds=time.perf_counter() - start_time)


# ---------------------------------------------------------------------------------------------
# The scheduler that carries them


class TunedScheduler(FewstepScheduler):
    """``FewstepScheduler`` by the name ``fewstep tune`` saves it under: the fitted grids live in the config's
    ``tuned_timesteps`` (steps -> evaluation times), which ``FewstepScheduler`` itself reads, so either class
    loads the folder and ``set_timesteps(num_inference_steps=n)`` uses the grid of ``n`` steps.

        scheduler = FewstepScheduler.from_pretrained("tuned/scheduler")
        pipe = DDPMPipeline.from_pretrained(teacher, scheduler=scheduler)
        images = pipe(num_inference_steps=4).images      # the tuned 4-step grid
    """


def tuned_scheduler(scheduler_config, grids: dict[int, Sequence[float]], sampler: str = "dpmpp_2m",
                    **options) -> TunedScheduler:
    """A ``TunedScheduler`` of a pipeline's noise schedule (``pipe.scheduler.config``) running ``sampler``
    on ``grids`` (steps -> times), ending at clean data, without clipping."""
    import inspect

    known = inspect.signature(FewstepScheduler.__init__).parameters
    # the source's own keys FewstepScheduler has no use for (FlowMatchEuler's invert_sigmas, ...) are left out
    config = {k: v for k, v in dict(scheduler_config).items() if k in known or k.startswith("_")}
    # on DDPM schedules the untuned step counts fall back to trailing; a flow config keeps its own rule
    spacing = {} if str(config.get("_class_name", "")).startswith("FlowMatch") else {"timestep_spacing": "trailing"}
    sched = TunedScheduler.from_config(config, sampler=sampler, sampler_options=options or None,
                                       final_sigmas_type="zero", clip_sample=False, thresholding=False, **spacing)
    table = {str(int(k)): [float(t) for t in v] for k, v in grids.items()}
    return TunedScheduler.from_config(sched.config, tuned_timesteps=table)


def published_scheduler(name: str, scheduler_config=None, sampler: str = "dpmpp_2m") -> TunedScheduler:
    """A published schedule (``PUBLISHED``: ``"ays-sd15"``, ``"ays-sdxl"``) in the same format, on
    ``scheduler_config`` (default: Stable Diffusion's scaled-linear betas)."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published schedule {name!r}; expected one of {sorted(PUBLISHED)}")
    config = scheduler_config or {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    times = PUBLISHED[name]
    return tuned_scheduler(config, {len(times): times}, sampler=sampler)
