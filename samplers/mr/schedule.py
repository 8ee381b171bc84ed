"""The MR SDE's noise schedule in ``y = x - mu`` (``MRSchedule``) and MRS's ``"linspace"`` grid (``MRLinspace``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schedules import Schedule, _as_f64
from ..timesteps import Timesteps, check_steps

__all__ = ["irsde_cosine_thetas", "MRSchedule", "MRLinspace"]

_F64 = torch.float64


def irsde_cosine_thetas(T: int, s: float = 0.008) -> Tensor:
    """IR-SDE's ``cosine_theta_schedule``: ``theta_k = 1 - abar(k / (T + 2))``, ``k = 1 .. T + 1``, with
    iDDPM's ``abar(u) = cos^2((u + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2)`` (float64 here,
    float32 there)."""
    u = torch.arange(1, T + 2, dtype=_F64) / (T + 2)
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return 1 - f


class MRSchedule(Schedule):
    """The MR SDE's noise schedule for ``y = x - mu``: ``alpha = exp(-c(t))``, ``sigma = sigma_inf
    sqrt(1 - alpha^2)`` with ``c(t) = int_0^t theta`` scaled so that ``alpha(t_max) = eps``.

    ``discrete=True`` (IR-SDE, the MRS defaults): ``t in [1, T]``; ``c`` is IR-SDE's
    ``thetas_cumsum * dt`` at integers (``theta="cosine"``: ``irsde_cosine_thetas``; ``"constant"``:
    all ones) and linear in between (theta piecewise constant, ``theta_k`` on ``(k - 1, k]`` as IR-SDE
    uses it in its step ``t -> t - 1``), so ``t_from_log_snr`` is its exact inverse. ``t = 0`` is clean
    data (``alpha = 1, sigma = 0``): grids reach it with ``final="zero"``.

    ``theta_offset=True`` (the MRS code's IR-SDE, ``utils/sde_utils.py``): ``thetas_cumsum`` keeps
    ``theta_0`` (daclip-uir subtracts it), so ``c(0) = theta_0 dt > 0``: ``t = 0`` is a noisy time
    (``sigma(0) = 2.2e-3`` at the defaults), ``t_min`` defaults to 0, and only ``final="zero"`` reaches
    clean data. MRS's runs end at this ``t = 0`` (``MRSampler(reference=True)``).

    ``discrete=False``: continuous time ``t in [t_min, 1]``; ``theta="constant"`` gives ``c = -log(eps) t``,
    ``"cosine"`` the continuum limit ``theta(u) ∝ 1 - abar(u)`` of the discrete cosine schedule (closed-
    form ``c``, inverted by bisection to float64 round-off).
    """

    THETAS = ("cosine", "constant")

    def __init__(self, sigma_inf: float = 50 / 255, T: int = 100, theta: str = "cosine", eps: float = 0.005,
                 discrete: bool = True, t_min: float | None = None, cosine_s: float = 0.008,
                 theta_offset: bool = False):
        if not sigma_inf > 0:
            raise ValueError(f"sigma_inf must be > 0, got {sigma_inf}")
        if not 0 < eps < 1:
            raise ValueError(f"eps (alpha at t_max) must lie in (0, 1), got {eps}")
        if theta not in self.THETAS:
            raise ValueError(f"unknown theta schedule {theta!r}; expected one of {self.THETAS}")
        self.sigma_inf, self.eps, self.theta_kind, self.discrete = float(sigma_inf), float(eps), theta, bool(discrete)
        self.cosine_s = float(cosine_s)
        self.c_max = -math.log(eps)  # c(t_max)
        self.theta_offset = bool(theta_offset)
        if self.theta_offset and not self.discrete:
            raise ValueError("theta_offset is the discrete IR-SDE schedule's (discrete=True)")
        if self.discrete:
            T = check_steps(T)
            thetas = irsde_cosine_thetas(T, cosine_s) if theta == "cosine" else torch.ones(T + 1, dtype=_F64)
            cumsum = torch.cumsum(thetas, 0)
            if not self.theta_offset:
                cumsum = cumsum - thetas[0]  # daclip-uir's IR-SDE: thetas_cumsum[0] = 0
            self.T = T
            self.dt = self.c_max / cumsum[-1].item()  # IR-SDE's dt = -log(eps) / thetas_cumsum[-1]
            self._knots = cumsum * self.dt  # c at t = 0, 1, ..., T
            default_min = 0 if self.theta_offset else 1
            self.t_min, self.t_max = float(default_min if t_min is None else t_min), float(T)
        else:
            self.T = None
            self.t_min, self.t_max = float(1e-3 if t_min is None else t_min), 1.0
            if theta == "cosine":
                self._a = math.pi / (2 * (1 + cosine_s))
                self._b = self._a * cosine_s
                self._g1 = self._cosine_integral(torch.ones((), dtype=_F64)).item()
        low_ok = self.t_min >= 0 if self.theta_offset else self.t_min > 0
        if not (low_ok and self.t_min < self.t_max):
            raise ValueError(f"need 0 < t_min < t_max (0 <= t_min with theta_offset), got t_min={self.t_min}, "
                             f"t_max={self.t_max}")

    # -- c(t) = int_0^t theta and its inverse -----------------------------------------------------

    def _cosine_integral(self, u: Tensor) -> Tensor:
        # int_0^u (1 - cos^2(a v + b) / cos^2 b) dv
        a, b = self._a, self._b
        int_cos2 = u / 2 + (torch.sin(2 * (a * u + b)) - math.sin(2 * b)) / (4 * a)
        return u - int_cos2 / math.cos(b) ** 2

    def _c(self, t: Tensor) -> Tensor:
        if self.discrete:
            lo = torch.clamp(torch.floor(t), 0, self.T - 1).long()
            return torch.lerp(self._knots[lo], self._knots[lo + 1], t - lo.to(_F64))
        if self.theta_kind == "constant":
            return self.c_max * t
        return self.c_max * self._cosine_integral(t) / self._g1

    def _t_from_c(self, c: Tensor) -> Tensor:
        if self.discrete:
            k = self._knots
            idx = torch.searchsorted(k, c.contiguous(), right=False).clamp(1, len(k) - 1)
            lo, hi = k[idx - 1], k[idx]
            return (idx - 1).to(_F64) + (c - lo) / (hi - lo)
        if self.theta_kind == "constant":
            return c / self.c_max
        lo, hi = torch.zeros_like(c), torch.ones_like(c)  # c is increasing on [0, 1]
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            below = self._c(mid) < c
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def _check_log_snr(self, lam: Tensor) -> None:
        lo = self.log_snr(self.t_max).item()
        if torch.any(lam < lo - 1e-9) or torch.any(torch.isnan(lam)):
            raise ValueError(f"log-SNR {lam.min().item():.4g} is below the schedule's minimum {lo:.4g}")

    # -- Schedule interface ------------------------------------------------------------------------

    def alpha(self, t) -> Tensor:
        return torch.exp(-self._c(self.check_times(t)))

    def sigma(self, t) -> Tensor:
        return self.sigma_inf * torch.sqrt(-torch.expm1(-2 * self._c(self.check_times(t))))

    def log_snr(self, t) -> Tensor:
        c = self._c(self.check_times(t))
        return -c - math.log(self.sigma_inf) - 0.5 * torch.log(-torch.expm1(-2 * c))

    def t_from_log_snr(self, log_snr) -> Tensor:
        """Exact inverse of ``log_snr``: ``alpha / sqrt(1 - alpha^2) = e^u`` with ``u = lambda + log sigma_inf``
        gives ``c = -log alpha = softplus(-2 u) / 2``."""
        lam = _as_f64(log_snr)
        self._check_log_snr(lam)
        c = 0.5 * torch.nn.functional.softplus(-2 * (lam + math.log(self.sigma_inf)))
        return self._t_from_c(torch.clamp(c, max=self.c_max))

    def theta(self, t) -> Tensor:
        """``theta(t) = dc/dt`` on ``[0, t_max]`` (IR-SDE's ``thetas[k] * dt`` on ``(k - 1, k]`` if discrete)."""
        t = _as_f64(t)
        if torch.any(t < 0) or torch.any(t > self.t_max * (1 + 1e-12)) or torch.any(torch.isnan(t)):
            raise ValueError(f"theta is defined on [0, {self.t_max:g}], got times "
                             f"{t.min().item():.6g}..{t.max().item():.6g}")
        if self.discrete:
            k = torch.clamp(torch.ceil(t), 1, self.T).long()
            return self._knots[k] - self._knots[k - 1]
        if self.theta_kind == "constant":
            return torch.full_like(t, self.c_max)
        a, b = self._a, self._b
        return self.c_max * (1 - torch.cos(a * t + b) ** 2 / math.cos(b) ** 2) / self._g1

    def diffusion(self, t) -> Tensor:
        """The SDE's ``sigma_t`` (IR-SDE ``sigmas``): ``sqrt(2 sigma_inf^2 theta(t))``."""
        return torch.sqrt(2 * self.sigma_inf**2 * self.theta(t))

    def marginal(self, x0: Tensor, mu: Tensor, t) -> tuple[Tensor, float]:
        """Mean and std of ``x_t | x_0``: ``(alpha x0 + (1 - alpha) mu, sigma)`` at one time ``t``."""
        a, s = self.alpha(t).item(), self.sigma(t).item()
        return a * x0 + (1 - a) * mu, s

    def __repr__(self) -> str:
        kind = f"T={self.T}" if self.discrete else "continuous"
        return (f"MRSchedule(sigma_inf={self.sigma_inf:.4g}, {kind}, theta={self.theta_kind!r}, eps={self.eps:g}, "
                f"t_min={self.t_min:.4g}, t_max={self.t_max:.4g}{', theta_offset=True' if self.theta_offset else ''})")


class MRLinspace(Timesteps):
    """MRS's ``time_schedule="linspace"``: ``n + 1`` points uniform in ``t`` from ``t_max`` to 0, the last
    never evaluated: clean data (``final="zero"``), or MRS's own noisy ``t = 0`` (``final="t_min"`` on a
    schedule with ``t_min = 0``, i.e. ``theta_offset=True``)."""

    def times(self, schedule: Schedule, n_steps: int, final: str = "zero") -> Tensor:
        n = check_steps(n_steps)
        if final != "zero" and not (final == "t_min" and schedule.t_min == 0):
            raise ValueError("MRLinspace ends at t = 0: clean data (final='zero'), or the noisy t = 0 of an "
                             "MRSchedule(theta_offset=True) (final='t_min')")
        return torch.linspace(schedule.t_max, 0.0, n + 1, dtype=_F64)[:-1]
