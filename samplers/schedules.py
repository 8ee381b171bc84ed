"""Noise schedules: time ``t`` -> ``alpha(t)``, ``sigma(t)`` with ``x_t = alpha x_0 + sigma eps``.

Every schedule answers the same questions in float64: ``alpha``, ``sigma``, the log-SNR
``log_snr = log(alpha / sigma)`` and its inverse ``t_from_log_snr``, and ``sigma_bar =
sigma / alpha`` (the VE / k-diffusion noise level). Solvers only ever ask these, so a solver
written once runs on every family below.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "DiscreteVPSchedule",
    "ContinuousVPSchedule",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "betas_from_diffusers_config",
]

_F64 = torch.float64


def _as_f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=_F64)


class Schedule:
    """Base class. Subclasses define ``log_snr``, ``t_from_log_snr`` and ``alpha`` on ``[t_min, t_max]``.

    ``sigma`` defaults to ``alpha * exp(-log_snr)``; VP subclasses override it with the exact
    ``sqrt(1 - alpha^2)``. Time runs from data (``t_min``) to noise (``t_max``).
    """

    t_min: float
    t_max: float
    #: True when alpha^2 + sigma^2 = 1 (variance preserving).
    variance_preserving: bool = False

    def alpha(self, t) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t) -> Tensor:
        raise NotImplementedError

    def t_from_log_snr(self, log_snr) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        return self.alpha(t) * torch.exp(-self.log_snr(t))

    def sigma_bar(self, t) -> Tensor:
        """``sigma / alpha = exp(-log_snr)``: the noise level of ``x / alpha`` (k-diffusion's sigma)."""
        return torch.exp(-self.log_snr(t))

    def t_from_sigma_bar(self, sigma_bar) -> Tensor:
        return self.t_from_log_snr(-torch.log(_as_f64(sigma_bar)))

    def check_times(self, t) -> Tensor:
        """Return ``t`` as float64, raising a clear error for times outside ``[t_min, t_max]``."""
        t = _as_f64(t)
        tol = 1e-9 * max(1.0, abs(self.t_max))
        if torch.any(t < self.t_min - tol) or torch.any(t > self.t_max + tol) or torch.any(torch.isnan(t)):
            raise ValueError(
                f"times {t.min().item():.6g}..{t.max().item():.6g} lie outside this {type(self).__name__}'s "
                f"range [{self.t_min:.6g}, {self.t_max:.6g}]"
            )
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:.6g}, t_max={self.t_max:.6g})"


# ---------------------------------------------------------------------------------------------
# Discrete VP (DDPM), as diffusers schedulers store it


def betas_from_diffusers_config(config: Mapping[str, Any]) -> Tensor:
    """The float32 betas a diffusers scheduler builds from its config (bit-identical to diffusers).

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
    ``trained_betas`` and ``rescale_betas_zero_snr``; raises on a beta schedule it does not know.
    """
    n = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas", None)
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _glide_cosine_betas(n)
    else:
        raise ValueError(
            f"unknown beta_schedule {kind!r}; expected one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
            "or trained_betas"
        )
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _glide_cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal (2021) eq. 17, discretised as in GLIDE / diffusers.
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    # Lin et al. (2024), Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last one is 0.
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[0:1], ac[1:] / ac[:-1]])
    return 1 - alphas


class DiscreteVPSchedule(Schedule):
    """DDPM's discrete VP schedule: ``alpha_t^2 = alphas_cumprod[t]`` at integer ``t`` in ``[0, T-1]``.

    Between integers the log-SNR is interpolated linearly, so ``t_from_log_snr`` is its exact
    inverse and integer times reproduce ``alphas_cumprod`` exactly. A zero terminal SNR (from
    ``rescale_betas_zero_snr``) is clamped to ``min(2**-24, alphas_cumprod[-2] / 2)`` (diffusers
    clamps to ``2**-24``, which can break monotonicity).
    """

    variance_preserving = True

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod).to(_F64).clone()
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if ac[-1] == 0:  # zero terminal SNR: a tiny positive one keeps log-SNR finite and monotone
            ac[-1] = min(2.0**-24, ac[-2].item() / 2)
        if torch.any(ac <= 0) or torch.any(ac > 1) or torch.any(ac[1:] >= ac[:-1]):
            raise ValueError("alphas_cumprod must be strictly decreasing within (0, 1]")
        self.alphas_cumprod = ac
        self.num_train_timesteps = len(ac)
        self.t_min, self.t_max = 0.0, float(len(ac) - 1)
        # lambda = log(alpha / sigma) = 0.5 * (log ac - log(1 - ac)); ac = 1 gives +inf.
        self._knots = 0.5 * (torch.log(ac) - torch.log1p(-ac))

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVPSchedule":
        # cumprod in float32, as diffusers does, so that parity is bit-exact.
        betas = torch.as_tensor(betas, dtype=torch.float32)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """Build from any diffusers DDPM-family scheduler config (``scheduler.config`` or a dict)."""
        try:
            return cls.from_betas(betas_from_diffusers_config(dict(config)))
        except (TypeError, AttributeError) as err:
            raise ValueError(f"cannot read a noise schedule from scheduler config {config!r}: {err}") from err

    def log_snr(self, t) -> Tensor:
        t = self.check_times(t)
        lo = torch.clamp(torch.floor(t), 0, self.t_max - 1).long()
        frac = t - lo.to(_F64)
        k = self._knots
        return torch.lerp(k[lo], k[lo + 1], frac)

    def t_from_log_snr(self, log_snr) -> Tensor:
        lam = _as_f64(log_snr)
        k = self._knots
        if torch.any(lam > k[0] + 1e-9) or torch.any(lam < k[-1] - 1e-9):
            raise ValueError(
                f"log-SNR {lam.min().item():.4g}..{lam.max().item():.4g} outside the schedule's "
                f"[{k[-1].item():.4g}, {k[0].item():.4g}]"
            )
        # knots decrease with t; search on the increasing sequence -k.
        idx = torch.searchsorted(-k, -lam.contiguous(), right=False).clamp(1, len(k) - 1)
        lo, hi = k[idx - 1], k[idx]
        return (idx - 1).to(_F64) + (lam - lo) / (hi - lo)

    def alpha(self, t) -> Tensor:
        t = self.check_times(t)
        if torch.all(t == torch.round(t)):  # exact at the training timesteps
            return self.alphas_cumprod[t.long()].sqrt()
        return torch.sigmoid(2 * self.log_snr(t)).sqrt()

    def sigma(self, t) -> Tensor:
        t = self.check_times(t)
        if torch.all(t == torch.round(t)):
            return (1 - self.alphas_cumprod[t.long()]).sqrt()
        return torch.sigmoid(-2 * self.log_snr(t)).sqrt()

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule(num_train_timesteps={self.num_train_timesteps})"


# ---------------------------------------------------------------------------------------------
# Continuous schedules


class ContinuousVPSchedule(Schedule):
    """Continuous-time VP SDE on ``t in [t_min, 1]``: ``'linear'`` (Song et al. 2021, beta 0.1 -> 20)
    or ``'cosine'`` (Nichol & Dhariwal 2021, s = 0.008, t clipped to 0.9946 as DPM-Solver does).
    """

    variance_preserving = True

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0,
                 t_min: float = 1e-3, t_max: float | None = None, cosine_s: float = 0.008):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown continuous VP schedule {kind!r}; expected 'linear' or 'cosine'")
        self.kind, self.beta_min, self.beta_max, self.cosine_s = kind, beta_min, beta_max, cosine_s
        self.t_min = float(t_min)
        self.t_max = float(t_max if t_max is not None else (1.0 if kind == "linear" else 0.9946))
        if not 0 < self.t_min < self.t_max:
            raise ValueError("need 0 < t_min < t_max")
        self._log_cos_s = math.log(math.cos(cosine_s / (1 + cosine_s) * math.pi / 2))

    def log_alpha(self, t) -> Tensor:
        t = self.check_times(t)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - self._log_cos_s

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def log_snr(self, t) -> Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def t_from_log_snr(self, log_snr) -> Tensor:
        lam = _as_f64(log_snr)
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        if self.kind == "linear":
            # solve 0.25 (b1 - b0) t^2 + 0.5 b0 t + log_alpha = 0 for t >= 0
            a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
            return 2 * (-log_alpha) / (b + torch.sqrt(b**2 - 4 * a * log_alpha))
        s = self.cosine_s
        return 2 * (1 + s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_cos_s)) - s

    def __repr__(self) -> str:
        return f"ContinuousVPSchedule(kind={self.kind!r}, t_min={self.t_min:.4g}, t_max={self.t_max:.4g})"


class EDMSchedule(Schedule):
    """VE / EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` on ``[sigma_min, sigma_max]``."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t) -> Tensor:
        return torch.ones_like(self.check_times(t))

    def sigma(self, t) -> Tensor:
        return self.check_times(t).clone()

    def log_snr(self, t) -> Tensor:
        return -torch.log(self.check_times(t))

    def t_from_log_snr(self, log_snr) -> Tensor:
        return torch.exp(-_as_f64(log_snr))


class FlowMatchingSchedule(Schedule):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t`` on ``[t_min, t_max]`` within (0, 1)."""

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4):
        if not 0 <= t_min < t_max <= 1:
            raise ValueError("need 0 <= t_min < t_max <= 1")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t) -> Tensor:
        return 1 - self.check_times(t)

    def sigma(self, t) -> Tensor:
        return self.check_times(t).clone()

    def log_snr(self, t) -> Tensor:
        t = self.check_times(t)
        return torch.log1p(-t) - torch.log(t)

    def t_from_log_snr(self, log_snr) -> Tensor:
        return torch.sigmoid(-_as_f64(log_snr))

    # d alpha / dt and d sigma / dt: needed to read a velocity prediction.
    def alpha_dot(self, t) -> Tensor:
        return -torch.ones_like(self.check_times(t))

    def sigma_dot(self, t) -> Tensor:
        return torch.ones_like(self.check_times(t))
