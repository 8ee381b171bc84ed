"""Update functions: one solver step each, pure functions of tensors and Python-float scalars.

The DPM-Solver family shares one scalar form: ``(alpha, sigma, alpha_next, sigma_next, h[, h_prev[,
h_prev2]])``, the noise levels at the current and the next grid point and the log-SNR step sizes
``h = lambda' - lambda`` (newest first), then the noise draw ``noise`` where the update is stochastic,
then options. A solver passes the same four ``ends`` to every update, whether it reads them all or not.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = [
    "ddim_step",
    "ddim_eps_weight",
    "ddim_sigma_eta",
    "ddpm_posterior",
    "sigma_bar_transfer",
    "dpmpp_first_order",
    "dpmpp_second_order",
    "dpmpp_third_order",
    "sde_dpmpp_first_order",
    "sde_dpmpp_second_order",
    "dpmsolver_first_order",
    "dpmsolver_second_order",
    "dpmsolver_third_order",
    "sde_dpmsolver_first_order",
    "sde_dpmsolver_second_order",
    "adams_bashforth",
    "AB_COEFFICIENTS",
]


# ---------------------------------------------------------------------------------------------
# DDIM, DDPM and the sigma_bar Euler step


def ddim_step(x0: Tensor, eps: Tensor, alpha_next: float, sigma_next: float, sigma_eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): ``x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z``.

    A reconstruction from ``(x0, eps)`` at the next point only; it needs no current scalars."""
    x = alpha_next * x0 + ddim_eps_weight(sigma_next, sigma_eta) * eps
    return x if sigma_eta == 0.0 else x + sigma_eta * noise


def ddim_eps_weight(sigma_next: float, sigma_eta: float = 0.0) -> float:
    """DDIM's weight of ``eps`` at the next point, ``sqrt(sigma'^2 - s^2)``: the rest of its noise is fresh."""
    return math.sqrt(max(sigma_next**2 - sigma_eta**2, 0.0))


def ddim_sigma_eta(eta: float, sigma_next: float, h: float) -> float:
    """DDIM's stochasticity ``sigma_eta`` (eq. 16) in log-SNR form: ``eta sigma' sqrt(1 - e^{-2h})``.

    Equals ``eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')`` for VP schedules with ``a = alpha^2``.
    """
    return eta * sigma_next * math.sqrt(-math.expm1(-2.0 * h)) if eta else 0.0


def ddpm_posterior(x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float,
                   sigma_next: float) -> tuple[Tensor, float]:
    """Mean and variance of ``q(x_s | x_t, x0)`` for a Gaussian path (Ho et al. 2020, eq. 7;
    Kingma et al. 2021, eq. 29), with ``t`` the current and ``s`` the next, less noisy point."""
    a_ts = alpha / alpha_next
    var_ts = sigma**2 - a_ts**2 * sigma_next**2
    mean = (a_ts * sigma_next**2 / sigma**2) * x + (alpha_next * var_ts / sigma**2) * x0
    return mean, var_ts * sigma_next**2 / sigma**2


def sigma_bar_transfer(x: Tensor, direction: Tensor, alpha: float, sigma: float, alpha_next: float,
                       sigma_next: float) -> Tensor:
    """One Euler step of the PF ODE ``d(x/alpha) / d sigma_bar = eps`` with slope ``direction``.

    ``x' = alpha' (x / alpha + (sigma_bar' - sigma_bar) direction)``; with ``direction = eps`` this
    is DDIM (eta = 0), and it is PNDM's transfer function (Liu et al. 2022, eq. 11).
    """
    return alpha_next * (x / alpha + (sigma_next / alpha_next - sigma / alpha) * direction)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction; Lu et al. 2022b)


def dpmpp_first_order(x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float, sigma_next: float,
                      h: float) -> Tensor:
    """DPM-Solver++ 1 (Lu et al. 2022b, eq. 9 with k = 1): ``x' = (s'/s) x - a' (e^{-h} - 1) x0``."""
    return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * x0


def dpmpp_second_order(x: Tensor, m0: Tensor, m1: Tensor, alpha: float, sigma: float, alpha_next: float,
                       sigma_next: float, h: float, h_prev: float, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), ``m0``/``m1`` the newest / previous ``x0``.

    ``midpoint``: ``D = m0 + (m0 - m1) / (2 r)``; ``heun``: the Taylor variant of diffusers.
    """
    r = h_prev / h
    d1 = (m0 - m1) / r
    phi = math.expm1(-h)
    x_next = (sigma_next / sigma) * x - alpha_next * phi * m0
    if solver_type == "midpoint":
        return x_next - 0.5 * alpha_next * phi * d1
    return x_next + alpha_next * (phi / h + 1.0) * d1


def dpmpp_third_order(x: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, alpha: float, sigma: float,
                      alpha_next: float, sigma_next: float, h: float, h_prev: float, h_prev2: float,
                      d2_weight: float = 2.0) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, eq. 8 truncated after the second derivative).

    With ``r0 = h_prev / h``, ``r1 = h_prev2 / h``, the divided differences give ``D1 ~ h x0'`` and
    ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2``. The exact integral's second-order term is
    ``alpha' (h^2/2 - h + 1 - e^{-h}) x0''``, i.e. ``2 alpha' (1/2 - (h - 1 + e^{-h}) / h^2) D2``:
    ``d2_weight = 2``. The reference code (DPM-Solver, diffusers, k-diffusion) uses weight 1, which
    leaves an O(h^3) local error: second order, measured in tests/test_solvers.py.
    """
    r0, r1 = h_prev / h, h_prev2 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi = math.expm1(-h)
    return ((sigma_next / sigma) * x - alpha_next * phi * m0 + alpha_next * (phi / h + 1.0) * d1
            - d2_weight * alpha_next * ((phi + h) / h**2 - 0.5) * d2)


def sde_dpmpp_first_order(x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float,
                          sigma_next: float, h: float, noise: Tensor) -> Tensor:
    """SDE-DPM-Solver++ 1 (Lu et al. 2022b, sec. 5; first order): exact for the linear part of
    the reverse SDE, ``x' = (s'/s) e^{-h} x + a' (1 - e^{-2h}) x0 + s' sqrt(1 - e^{-2h}) z``."""
    decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    return (sigma_next / sigma * math.exp(-h)) * x + alpha_next * decay * x0 + sigma_next * math.sqrt(decay) * noise


def sde_dpmpp_second_order(x: Tensor, m0: Tensor, m1: Tensor, alpha: float, sigma: float, alpha_next: float,
                           sigma_next: float, h: float, h_prev: float, noise: Tensor,
                           solver_type: str = "midpoint") -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5, with Algorithm 2's multistep difference),
    with diffusers' ``midpoint`` / ``heun`` second-order term on ``D1 = (m0 - m1) / r``."""
    decay = -math.expm1(-2.0 * h)
    d1 = (m0 - m1) / (h_prev / h)
    x_next = (sigma_next / sigma * math.exp(-h)) * x + alpha_next * decay * m0 + sigma_next * math.sqrt(decay) * noise
    if solver_type == "midpoint":
        return x_next + 0.5 * alpha_next * decay * d1
    return x_next + alpha_next * (decay / (-2.0 * h) + 1.0) * d1


# ---------------------------------------------------------------------------------------------
# DPM-Solver (noise prediction; Lu et al. 2022a) and its SDE form


def _sigma_expm1(alpha: float, sigma: float, alpha_next: float, sigma_next: float, h: float) -> float:
    """``sigma' (e^h - 1)``; at clean data (``sigma' = 0``, ``h = inf``) its limit ``alpha' sigma / alpha``."""
    if sigma_next == 0:
        return alpha_next * sigma / alpha
    return sigma_next * math.expm1(h)


def dpmsolver_first_order(x: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float,
                          sigma_next: float, h: float) -> Tensor:
    """DPM-Solver-1 (Lu et al. 2022a, eq. 3.7): ``x' = (a'/a) x - s' (e^h - 1) eps``; equals DDIM and
    DPM-Solver++ 1 in exact arithmetic."""
    return (alpha_next / alpha) * x - _sigma_expm1(alpha, sigma, alpha_next, sigma_next, h) * eps


def dpmsolver_second_order(x: Tensor, e0: Tensor, e1: Tensor, alpha: float, sigma: float, alpha_next: float,
                           sigma_next: float, h: float, h_prev: float, solver_type: str = "heun") -> Tensor:
    """DPM-Solver-2M with noise prediction (Lu et al. 2022a, Prop. 3.1's exact solution with ``eps``
    Taylor-expanded to first order, its derivative a multistep difference as in diffusers'
    ``algorithm_type="dpmsolver"``), ``e0``/``e1`` the newest / previous ``eps``,
    ``D1 = (e0 - e1) / r``, ``r = h_prev / h``:

    - ``heun`` (Taylor): ``x' = (a'/a) x - s'(e^h - 1) e0 - s'((e^h - 1)/h - 1) D1``;
    - ``midpoint``: ``... - s'(e^h - 1) D1 / 2``.
    """
    d1 = (e0 - e1) / (h_prev / h)
    phi = math.expm1(h)
    x_next = (alpha_next / alpha) * x - sigma_next * phi * e0
    if solver_type == "midpoint":
        return x_next - 0.5 * sigma_next * phi * d1
    return x_next - sigma_next * (phi / h - 1.0) * d1


def dpmsolver_third_order(x: Tensor, e0: Tensor, e1: Tensor, e2: Tensor, alpha: float, sigma: float,
                          alpha_next: float, sigma_next: float, h: float, h_prev: float, h_prev2: float,
                          d2_weight: float = 2.0) -> Tensor:
    """DPM-Solver-3M with noise prediction (Lu et al. 2022a, Prop. 3.1 with ``eps`` Taylor-expanded to
    second order; its derivatives the divided differences of ``dpmpp_third_order``, ``D1 ~ h eps'``,
    ``D2 ~ h^2 eps'' / 2``): ``x' = (a'/a) x - s'[(e^h - 1) e0 + phi2 D1 + d2_weight phi3 D2]`` with
    ``phi2 = (e^h - 1)/h - 1``, ``phi3 = phi2 / h - 1/2``. The exact integral's second-order term is
    ``s' h^3 phi_3(h) eps'' = 2 phi3 D2``: ``d2_weight = 2`` is third order; MRS's ODE-3 (noise) uses 1,
    second order, as the reference DPM-Solver++(3M) does (``dpmpp_third_order``)."""
    r0, r1 = h_prev / h, h_prev2 / h
    d1_0, d1_1 = (e0 - e1) / r0, (e1 - e2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi1 = math.expm1(h)
    phi2 = phi1 / h - 1.0
    phi3 = phi2 / h - 0.5
    return (alpha_next / alpha) * x - sigma_next * (phi1 * e0 + phi2 * d1 + d2_weight * phi3 * d2)


def sde_dpmsolver_first_order(x: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float,
                              sigma_next: float, h: float, noise: Tensor) -> Tensor:
    """SDE-DPM-Solver-1 (Lu et al. 2022b, sec. 5, its noise-prediction form; first order):
    ``x' = (a'/a) x - 2 s'(e^h - 1) eps + s' sqrt(e^{2h} - 1) z``."""
    return ((alpha_next / alpha) * x - 2.0 * sigma_next * math.expm1(h) * eps
            + sigma_next * math.sqrt(math.expm1(2.0 * h)) * noise)


def sde_dpmsolver_second_order(x: Tensor, e0: Tensor, e1: Tensor, alpha: float, sigma: float, alpha_next: float,
                               sigma_next: float, h: float, h_prev: float, noise: Tensor,
                               solver_type: str = "heun") -> Tensor:
    """SDE-DPM-Solver-2M with noise prediction (Lu et al. 2022b, sec. 5, with a multistep ``D1``):
    SDE-1 plus ``- 2 s'((e^h - 1)/h - 1) D1`` (``heun``) or ``- s'(e^h - 1) D1`` (``midpoint``)."""
    d1 = (e0 - e1) / (h_prev / h)
    x_next = sde_dpmsolver_first_order(x, e0, alpha, sigma, alpha_next, sigma_next, h, noise)
    if solver_type == "midpoint":
        return x_next - sigma_next * math.expm1(h) * d1
    return x_next - 2.0 * sigma_next * (math.expm1(h) / h - 1.0) * d1


# ---------------------------------------------------------------------------------------------
# Adams-Bashforth


#: Fixed-step Adams-Bashforth coefficients, newest first (PNDM eq. 12; Hairer et al. III.1).
AB_COEFFICIENTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
    5: (1901 / 720, -2774 / 720, 2616 / 720, -1274 / 720, 251 / 720),
}


def adams_bashforth(history: list[Tensor]) -> Tensor:
    """Fixed-step AB combination of ``history`` (oldest first) at order ``len(history)``."""
    coeffs = AB_COEFFICIENTS[len(history)]
    out = coeffs[0] * history[-1]
    for c, e in zip(coeffs[1:], reversed(history[:-1])):
        out = out + c * e
    return out
