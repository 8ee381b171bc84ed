"""Mean-reverting (MR) diffusion and the MR Sampler (Li et al., "MRS: A Fast Sampler for Mean Reverting
Diffusion based on ODE and SDE Solvers", ICLR 2025), on the foundation's solvers.

The MR SDE of IR-SDE / DA-CLIP (Luo et al. 2023) drifts the data ``x_0`` towards a condition ``mu``
(e.g. the degraded image)::

    dx = theta_t (mu - x) dt + sigma_t dW,      sigma_t^2 = 2 sigma_inf^2 theta_t,

whose marginal is ``x_t = alpha_t x_0 + (1 - alpha_t) mu + sigma_t eps`` with ``alpha_t =
exp(-int_0^t theta)`` and ``sigma_t = sigma_inf sqrt(1 - alpha_t^2)`` (stationary std ``sigma_inf``).
In ``y = x - mu`` this is an ordinary Gaussian path ``y_t = alpha_t y_0 + sigma_t eps``, so

- ``MRSchedule`` is one more ``Schedule`` (it gives alpha, sigma of ``y``);
- ``MRDenoiser`` turns a network ``model(x, t, mu=...)`` into a ``Prediction`` for ``y``;
- every MRS update is the DPM-Solver / DPM-Solver++ / SDE-DPM-Solver++ update in ``y`` (research
  notes, sec. 3.2): data prediction runs ``solvers.DPMSolverPP`` / ``SDEDPMSolverPP`` with
  ``solver_type="heun"`` (MRS's "taylor" second-order term), noise prediction runs the DPM-Solver
  (Lu et al. 2022a) functions below, and ``x = y + mu`` at the end.

    sampler = MRSampler(MRDenoiser(net, MRSchedule(), "noise"), steps=20)   # ODE, data prediction, order 2
    restored = sampler.sample(mu=degraded, generator=g)

Data prediction is the default: noise prediction collapses at <= 10 NFE (paper sec. 5.2). On the exact
testbed (tests/test_mr.py, benchmarks/mr_table.py) the noise-prediction SDE solver collapses at 5 NFE and
the noise-prediction ODE solver is 1.3-2x further from the data than data prediction at <= 10 NFE.

``MRScheduler`` (a diffusers ``SchedulerMixin``) is built on first access, so importing this module does
not import diffusers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .denoisers import Denoiser, Prediction, broadcast_like
from .sampler import SAMPLERS, SamplerSpec, randn_noise, run_solver
from .schedules import Schedule, _as_f64
from .solvers import DDPM, DPMSolverPP, NoiseFn, SDEDPMSolverPP, Solver, _multistep_order, _scalars
from .timesteps import Grid, Timesteps, check_steps, make_timesteps

__all__ = [
    "MRSchedule",
    "MRLinspace",
    "MRDenoiser",
    "MR_PREDICTION_TYPES",
    "mr_velocity_to_data",
    "mr_prediction",
    "dpmsolver_first_order",
    "dpmsolver_second_order",
    "sde_dpmsolver_first_order",
    "sde_dpmsolver_second_order",
    "mr_euler_maruyama_step",
    "DPMSolver",
    "SDEDPMSolver",
    "MREulerMaruyama",
    "MRSampler",
    "mr_sample",
    "MR_METHODS",
    "MR_SAMPLER_SPECS",
    "make_mr_solver",
    "register_mr_samplers",
]

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Schedule


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

    ``discrete=False``: continuous time ``t in [t_min, 1]``; ``theta="constant"`` gives ``c = -log(eps) t``,
    ``"cosine"`` the continuum limit ``theta(u) ∝ 1 - abar(u)`` of the discrete cosine schedule (closed-
    form ``c``, inverted by bisection to float64 round-off).
    """

    THETAS = ("cosine", "constant")

    def __init__(self, sigma_inf: float = 50 / 255, T: int = 100, theta: str = "cosine", eps: float = 0.005,
                 discrete: bool = True, t_min: float | None = None, cosine_s: float = 0.008):
        if not sigma_inf > 0:
            raise ValueError(f"sigma_inf must be > 0, got {sigma_inf}")
        if not 0 < eps < 1:
            raise ValueError(f"eps (alpha at t_max) must lie in (0, 1), got {eps}")
        if theta not in self.THETAS:
            raise ValueError(f"unknown theta schedule {theta!r}; expected one of {self.THETAS}")
        self.sigma_inf, self.eps, self.theta_kind, self.discrete = float(sigma_inf), float(eps), theta, bool(discrete)
        self.cosine_s = float(cosine_s)
        self.c_max = -math.log(eps)  # c(t_max)
        if self.discrete:
            T = check_steps(T)
            thetas = irsde_cosine_thetas(T, cosine_s) if theta == "cosine" else torch.ones(T + 1, dtype=_F64)
            cumsum = torch.cumsum(thetas, 0) - thetas[0]  # IR-SDE: thetas_cumsum[0] = 0
            self.T = T
            self.dt = self.c_max / cumsum[-1].item()  # IR-SDE's dt = -log(eps) / thetas_cumsum[-1]
            self._knots = cumsum * self.dt  # c at t = 0, 1, ..., T
            self.t_min, self.t_max = float(1 if t_min is None else t_min), float(T)
        else:
            self.T = None
            self.t_min, self.t_max = float(1e-3 if t_min is None else t_min), 1.0
            if theta == "cosine":
                self._a = math.pi / (2 * (1 + cosine_s))
                self._b = self._a * cosine_s
                self._g1 = self._cosine_integral(torch.ones((), dtype=_F64)).item()
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

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
                f"t_min={self.t_min:.4g}, t_max={self.t_max:.4g})")


class MRLinspace(Timesteps):
    """MRS's ``time_schedule="linspace"``: ``n + 1`` points uniform in ``t`` from ``t_max`` to 0, the last
    (clean data) never evaluated. Needs ``final="zero"``."""

    def times(self, schedule: Schedule, n_steps: int, final: str = "zero") -> Tensor:
        n = check_steps(n_steps)
        if final != "zero":
            raise ValueError("MRLinspace ends at clean data; use final='zero'")
        return torch.linspace(schedule.t_max, 0.0, n + 1, dtype=_F64)[:-1]


# ---------------------------------------------------------------------------------------------
# Denoiser

#: Network prediction types: noise ``eps``, data ``x0`` (of ``x``, not ``y``) and MR velocity (see
#: ``mr_velocity_to_data``).
MR_PREDICTION_TYPES = {
    "noise": "noise", "eps": "noise", "epsilon": "noise",
    "data": "data", "x0": "data", "sample": "data",
    "velocity": "velocity", "v": "velocity", "v_prediction": "velocity",
}


def mr_velocity_to_data(v: Tensor, y: Tensor, alpha, sigma, sigma_inf: float) -> Tensor:
    """``y0 = alpha y - (sigma / sigma_inf) v``: MRS's velocity fit (``convert_model_output``:
    ``x0 = alpha x - (sigma / sigma_inf) v + (1 - alpha) mu``), i.e. ``v = alpha sigma_inf eps - (sigma /
    sigma_inf) y0``, Salimans & Ho's ``v`` of the VP path ``y / sigma_inf``, times ``sigma_inf``."""
    return alpha * y - (sigma / sigma_inf) * v


class MRDenoiser(Denoiser):
    """A network ``model(x, t_model, mu=mu)`` (or ``model(x, t_model)`` with ``mu_keyword=None``) of an MR
    diffusion, seen by solvers as a denoiser of ``y = x - mu``: ``forward(y, t, mu) -> Prediction`` with
    ``x0 = x0_hat - mu`` (``y``'s data) and ``eps``, tied by ``y = alpha y0 + sigma eps``.

    ``prediction_type``: ``"noise"`` (DA-CLIP / IR-SDE's ``fit_target``), ``"data"`` (``x0`` of ``x``) or
    ``"velocity"`` (``mr_velocity_to_data``). ``mu``: the default condition, overridden per call.
    ``sample_shape``: if given, ``mu`` must be ``[B, *sample_shape]``. ``model_time`` maps schedule time to
    the network's (identity: MRS feeds float times). ``clip=(lo, hi)``: clamp the data prediction of ``x``
    (e.g. ``(0, 1)`` for images); ``eps`` is recomputed so the pair stays consistent.
    """

    def __init__(self, model: Callable[..., Any], schedule: MRSchedule, prediction_type: str = "noise",
                 mu: Tensor | None = None, mu_keyword: str | None = "mu",
                 model_time: Callable[[Tensor], Tensor] | None = None,
                 sample_shape: tuple[int, ...] | None = None, clip: tuple[float, float] | None = None):
        super().__init__()
        if not isinstance(schedule, MRSchedule):
            raise ValueError(f"an MRDenoiser needs an MRSchedule, not {type(schedule).__name__}")
        try:
            self.prediction_type = MR_PREDICTION_TYPES[prediction_type]
        except (KeyError, TypeError):
            raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                             f"{sorted(MR_PREDICTION_TYPES)}") from None
        self.model, self.schedule, self.mu, self.mu_keyword = model, schedule, mu, mu_keyword
        self.model_time, self.clip = model_time, clip
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def check_mu(self, mu: Tensor | None, y: Tensor | None = None) -> Tensor:
        """``mu`` (or the default) validated against ``sample_shape`` and the sample ``y``."""
        mu = self.mu if mu is None else mu
        if mu is None:
            raise ValueError("no condition mu: pass mu= (the degraded input) or set MRDenoiser(mu=...)")
        _check_mu_shape(mu, self.sample_shape, y)
        return mu

    def forward(self, y: Tensor, t, mu: Tensor | None = None) -> Prediction:
        mu = self.check_mu(mu, y).to(device=y.device, dtype=y.dtype)
        t = torch.as_tensor(t, dtype=_F64)
        alpha, sigma = self.coefficients(t, y)
        a, s = broadcast_like(alpha, y), broadcast_like(sigma, y)
        x = y + mu
        t_model = (self.model_time(t) if self.model_time is not None else t).to(device=y.device, dtype=torch.float32)
        if t_model.ndim == 0:
            t_model = t_model.expand(y.shape[0])
        cond = {} if self.mu_keyword is None else {self.mu_keyword: mu}
        out = self.model(x, t_model, **cond)
        out = (out.sample if hasattr(out, "sample") else out).to(y.dtype)
        return mr_prediction(out, y, mu, a, s, self.prediction_type, self.schedule.sigma_inf, self.clip)


def mr_prediction(output: Tensor, y: Tensor, mu: Tensor, alpha, sigma, prediction_type: str, sigma_inf: float,
                  clip: tuple[float, float] | None = None) -> Prediction:
    """A network output at ``x = y + mu`` as the ``Prediction`` of ``y``: ``"noise"`` is ``eps``; ``"data"`` is
    ``x0_hat`` (``y0 = x0_hat - mu``); ``"velocity"`` goes through ``mr_velocity_to_data``. ``clip=(lo, hi)``
    clamps ``x0_hat`` and recomputes ``eps``. ``alpha``, ``sigma``: floats or tensors broadcastable to ``y``."""
    kind = MR_PREDICTION_TYPES.get(prediction_type)
    if kind is None:
        raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                         f"{sorted(MR_PREDICTION_TYPES)}")
    if output.shape != y.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} does not match input {tuple(y.shape)}")
    if kind == "noise":
        pred = Prediction(eps=output, x=y, alpha=alpha, sigma=sigma)
    elif kind == "data":
        pred = Prediction(x0=output - mu, x=y, alpha=alpha, sigma=sigma)
    else:
        pred = Prediction(x0=mr_velocity_to_data(output, y, alpha, sigma, sigma_inf), x=y, alpha=alpha, sigma=sigma)
    if clip is not None:
        lo, hi = clip
        pred = Prediction(x0=(pred.x0 + mu).clamp(lo, hi) - mu, x=y, alpha=alpha, sigma=sigma)
    return pred


def _check_mu_shape(mu, sample_shape, y: Tensor | None) -> None:
    if not torch.is_tensor(mu) or mu.ndim < 2:
        raise ValueError(f"mu must be a batched tensor [B, *sample_shape], got "
                         f"{tuple(mu.shape) if torch.is_tensor(mu) else type(mu).__name__}")
    if sample_shape is not None and tuple(mu.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"mu has sample shape {tuple(mu.shape[1:])}, expected {tuple(sample_shape)}")
    if y is not None and mu.shape != y.shape:
        raise ValueError(f"mu of shape {tuple(mu.shape)} does not match the sample's {tuple(y.shape)}")


# ---------------------------------------------------------------------------------------------
# DPM-Solver with noise prediction (Lu et al. 2022a) and the MR reverse SDE, as pure functions


def _sigma_expm1(alpha: float, sigma: float, alpha_next: float, sigma_next: float, h: float) -> float:
    """``sigma' (e^h - 1)``; at clean data (``sigma' = 0``, ``h = inf``) its limit ``alpha' sigma / alpha``."""
    if sigma_next == 0:
        return alpha_next * sigma / alpha
    return sigma_next * math.expm1(h)


def dpmsolver_first_order(x: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float,
                          sigma_next: float, h: float) -> Tensor:
    """DPM-Solver-1 (Lu et al. 2022a, eq. 3.7): ``x' = (a'/a) x - s' (e^h - 1) eps``; equals DDIM and
    DPM-Solver++ 1 in exact arithmetic. MRS "ODE-1, noise" in ``y``."""
    return (alpha_next / alpha) * x - _sigma_expm1(alpha, sigma, alpha_next, sigma_next, h) * eps


def dpmsolver_second_order(x: Tensor, e0: Tensor, e1: Tensor, alpha: float, sigma: float, alpha_next: float,
                           sigma_next: float, h: float, h_prev: float, solver_type: str = "heun") -> Tensor:
    """DPM-Solver-2M with noise prediction (multistep; diffusers ``algorithm_type="dpmsolver"``), ``e0``/``e1``
    the newest / previous ``eps``, ``D1 = (e0 - e1) / r``, ``r = h_prev / h``:

    - ``heun`` (MRS "ODE-2, noise", Taylor): ``x' = (a'/a) x - s'(e^h - 1) e0 - s'((e^h - 1)/h - 1) D1``;
    - ``midpoint``: ``... - s'(e^h - 1) D1 / 2``.
    """
    d1 = (e0 - e1) / (h_prev / h)
    phi = math.expm1(h)
    x_next = (alpha_next / alpha) * x - sigma_next * phi * e0
    if solver_type == "midpoint":
        return x_next - 0.5 * sigma_next * phi * d1
    return x_next - sigma_next * (phi / h - 1.0) * d1


def sde_dpmsolver_first_order(x: Tensor, eps: Tensor, alpha: float, alpha_next: float, sigma_next: float,
                              h: float, noise: Tensor) -> Tensor:
    """SDE-DPM-Solver-1 (Lu et al. 2022b, sec. 5; MRS "SDE-1, noise"):
    ``x' = (a'/a) x - 2 s'(e^h - 1) eps + s' sqrt(e^{2h} - 1) z``."""
    return ((alpha_next / alpha) * x - 2.0 * sigma_next * math.expm1(h) * eps
            + sigma_next * math.sqrt(math.expm1(2.0 * h)) * noise)


def sde_dpmsolver_second_order(x: Tensor, e0: Tensor, e1: Tensor, alpha: float, alpha_next: float,
                               sigma_next: float, h: float, h_prev: float, noise: Tensor,
                               solver_type: str = "heun") -> Tensor:
    """SDE-DPM-Solver-2M with noise prediction: SDE-1 plus ``- 2 s'((e^h - 1)/h - 1) D1`` (``heun``, MRS
    "SDE-2, noise") or ``- s'(e^h - 1) D1`` (``midpoint``)."""
    d1 = (e0 - e1) / (h_prev / h)
    x_next = sde_dpmsolver_first_order(x, e0, alpha, alpha_next, sigma_next, h, noise)
    if solver_type == "midpoint":
        return x_next - sigma_next * math.expm1(h) * d1
    return x_next - 2.0 * sigma_next * (math.expm1(h) / h - 1.0) * d1


def mr_euler_maruyama_step(y: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float,
                           sigma_inf: float, noise: Tensor) -> Tensor:
    """One Euler-Maruyama step of the MR reverse SDE (IR-SDE's ``reverse_sde_step``) in ``y = x - mu``:

    ``dy = [-theta y - g^2 score] dt + g dW``, ``g^2 = 2 sigma_inf^2 theta``, ``score = -eps / sigma``. With
    ``dc = int theta dt = log(alpha' / alpha)`` over the step: ``y' = y + dc (y + 2 sigma_inf^2 score) +
    sigma_inf sqrt(2 dc) z`` (IR-SDE: ``theta_t dt`` with ``theta`` at the current ``t``; equal on its
    integer grid)."""
    dc = math.log(alpha_next / alpha)
    return y + dc * (y - (2.0 * sigma_inf**2 / sigma) * eps) + sigma_inf * math.sqrt(2.0 * dc) * noise


# ---------------------------------------------------------------------------------------------
# Solvers (the generator protocol of samplers.solvers)


class DPMSolver(Solver):
    """DPM-Solver multistep with noise prediction (Lu et al. 2022a; MRS with ``parameterization="noise"``),
    order 1 or 2. Orders as ``DPMSolverPP`` (``_multistep_order``): the step to clean data is first order."""

    name = "dpmsolver"
    label = "DPM-Solver (noise prediction)"

    def __init__(self, order: int = 2, solver_type: str = "heun", lower_order_final: bool = False):
        if order not in (1, 2):
            raise ValueError(f"{self.label} order must be 1 or 2, got {order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
        self.order, self.solver_type, self.lower_order_final = int(order), solver_type, bool(lower_order_final)

    def steps(self, grid, noise):
        t, alpha, sigma, lam = _scalars(grid)
        n, x_next, e, h_prev = grid.n_steps, None, [], None
        for i in range(n):
            x, pred = yield x_next, t[i]
            h = lam[i + 1] - lam[i]
            e = (e + [pred.eps])[-2:]
            order = _multistep_order(i, n, self.order, self.lower_order_final, grid.ends_at_data)
            ends = (alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            x_next = x if h == 0 else self.update(x, e, ends, h, h_prev, order, noise)
            h_prev = h
        yield x_next, None

    def update(self, x, e, ends, h, h_prev, order, noise):
        """One step from ``x`` with the last ``eps`` predictions ``e``; ``ends = (a, s, a', s')``."""
        a, s, a_next, s_next = ends
        if order == 1:
            return dpmsolver_first_order(x, e[-1], a, s, a_next, s_next, h)
        return dpmsolver_second_order(x, e[-1], e[-2], a, s, a_next, s_next, h, h_prev, self.solver_type)


class SDEDPMSolver(DPMSolver):
    """SDE-DPM-Solver with noise prediction (Lu et al. 2022b, sec. 5), order 1 or 2. The step to clean
    data (where the noise term has no finite limit) is the deterministic first-order step ``x' = a' x0``."""

    name = "sde_dpmsolver"
    label = "SDE-DPM-Solver (noise prediction)"
    stochastic = True

    def update(self, x, e, ends, h, h_prev, order, noise):
        a, s, a_next, s_next = ends
        if s_next == 0:
            return dpmsolver_first_order(x, e[-1], a, s, a_next, s_next, h)
        if order == 1:
            return sde_dpmsolver_first_order(x, e[-1], a, a_next, s_next, h, noise(x))
        return sde_dpmsolver_second_order(x, e[-1], e[-2], a, a_next, s_next, h, h_prev, noise(x), self.solver_type)


class MREulerMaruyama(Solver):
    """Euler-Maruyama on the MR reverse SDE (the IR-SDE / DA-CLIP baseline sampler), one model call per
    step, noise on every step (IR-SDE's ``reverse_sde``). Needs the grid of an ``MRSchedule`` (for
    ``sigma_inf``) and runs in ``y = x - mu``."""

    name = "mr_euler_maruyama"
    stochastic = True

    def steps(self, grid, noise):
        sched = grid.schedule
        if not isinstance(sched, MRSchedule):
            raise ValueError(f"MR Euler-Maruyama needs a grid of an MRSchedule, not {type(sched).__name__}")
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            x_next = mr_euler_maruyama_step(x, pred.eps, alpha[i], sigma[i], alpha[i + 1], sched.sigma_inf, noise(x))
        yield x_next, None


#: ``(method, parameterisation) -> solver factory(order, solver_type, lower_order_final)``.
MR_METHODS: dict[tuple[str, str], Callable[..., Solver]] = {
    ("ode", "data"): lambda order, solver_type, lof: DPMSolverPP(order, solver_type, lof),
    ("ode", "noise"): lambda order, solver_type, lof: DPMSolver(order, solver_type, lof),
    ("sde", "data"): lambda order, solver_type, lof: SDEDPMSolverPP(order, solver_type, lof),
    ("sde", "noise"): lambda order, solver_type, lof: SDEDPMSolver(order, solver_type, lof),
}


def make_mr_solver(method: str = "ode", parameterization: str = "data", order: int = 2,
                   solver_type: str = "heun", lower_order_final: bool = False) -> Solver:
    """The MRS solver by name: ``method`` ``"ode"`` / ``"sde"`` with ``parameterization`` ``"data"`` /
    ``"noise"``, or the baselines ``"euler_maruyama"`` (IR-SDE's reverse SDE) and ``"posterior"`` (IR-SDE's
    posterior sampling = DDPM's ancestral step on the MR Gaussian path)."""
    if method == "euler_maruyama":
        return MREulerMaruyama()
    if method == "posterior":
        return DDPM("small")
    if method not in ("ode", "sde"):
        raise ValueError(f"unknown MR method {method!r}; expected 'ode', 'sde', 'euler_maruyama' or 'posterior'")
    if parameterization not in ("data", "noise"):
        raise ValueError(f"unsupported MRS parameterization {parameterization!r}; expected 'data' or 'noise'")
    return MR_METHODS[method, parameterization](order, solver_type, lower_order_final)


# ---------------------------------------------------------------------------------------------
# The native restoration API


class MRSampler:
    """MR Sampler: a solver over an MR denoiser (``MRDenoiser`` / ``testbed.ExactMRDenoiser``) in ``y = x - mu``.

    ``solver``: a ``Solver`` or ``method`` / ``parameterization`` / ``order`` / ``solver_type`` for
    ``make_mr_solver`` (default: ODE, data prediction, second order, Taylor: MRS's ``mrsampler.yml``).
    ``timesteps``: a ``Timesteps``, its name, or ``"linspace"`` (MRS's default, ``MRLinspace``; default).
    ``final="zero"`` ends at clean data (t = 0). ``nfe`` is known before running.
    """

    def __init__(self, denoiser: Denoiser, steps: int = 20, method: str = "ode", parameterization: str = "data",
                 order: int = 2, solver_type: str = "heun", lower_order_final: bool = False,
                 solver: Solver | None = None, timesteps: str | Timesteps = "linspace", final: str = "zero"):
        if not isinstance(getattr(denoiser, "schedule", None), MRSchedule):
            raise ValueError("MRSampler needs a denoiser over an MRSchedule (MRDenoiser or ExactMRDenoiser)")
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.steps = check_steps(steps)
        self.solver = solver if solver is not None else make_mr_solver(method, parameterization, order, solver_type,
                                                                       lower_order_final)
        self.timesteps = MRLinspace() if timesteps == "linspace" else make_timesteps(timesteps)
        self.final = final
        self.grid: Grid = self.timesteps.grid(self.schedule, self.steps, final=final)
        self.plan = self.solver.plan(self.grid)

    @property
    def nfe(self) -> int:
        return len(self.plan)

    def prior_sample(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """IR-SDE's ``noise_state`` in ``y``: ``y_T = sigma_inf z`` (so ``x_T = mu + sigma_inf z``)."""
        z = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return self.schedule.sigma_inf * z

    @torch.no_grad()
    def sample(self, mu: Tensor, generator: torch.Generator | None = None, y_T: Tensor | None = None,
               noise: NoiseFn | None = None, callback: Callable[[dict], None] | None = None) -> Tensor:
        """Restore: ``x_0`` from the condition ``mu [B, *S]`` (e.g. the degraded images).

        ``y_T`` (default ``prior_sample``) is the start in ``y = x - mu``; ``generator`` feeds the prior and
        stochastic solvers (or pass ``noise``); ``callback`` gets ``{"i", "t", "x", "denoised", "eps"}`` in ``y``.
        """
        _check_mu_shape(mu, getattr(self.denoiser, "sample_shape", None), y_T)
        if y_T is None:
            y_T = self.prior_sample(mu, generator)
        noise = noise if noise is not None else randn_noise(generator)
        mu_in = mu.to(y_T.dtype)

        def denoise(y, t):
            return self.denoiser(y, t, mu=mu_in)

        y = run_solver(self.solver, self.grid, denoise, y_T, noise, callback)
        return y + mu_in

    def __repr__(self) -> str:
        return f"MRSampler({self.solver!r}, steps={self.steps}, nfe={self.nfe}, timesteps={self.timesteps!r})"


def mr_sample(denoiser: Denoiser, mu: Tensor, steps: int = 20, generator: torch.Generator | None = None,
              y_T: Tensor | None = None, **options) -> Tensor:
    """One-call restoration: ``MRSampler(denoiser, steps, **options).sample(mu, generator, y_T)``."""
    return MRSampler(denoiser, steps, **options).sample(mu, generator=generator, y_T=y_T)


# ---------------------------------------------------------------------------------------------
# Registry


#: The MRS solvers by registry name. They are the DPM-Solver family and run on any Gaussian path; the MR
#: part is the y = x - mu shift, which lives in the denoiser (``MRDenoiser``) and in ``MRSampler.sample``.
MR_SAMPLER_SPECS = {
    "mrs_data": SamplerSpec(DPMSolverPP, {}, "MR Sampler ODE, data prediction (DPM-Solver++, taylor 2nd order)",
                            {"order": 2, "solver_type": "heun", "lower_order_final": False}),
    "mrs_noise": SamplerSpec(DPMSolver, {}, "MR Sampler ODE, noise prediction (DPM-Solver, Lu et al. 2022a)",
                             {"order": 2, "solver_type": "heun"}),
    "mrs_sde_data": SamplerSpec(SDEDPMSolverPP, {}, "MR Sampler SDE, data prediction (SDE-DPM-Solver++)",
                                {"order": 2, "solver_type": "heun", "lower_order_final": False}),
    "mrs_sde_noise": SamplerSpec(SDEDPMSolver, {}, "MR Sampler SDE, noise prediction (SDE-DPM-Solver)",
                                 {"order": 2, "solver_type": "heun"}),
}


def register_mr_samplers(registry: dict | None = None) -> dict:
    """Add ``MR_SAMPLER_SPECS`` to ``registry`` (default: ``samplers.sampler.SAMPLERS``); idempotent.

    Not called on import: the registry should gain these names exactly when the package imports this
    module, so that every consumer of ``SAMPLERS`` (CLI listing, demo, diffusers adapter) agrees.
    ``MREulerMaruyama`` is not registered: it needs an ``MRSchedule`` grid (use ``MRSampler``).
    """
    registry = SAMPLERS if registry is None else registry
    registry.update(MR_SAMPLER_SPECS)
    return registry


# ---------------------------------------------------------------------------------------------
# diffusers-style scheduler (built on first access: ``from fewstep.samplers.mr import MRScheduler`` imports diffusers)


def _make_mr_scheduler_class():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class MRScheduler(SchedulerMixin, ConfigMixin):
        """The MR Sampler as a diffusers scheduler, for restoration loops that call the network on ``x``:

            sched = MRScheduler(prediction_type="noise")          # IR-SDE defaults: T=100, sigma 50/255
            sched.set_timesteps(20, mu=degraded)
            x = sched.noise_state(degraded, generator=g)          # mu + sigma_inf z
            for t in sched.timesteps:
                x = sched.step(net(x, t, mu=degraded), t, x).prev_sample

        ``step`` works on ``y = x - mu`` inside and returns ``x``; the solver is ``make_mr_solver(method,
        parameterization, solver_order, solver_type, lower_order_final)``, the same generator ``MRSampler``
        drives, so both give the same samples. ``timestep_spacing``: ``"linspace"`` (MRS) or a fewstep
        spacing name (``"log_snr"``, ``"time_uniform"``, ``"karras"``, ``"time_quadratic"``).
        """

        order = 1

        @register_to_config
        def __init__(self, num_train_timesteps: int = 100, max_sigma: float = 50 / 255, eps: float = 0.005,
                     theta_schedule: str = "cosine", prediction_type: str = "noise", method: str = "ode",
                     parameterization: str = "data", solver_order: int = 2, solver_type: str = "heun",
                     lower_order_final: bool = False, timestep_spacing: str = "linspace", t_min: float | None = None):
            self.noise_schedule = MRSchedule(max_sigma, num_train_timesteps, theta_schedule, eps, t_min=t_min)
            self.solver = make_mr_solver(method, parameterization, solver_order, solver_type, lower_order_final)
            if prediction_type not in MR_PREDICTION_TYPES:
                raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                                 f"{sorted(MR_PREDICTION_TYPES)}")
            self._spacing = MRLinspace() if timestep_spacing == "linspace" else make_timesteps(timestep_spacing)
            self.init_noise_sigma = float(max_sigma)
            self.mu: Tensor | None = None
            self.timesteps = torch.arange(num_train_timesteps, 0, -1)
            self.num_inference_steps: int | None = None
            self.grid: Grid | None = None
            self._run, self._plan, self._step_index, self._generator = None, [], None, None

        def set_mu(self, mu: Tensor) -> None:
            """The condition (degraded input) of the current run, ``[B, *S]``."""
            _check_mu_shape(mu, None, None)
            self.mu = mu

        def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                          mu: Tensor | None = None):
            """Grid and a fresh solver run of ``num_inference_steps`` steps; optionally the condition ``mu``."""
            from .schedulers import _as_timestep_tensor

            if mu is not None:
                self.set_mu(mu)
            self.num_inference_steps = check_steps(num_inference_steps)
            self.grid = self._spacing.grid(self.noise_schedule, self.num_inference_steps, final="zero")
            self._plan = self.solver.plan(self.grid)
            self._run = self.solver.steps(self.grid, self._noise)
            next(self._run)
            self._step_index = None
            self.timesteps = _as_timestep_tensor(self._plan, device)

        @property
        def step_index(self) -> int | None:
            return self._step_index

        @property
        def nfe(self) -> int:
            return len(self._plan)

        def _noise(self, like: Tensor) -> Tensor:
            return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

        def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
            return sample

        def noise_state(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
            """IR-SDE's start ``x_T = mu + sigma_inf z``."""
            z = randn_tensor(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            return mu + self.init_noise_sigma * z

        def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
                 return_dict: bool = True):
            """Consume the network output at ``x = sample`` for the current planned call; return the next ``x``."""
            if self._run is None:
                raise RuntimeError("call set_timesteps before step")
            if self.mu is None:
                raise ValueError("no condition mu: call set_mu(mu) or set_timesteps(..., mu=mu) first")
            k = 0 if self._step_index is None else self._step_index
            if k >= len(self._plan):
                raise RuntimeError(f"step called {k + 1} times for a run of {len(self._plan)} model calls")
            t = self._plan[k]
            if abs(float(torch.as_tensor(timestep).reshape(-1)[0]) - t) > 1e-3 * max(1.0, abs(t)):
                raise ValueError(f"step got timestep {timestep} but model call {k} of this run is at {t}")
            dtype = sample.dtype
            x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
            mu = self.mu.to(device=x.device, dtype=x.dtype)
            _check_mu_shape(mu, None, x)
            tt = torch.tensor(t, dtype=_F64)
            a, s = self.noise_schedule.alpha(tt).item(), self.noise_schedule.sigma(tt).item()
            y = x - mu
            pred = mr_prediction(model_output.to(x.dtype), y, mu, a, s, self.config.prediction_type,
                                 self.noise_schedule.sigma_inf)
            self._generator = generator
            y_next, _ = self._run.send((y, pred))
            self._step_index = k + 1
            prev_sample = (y_next + mu).to(dtype)
            return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

        def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
            """The MR forward marginal ``alpha x0 + (1 - alpha) mu + sigma eps`` at (per-sample) ``timesteps``."""
            if self.mu is None:
                raise ValueError("add_noise needs the condition: call set_mu(mu) first")
            t = torch.as_tensor(timesteps, dtype=_F64).reshape(-1).cpu()
            x0 = original_samples
            a = broadcast_like(self.noise_schedule.alpha(t).to(x0.device), x0)
            s = broadcast_like(self.noise_schedule.sigma(t).to(x0.device), x0)
            mu = self.mu.to(device=x0.device, dtype=x0.dtype)
            return (a * x0 + (1 - a) * mu + s * noise).to(x0.dtype)

        def __len__(self) -> int:
            return self.config.num_train_timesteps

    return MRScheduler


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    if name == "MRScheduler":
        if name not in _LAZY:
            _LAZY[name] = _make_mr_scheduler_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
