"""Heavy-ball momentum samplers (Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating
Divergence Artifacts", ICLR 2024).

Everything runs in the variables ``x_bar = x / alpha`` and ``sigma_bar = sigma / alpha``, where the PF
ODE is ``d x_bar / d sigma_bar = eps_hat`` and one Euler step is DDIM (``sigma_bar_transfer``).

- HB on PLMS_r (paper eq. 11-12): ``v <- (1 - beta) v + beta AB_r(eps)``; ``x_bar += d sigma_bar v``.
  Any ``beta < 1`` makes it first order (paper Theorem 1) but enlarges the stability region.
- GHVB_r (paper eq. 15-19): ``v <- (1 - beta) v + beta eps``; ``x_bar += d sigma_bar B_r(beta)(v)``
  with the beta-dependent multistep combination ``B_r`` of the velocities: order r for any beta.
- HB on DPM-Solver++(2M): momentum on the combined data prediction ``m0 + (m0 - m1) / (2 r)``;
  first-order steps bypass it (as the official code does).

The "momentum number" ``m`` (e.g. 3.8) is shorthand for order ``floor(m) + 1`` with ``beta = frac(m)``;
an integer ``m`` means order ``m`` with ``beta = 1`` (no momentum).
"""

from __future__ import annotations

import math

from torch import Tensor

from .solvers import Multistep, Solver, _scalars
from .updates import adams_bashforth, dpmpp_first_order, sigma_bar_transfer

__all__ = [
    "momentum_number",
    "heavy_ball",
    "ghvb_coefficients",
    "ghvb_combination",
    "HeavyBall",
    "GHVB",
]

#: GHVB's multistep coefficients, newest velocity first, as ``(a, b)`` pairs meaning ``(a + b beta) / d``
#: (paper eq. 19; the official ``AdamBmixer``). At ``beta = 1`` each row is Adams-Bashforth.
_GHVB_ROWS = {
    1: ((0, 1),),
    2: ((2, 1), (-2, 1)),
    3: ((18, 5), (-24, 8), (6, -1)),
    4: ((46, 9), (-78, 19), (42, -5), (-10, 1)),
    5: ((1650, 251), (-3420, 646), (2880, -264), (-1380, 106), (270, -19)),
}
_GHVB_DENOMINATORS = {1: 1, 2: 2, 3: 12, 4: 24, 5: 720}


def momentum_number(m: float) -> tuple[int, float]:
    """``(order, beta)`` from the paper's momentum number: 3.8 -> (4, 0.8); 2 -> (2, 1.0)."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or not math.isfinite(m):
        raise ValueError(f"momentum number must be a positive number like 3.8, got {m!r}")
    frac = round(m - math.floor(m), 10)
    order, beta = (int(math.floor(m)) + 1, frac) if frac > 0 else (int(round(m)), 1.0)
    if order not in _GHVB_ROWS:
        raise ValueError(f"momentum number {m} means order {order}; orders 1..5 are supported")
    return order, beta


def _resolve(order, beta, momentum, max_order: int) -> tuple[int, float]:
    """Order and beta from either ``momentum`` or ``(order, beta)``, validated."""
    if momentum is not None:
        order, beta = momentum_number(momentum)
    if order not in range(1, max_order + 1) or isinstance(order, bool):
        raise ValueError(f"order must be an integer in 1..{max_order}, got {order!r}")
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(f"beta must lie in (0, 1], got {beta!r}")
    return int(order), float(beta)


def heavy_ball(velocity: Tensor, update: Tensor, beta: float) -> Tensor:
    """Polyak's heavy ball as an exponential moving average: ``(1 - beta) v + beta update``."""
    return update if beta == 1.0 else (1.0 - beta) * velocity + beta * update


def ghvb_coefficients(order: int, beta: float) -> tuple[float, ...]:
    """GHVB's weights on ``v_{n+1}, v_n, ...`` (newest first), already divided by ``beta``; they sum to 1."""
    d = _GHVB_DENOMINATORS[order]
    return tuple((a + b * beta) / (d * beta) for a, b in _GHVB_ROWS[order])


def ghvb_combination(velocities: list[Tensor], beta: float) -> Tensor:
    """GHVB slope from the velocity history (oldest first) at order ``len(velocities)``."""
    coeffs = ghvb_coefficients(len(velocities), beta)
    out = coeffs[0] * velocities[-1]
    for c, v in zip(coeffs[1:], reversed(velocities[:-1])):
        out = out + c * v
    return out


def dpmpp_2m_data_prediction(m0: Tensor, m1: Tensor, h: float, h_prev: float) -> Tensor:
    """DPM-Solver++(2M)'s combined data prediction ``m0 + (m0 - m1) / (2 r)``, ``r = h_prev / h``
    (Lu et al. 2022b, Algorithm 2): the 2M step is the first-order step taken with it."""
    return m0 + (m0 - m1) * (0.5 * h / h_prev)


class HeavyBall(Multistep):
    """HB(beta) momentum on PLMS_r (``base="plms"``, fixed-step AB with lower-order warm-up) or on
    DPM-Solver++(2M) (``base="dpmsolver++"``, midpoint). ``beta = 1`` is the base method exactly.

    ``nesterov=True`` (PLMS base only) takes the step with ``(1 - beta) v + beta AB_r(eps)`` after the
    velocity update (the official NT variant). Give ``order`` and ``beta``, or ``momentum`` (3.8).
    On DPM-Solver++ it is the ``Multistep`` loop with the velocity as its carried state.
    """

    name = "hb"
    BASES = {"plms": "plms", "dpmsolver++": "dpmsolver++", "dpmpp": "dpmsolver++", "dpmpp_2m": "dpmsolver++"}

    def __init__(self, base: str = "plms", order: int = 4, beta: float = 0.8, momentum: float | None = None,
                 nesterov: bool = False, lower_order_final: bool = True):
        if base not in self.BASES:
            raise ValueError(f"unknown heavy-ball base {base!r}; expected 'plms' or 'dpmsolver++'")
        self.base = self.BASES[base]
        if self.base == "dpmsolver++":
            order = 2 if momentum is None else order
        self.order, self.beta = _resolve(order, beta, momentum, 4 if self.base == "plms" else 5)
        if self.base == "dpmsolver++" and self.order != 2:
            raise ValueError("heavy ball on DPM-Solver++ is defined for its 2M form only (order 2)")
        if nesterov and self.base != "plms":
            raise ValueError("the Nesterov variant is defined on the PLMS base only")
        self.nesterov, self.lower_order_final = bool(nesterov), bool(lower_order_final)

    def steps(self, grid, noise):
        return self._plms(grid) if self.base == "plms" else super().steps(grid, noise)

    def _plms(self, grid):
        t, alpha, sigma, _ = _scalars(grid)
        x_next, history, v = None, [], None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            history = (history + [pred.eps])[-self.order:]
            slope = adams_bashforth(history)
            v = slope if v is None else heavy_ball(v, slope, self.beta)
            step = heavy_ball(v, slope, self.beta) if self.nesterov else v
            x_next = sigma_bar_transfer(x, step, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
        yield x_next, None

    def update(self, x, m, hs, ends, order, noise, v):
        """The DPM-Solver++ 1 step with the velocity of the 2M data predictions; first-order steps
        bypass the momentum (as the official code does) and leave the velocity as it is."""
        if order == 1:
            return dpmpp_first_order(x, m[-1], *ends, hs[-1]), v
        combined = dpmpp_2m_data_prediction(m[-1], m[-2], hs[-1], hs[-2])
        v = combined if v is None else heavy_ball(v, combined, self.beta)
        return dpmpp_first_order(x, v, *ends, hs[-1]), v


class GHVB(Solver):
    """Generalized heavy ball GHVB_r(beta): order ``r`` for every ``beta`` in (0, 1]; ``beta = 1`` is PLMS_r
    (AB_r with lower-order warm-up). Give ``order`` and ``beta``, or ``momentum`` (e.g. 3.8)."""

    name = "ghvb"

    def __init__(self, order: int = 4, beta: float = 0.8, momentum: float | None = None):
        self.order, self.beta = _resolve(order, beta, momentum, 5)

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        x_next, velocities = None, []
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            v = pred.eps if not velocities else heavy_ball(velocities[-1], pred.eps, self.beta)
            velocities = (velocities + [v])[-self.order:]
            slope = ghvb_combination(velocities, self.beta)
            x_next = sigma_bar_transfer(x, slope, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
        yield x_next, None
