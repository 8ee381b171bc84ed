"""Variable-step linear multistep (Adams-Bashforth) on the PF ODE, as k-diffusion's ``sample_lms``.

Registered as ``lms``, with ``order`` (default 4) as an overridable option; its name is k-diffusion's too.

k-diffusion's variables: ``x_bar = x / alpha`` and ``sigma_bar = sigma / alpha`` (its ``sigmas``), where
the PF ODE is ``d x_bar / d sigma_bar = eps_hat`` (its ``to_d``). Step ``i`` integrates the Lagrange
polynomial through the last ``k = min(i + 1, order)`` slopes over ``[sigma_bar_i, sigma_bar_{i+1}]``:

    x_bar' = x_bar + sum_j c_j eps_{i-j},   c_j = int_{s_i}^{s_{i+1}} prod_{m != j} (s - s_{i-m}) / (s_{i-j} - s_{i-m}) ds

(Adams-Bashforth on a variable grid; Hairer, Norsett & Wanner, Solving ODEs I, III.5). k-diffusion
computes ``c_j`` with ``scipy.integrate.quad``; here the integral is exact (the antiderivative of the
polynomial). The warm-up is lower order (AB1 = Euler = DDIM, AB2, ...); there is no lower-order final
step, so the step to ``sigma_bar = 0`` uses the full order (as in k-diffusion). NFE = steps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.polynomial import polynomial as P
from torch import Tensor

from .solvers import Solver

__all__ = ["LMS", "lms_coefficients", "lms_step"]


def lms_coefficients(nodes: Sequence[float], s_next: float) -> list[float]:
    """``c_j = int_{nodes[0]}^{s_next} l_j(s) ds`` for the Lagrange basis ``l_j`` on ``nodes``
    (newest first: ``nodes[j] = sigma_bar_{i-j}``), exactly.

    Computed in the scaled variable ``u = (s - s_i) / H``, ``H = s_next - s_i``, where the nodes are
    ``O(1)`` numbers and the integral runs over ``[0, 1]``: ``c_j = H int_0^1 l_j(u) du``.
    """
    s0 = float(nodes[0])
    H = float(s_next) - s0
    u = [(float(s) - s0) / H for s in nodes]
    coeffs = []
    for j, uj in enumerate(u):
        others = [um for m, um in enumerate(u) if m != j]
        poly = P.polyfromroots(others) if others else np.ones(1)
        denom = float(np.prod([uj - um for um in others])) if others else 1.0
        antiderivative = P.polyint(poly)
        coeffs.append(H * float(P.polyval(1.0, antiderivative) - P.polyval(0.0, antiderivative)) / denom)
    return coeffs


def lms_step(x: Tensor, slopes: Sequence[Tensor], coeffs: Sequence[float], alpha: float,
             alpha_next: float) -> Tensor:
    """``x' = alpha' (x / alpha + sum_j c_j eps_{i-j})`` (``slopes`` newest first)."""
    incr = coeffs[0] * slopes[0]
    for c, e in zip(coeffs[1:], slopes[1:]):
        incr = incr + c * e
    return alpha_next * (x / alpha + incr)


class LMS(Solver):
    """k-diffusion's linear multistep sampler (``sample_lms``): variable-step Adams-Bashforth on ``eps``
    in ``sigma_bar``, order ``order`` (1..4 or more) after a lower-order warm-up; NFE = steps.

    Unlike PNDM/PLMS (fixed-step AB coefficients), the coefficients follow the grid, so the method has
    order ``order`` on any grid.
    """

    name = "lms"

    def __init__(self, order: int = 4):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
            raise ValueError(f"LMS order must be an integer in 1..8, got {order!r}")
        self.order = order

    def steps(self, grid, noise):
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        s_bar = grid.sigma_bar.tolist()
        x_next, slopes = None, []  # eps history, newest first
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            slopes = ([pred.eps] + slopes)[: self.order]
            if s_bar[i + 1] == s_bar[i]:  # zero-length final step (diffusers' leading grids)
                x_next = x
                continue
            coeffs = lms_coefficients([s_bar[i - j] for j in range(len(slopes))], s_bar[i + 1])
            x_next = lms_step(x, slopes, coeffs, alpha[i], alpha[i + 1])
        yield x_next, None
