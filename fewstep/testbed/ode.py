"""Exact probability-flow ODE solutions: in closed form for one Gaussian, to ``rtol = 1e-10`` by DOP853 for
mixtures and for any denoiser.

The ODE is integrated in VP "angle" coordinates, which make it schedule-independent and bounded:
``phi = atan2(sigma, alpha)`` (so ``tan phi = sigma_bar``) and ``y = x / sqrt(alpha^2 + sigma^2)
= cos(phi) x0 + sin(phi) eps``. Along the PF ODE (Song et al. 2021, eq. 13; Karras et al. 2022,
eq. 4: ``d(x/alpha) / d sigma_bar = eps_hat``),

    dy / dphi = -sin(phi) x0_hat + cos(phi) eps_hat,

a smooth right-hand side on ``phi in [0, pi/2)`` that reaches clean data (``phi = 0``) exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from fewstep.samplers.denoisers import Denoiser
from fewstep.samplers.schedules import Schedule

from .exact import _exact_posterior, guided_posterior
from .mixture import GaussianMixture, Posterior, _f64, _flat

__all__ = ["gaussian_pf_ode_solution", "mixture_pf_ode_solution", "reference_pf_ode_solution"]


def _angle(schedule: Schedule, t) -> tuple[float, float]:
    """``(phi, r)`` with ``phi = atan2(sigma, alpha)``, ``r = sqrt(alpha^2 + sigma^2)``; None: clean data."""
    if t is None:
        return 0.0, 1.0
    alpha, sigma = float(schedule.alpha(float(t))), float(schedule.sigma(float(t)))
    return math.atan2(sigma, alpha), math.hypot(alpha, sigma)


def gaussian_pf_ode_solution(mixture: GaussianMixture, schedule: Schedule, x_start: Tensor, t_start,
                             t_end=None) -> Tensor:
    """Closed-form PF-ODE map of one Gaussian ``N(m, diag v)``, ``t_start -> t_end`` (None: clean data).

    ``(x_t - alpha_t m) / sqrt(alpha_t^2 v + sigma_t^2)`` is constant along the ODE, coordinate-wise
    (the ODE is linear and maps the marginal ``N(alpha m, alpha^2 v + sigma^2)`` at one time to the next).
    """
    if mixture.n_components != 1:
        raise ValueError(f"closed form needs one Gaussian, got {mixture.n_components} components")
    m, v = mixture.means[0], mixture.variances[0]

    def coeffs(t):
        if t is None:
            return 1.0, 0.0
        return float(schedule.alpha(float(t))), float(schedule.sigma(float(t)))

    (a0, s0), (a1, s1) = coeffs(t_start), coeffs(t_end)
    x = _flat(x_start)
    z = (x - a0 * m) / torch.sqrt(a0**2 * v + s0**2)
    return (a1 * m + torch.sqrt(a1**2 * v + s1**2) * z).reshape(x_start.shape)


def _integrate_angle(velocity: Callable[[Tensor, float], Tensor], y0: Tensor, phi0: float, phi1: float,
                     rtol: float, atol: float) -> Tensor:
    """Solve ``dy/dphi = velocity(y, phi)`` from ``phi0`` to ``phi1`` with DOP853 on the whole batch."""
    if phi0 == phi1:
        return y0.clone()
    shape = y0.shape

    def rhs(phi, y):
        return velocity(torch.from_numpy(y).reshape(shape), float(phi)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (phi0, phi1), y0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference PF-ODE integration failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


def _posterior_velocity(posterior: Posterior) -> Callable[[Tensor, float], Tensor]:
    """``dy/dphi = -sin(phi) x0_hat + cos(phi) eps_hat`` with the posterior at ``(cos phi, sin phi)``."""

    def velocity(y, phi):
        c, s = math.cos(phi), math.sin(phi)
        pred = posterior(y, c, s)
        return -s * pred.x0 + c * pred.eps

    return velocity


def _solve_pf_ode(velocity, schedule: Schedule, x_start: Tensor, t_start, t_end, rtol, atol) -> Tensor:
    (phi0, r0), (phi1, r1) = _angle(schedule, t_start), _angle(schedule, t_end)
    y0 = _flat(x_start).cpu() / r0
    y1 = _integrate_angle(velocity, y0, phi0, phi1, rtol, atol)
    return (r1 * y1).reshape(x_start.shape).to(x_start.device)


def mixture_pf_ode_solution(mixture: GaussianMixture, schedule: Schedule, x_start: Tensor, t_start, t_end=None,
                            class_label=None, guidance_scale: float | None = None, rtol: float = 1e-10,
                            atol: float = 1e-10) -> Tensor:
    """Exact (to ``rtol``) PF-ODE map of a mixture, ``t_start -> t_end``; None means clean data.

    Uses the closed-form posterior at every noise level, so it reaches ``sigma = 0`` exactly.
    ``class_label`` (int or ``[B]``): conditional ODE; with ``guidance_scale`` the CFG-guided ODE.
    Returns float64 on ``x_start``'s device (the integration runs on the CPU).
    """
    velocity = _posterior_velocity(guided_posterior(mixture, class_label, guidance_scale))
    return _solve_pf_ode(velocity, schedule, x_start, t_start, t_end, rtol, atol)


def reference_pf_ode_solution(denoiser: Denoiser, x_start: Tensor, t_start, t_end=None, rtol: float = 1e-10,
                              atol: float = 1e-10) -> Tensor:
    """PF-ODE map of any ``denoiser`` (e.g. a ``CFGDenoiser`` over ``ExactDenoiser``s), ``t_start -> t_end``.

    The denoiser is called in float64 at schedule times ``t = t_from_sigma_bar(tan phi)`` inside
    ``[t_min, t_max]`` only. An endpoint ``None`` (clean data) needs the closed-form posterior below
    ``t_min`` and so works only for ``ExactDenoiser`` and CFG combinations of them. The denoiser must
    accept float64 input. Returns float64 on ``x_start``'s device (the integration runs on the CPU).
    """
    schedule = denoiser.schedule
    exact = _exact_posterior(denoiser)
    if (t_start is None or t_end is None) and exact is None:
        raise ValueError(f"an endpoint at clean data (None) needs an ExactDenoiser or a CFG of them, not "
                         f"{type(denoiser).__name__}; pass a schedule time such as schedule.t_min")
    for t in (t_start, t_end):
        if t is not None:
            schedule.check_times(t)
    phi_min, _ = _angle(schedule, schedule.t_min)
    lam_lo, lam_hi = schedule.log_snr(schedule.t_max), schedule.log_snr(schedule.t_min)
    below = _posterior_velocity(exact) if exact is not None else None
    shape = (-1,) + tuple(x_start.shape[1:])

    def velocity(y, phi):
        if below is not None and phi < phi_min:  # below t_min: the same ODE, from the closed-form posterior
            return below(y, phi)
        lam = torch.clamp(-torch.log(_f64(math.tan(phi))), lam_lo, lam_hi)
        t = torch.clamp(schedule.t_from_log_snr(lam), schedule.t_min, schedule.t_max)
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        with torch.no_grad():
            pred = denoiser((math.hypot(alpha, sigma) * y).reshape(shape).to(x_start.device), t)
        x0, eps = _flat(pred.x0).cpu(), _flat(pred.eps).cpu()
        return -math.sin(phi) * x0 + math.cos(phi) * eps

    return _solve_pf_ode(velocity, schedule, x_start, t_start, t_end, rtol, atol)
