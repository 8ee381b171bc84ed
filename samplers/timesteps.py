"""Timestep grids: where a sampler stops between noise and data, chosen independently of the solver.

A ``Timesteps`` object turns ``(schedule, n_steps)`` into a ``Grid``: ``n_steps`` model-evaluation
times ``t[0] > ... > t[n-1]`` plus an endpoint ``t[n]``. The endpoint is either clean data
(``final="zero"``: alpha = 1, sigma = 0) or the schedule's own ``t_min`` (``final="t_min"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .schedules import DiscreteVPSchedule, Schedule

__all__ = [
    "Grid",
    "Timesteps",
    "TimeUniform",
    "TimeQuadratic",
    "LogSNRUniform",
    "Karras",
    "DiffusersSpacing",
    "ExplicitTimesteps",
    "FlowUniform",
    "make_timesteps",
    "check_steps",
]

_F64 = torch.float64
Final = Literal["zero", "t_min"]


@dataclass(frozen=True)
class Grid:
    """Time grid of a run: ``t``, ``alpha``, ``sigma`` (float64, length ``n_steps + 1``, noise -> data).

    The last point may be clean data (``alpha = 1, sigma = 0``, ``t = nan`` when the schedule has no
    such time); the model is never evaluated there.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    #: the schedule the grid came from (solvers with off-grid stages, e.g. PNDM's warm-up, ask it)
    schedule: Schedule | None = field(default=None, compare=False, repr=False)

    @property
    def n_steps(self) -> int:
        return len(self.t) - 1

    @property
    def log_snr(self) -> Tensor:
        """``log(alpha / sigma)``; ``+inf`` at clean data."""
        return torch.log(self.alpha) - torch.log(self.sigma)

    @property
    def sigma_bar(self) -> Tensor:
        return self.sigma / self.alpha

    @property
    def ends_at_data(self) -> bool:
        return bool(self.sigma[-1] == 0)

    @classmethod
    def from_times(cls, schedule: Schedule, times, final: Final = "zero", t_end: float | None = None) -> "Grid":
        """Grid through the given evaluation ``times`` (descending) and the requested endpoint:
        clean data (``"zero"``) or the time ``t_end`` (``"t_min"``; default the schedule's ``t_min``)."""
        if final not in ("zero", "t_min"):
            raise ValueError(f"unknown final {final!r}; expected 'zero' or 't_min'")
        t = schedule.check_times(times).reshape(-1)
        if len(t) < 1:
            raise ValueError("a grid needs at least one evaluation time (NFE >= 1)")
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        if final == "zero":
            t = torch.cat([t, t.new_tensor([float("nan")])])
            alpha = torch.cat([alpha, alpha.new_ones(1)])
            sigma = torch.cat([sigma, sigma.new_zeros(1)])
        else:
            t_last = schedule.check_times(t.new_tensor([schedule.t_min if t_end is None else t_end]))
            t = torch.cat([t, t_last])
            alpha = torch.cat([alpha, schedule.alpha(t_last)])
            sigma = torch.cat([sigma, schedule.sigma(t_last)])
        grid = cls(t=t, alpha=alpha, sigma=sigma, schedule=schedule)
        lam = grid.log_snr
        # The endpoint may coincide with the last evaluation (a zero-length step, as diffusers'
        # "leading" grids that end on t = 0 with set_alpha_to_one=False); nothing else may repeat.
        if not (torch.all(lam[1:-1] > lam[:-2]) and lam[-1] >= lam[-2]):
            raise ValueError(
                "grid is not strictly decreasing in noise level: evaluation times must descend and "
                f"stay above the endpoint; got t={t.tolist()}"
            )
        return grid


class Timesteps:
    """Base class. Continuous spacings define ``spaced(schedule, m)``: ``m`` descending times from
    ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``), both included.

    With ``final="t_min"`` the ``n + 1`` spaced points are the grid (the last is the endpoint, never
    evaluated); with ``final="zero"`` the ``n`` spaced points are all evaluated and the grid ends at
    clean data (k-diffusion's ``append_zero``).
    """

    def __init__(self, t_start: float | None = None, t_end: float | None = None):
        self.t_start, self.t_end = t_start, t_end

    def bounds(self, schedule: Schedule) -> tuple[float, float]:
        t0 = schedule.t_max if self.t_start is None else float(self.t_start)
        t1 = schedule.t_min if self.t_end is None else float(self.t_end)
        if not t1 < t0:
            raise ValueError(f"t_start={t0} must be above t_end={t1}")
        schedule.check_times(torch.tensor([t0, t1], dtype=_F64))
        return t0, t1

    def spaced(self, schedule: Schedule, m: int) -> Tensor:
        raise NotImplementedError

    def times(self, schedule: Schedule, n_steps: int, final: Final = "zero") -> Tensor:
        """The ``n_steps`` evaluation times."""
        n_steps = check_steps(n_steps)
        if final == "t_min":
            return self.spaced(schedule, n_steps + 1)[:-1]
        if n_steps == 1:  # one evaluation: at the start
            return self.spaced(schedule, 2)[:1]
        return self.spaced(schedule, n_steps)

    def grid(self, schedule: Schedule, n_steps: int, final: Final = "zero") -> Grid:
        t_end = self.bounds(schedule)[1] if self.t_end is not None else None
        return Grid.from_times(schedule, self.times(schedule, n_steps, final), final=final, t_end=t_end)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({fields})"


def check_steps(n) -> int:
    """Validate a number of steps (or NFE): an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    return int(n)


class TimeUniform(Timesteps):
    """Uniform in ``t`` (DPM-Solver's ``time_uniform``)."""

    def spaced(self, schedule, m):
        t0, t1 = self.bounds(schedule)
        return torch.linspace(t0, t1, m, dtype=_F64)


class TimeQuadratic(Timesteps):
    """Quadratic in ``t``, dense near data (DDIM's ``quad``; DPM-Solver's ``time_quadratic``)."""

    def spaced(self, schedule, m):
        t0, t1 = self.bounds(schedule)
        u = torch.linspace(1.0, 0.0, m, dtype=_F64)
        return t1 + (t0 - t1) * u**2


class LogSNRUniform(Timesteps):
    """Uniform in log-SNR ``lambda`` (DPM-Solver's ``logSNR``)."""

    def spaced(self, schedule, m):
        t0, t1 = self.bounds(schedule)
        lam = schedule.log_snr(torch.tensor([t0, t1], dtype=_F64))
        t = schedule.t_from_log_snr(torch.linspace(lam[0].item(), lam[1].item(), m, dtype=_F64))
        t[0], t[-1] = t0, t1  # pin the ends against round-off in the inverse
        return t.clamp(t1, t0)


class Karras(Timesteps):
    """Karras et al. (2022) eq. 5: uniform in ``sigma_bar ** (1 / rho)``."""

    def __init__(self, rho: float = 7.0, t_start: float | None = None, t_end: float | None = None):
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        super().__init__(t_start, t_end)
        self.rho = float(rho)

    def spaced(self, schedule, m):
        t0, t1 = self.bounds(schedule)
        s = schedule.sigma_bar(torch.tensor([t0, t1], dtype=_F64))
        u = torch.linspace(0.0, 1.0, m, dtype=_F64)
        inv = 1.0 / self.rho
        sigma_bar = (s[0] ** inv + u * (s[1] ** inv - s[0] ** inv)) ** self.rho
        t = schedule.t_from_sigma_bar(sigma_bar)
        t[0], t[-1] = t0, t1
        return t.clamp(t1, t0)


class DiffusersSpacing(Timesteps):
    """Integer timesteps of a discrete schedule, spelled as diffusers' ``timestep_spacing``.

    - ``"leading"``: ``arange(n) * (T // n) + steps_offset``, reversed (DDIM, PNDM, DDPM);
    - ``"trailing"``: ``round(arange(T, 0, -T / n)) - 1`` (Lin et al. 2024, table 2);
    - ``"linspace"``: ``round(linspace(0, T - 1, n))``, reversed.

    The endpoint comes from ``final`` (diffusers: ``set_alpha_to_one`` -> ``"zero"``, else
    ``"t_min"``). Unlike diffusers' DDIM, the step after each timestep goes to the next timestep of
    the grid, not to ``t - T // n`` (that stride is wrong for ``trailing`` / ``linspace``).
    """

    SPACINGS = ("leading", "trailing", "linspace")

    def __init__(self, spacing: str = "leading", steps_offset: int = 0):
        if spacing not in self.SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {self.SPACINGS}")
        self.spacing, self.steps_offset = spacing, int(steps_offset)
        self.t_start = self.t_end = None

    def times(self, schedule, n_steps, final="zero"):
        n = check_steps(n_steps)
        T = _num_train_timesteps(schedule)
        if n > T:
            raise ValueError(f"{n} steps exceed the schedule's {T} training timesteps")
        if self.spacing == "leading":
            t = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
        elif self.spacing == "trailing":
            # n points exactly: arange(T, 0, -T / n) yields n + 1 when rounding leaves its end just above 0
            t = np.round(T - np.arange(n) * (T / n)) - 1
        else:
            t = np.linspace(0, T - 1, n).round()[::-1]
        return torch.tensor(t.copy(), dtype=_F64)


def _num_train_timesteps(schedule: Schedule) -> int:
    if not isinstance(schedule, DiscreteVPSchedule):
        raise ValueError(f"diffusers spacings need a DiscreteVPSchedule, not {type(schedule).__name__}")
    return schedule.num_train_timesteps


class ExplicitTimesteps(Timesteps):
    """A user's own evaluation times (descending); ``n_steps`` must equal their number."""

    def __init__(self, times: Sequence[float]):
        self.values = torch.as_tensor(times, dtype=_F64).reshape(-1)
        self.t_start = self.t_end = None

    def times(self, schedule, n_steps, final="zero"):
        if check_steps(n_steps) != len(self.values):
            raise ValueError(f"{len(self.values)} explicit timesteps given but {n_steps} steps asked for")
        return self.values.clone()


class FlowUniform(Timesteps):
    """A rectified flow's grid as ``FlowMatchEulerDiscreteScheduler`` spaces it: ``n`` steps uniform in the
    unshifted time, ``t_i = shift(1 - i / n)`` (Esser et al. 2024, eq. 23), then clean data; needs a schedule
    that reaches ``t = 1`` (``FlowMatchingSchedule(0, 1)``)."""

    def __init__(self, shift: float = 1.0):
        self.shift = float(shift)
        self.t_start = self.t_end = None

    def times(self, schedule, n_steps, final="zero"):
        u = 1 - torch.arange(check_steps(n_steps), dtype=_F64) / n_steps
        return schedule.check_times(self.shift * u / (1 + (self.shift - 1) * u))


_BY_NAME = {
    "flow_uniform": FlowUniform,
    "time_uniform": TimeUniform,
    "time_quadratic": TimeQuadratic,
    "log_snr": LogSNRUniform,
    "karras": Karras,
}


def make_timesteps(name: str | Timesteps, **options) -> Timesteps:
    """Timesteps by name: ``time_uniform``, ``time_quadratic``, ``log_snr``, ``karras``, ``flow_uniform`` or a
    diffusers spacing (``leading``, ``trailing``, ``linspace``)."""
    if isinstance(name, Timesteps):
        return name
    if name in DiffusersSpacing.SPACINGS:
        return DiffusersSpacing(name, **options)
    if name not in _BY_NAME:
        known = sorted(_BY_NAME) + list(DiffusersSpacing.SPACINGS)
        raise ValueError(f"unknown timesteps {name!r}; expected one of {known}")
    return _BY_NAME[name](**options)
