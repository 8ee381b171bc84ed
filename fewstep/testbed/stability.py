"""Heavy-ball momentum's stability on the linear test equation ``d x_bar / d sigma_bar = lam x_bar``
(Wizadwongsa et al. 2024, sec. 4): each method's one-step map as a matrix in ``z = h lam``, its spectral
radius, and the stable real interval. ``benchmarks/stability_regions.py`` plots the regions.
"""

from __future__ import annotations

import numpy as np

from fewstep.samplers.momentum import ghvb_coefficients
from fewstep.samplers.updates import AB_COEFFICIENTS

__all__ = ["step_matrix", "spectral_radius", "real_stability_interval"]


def _hb_plms_state_step(state: np.ndarray, z: complex, order: int, beta: float, nesterov: bool) -> np.ndarray:
    # state = [x_n, E_{n-1}, ..., E_{n-order+1}, V_n] with E = h eps = z x and V = h v (h = step size)
    x, past, v = state[0], list(state[1:order]), state[order]
    history = (list(reversed(past)) + [z * x])
    c = AB_COEFFICIENTS[order]
    slope = sum(ci * e for ci, e in zip(c, reversed(history)))
    v_new = (1 - beta) * v + beta * slope
    step = (1 - beta) * v_new + beta * slope if nesterov else v_new
    return np.array([x + step, *reversed(history[1:]), v_new] if order > 1 else [x + step, v_new], dtype=complex)


def _ghvb_state_step(state: np.ndarray, z: complex, order: int, beta: float) -> np.ndarray:
    # state = [x_n, V_n, V_{n-1}, ..., V_{n-order+1}] with V = h v
    x, vs = state[0], list(state[1:])
    v_new = (1 - beta) * vs[0] + beta * z * x
    velocities = [v_new] + vs[: order - 1]
    slope = sum(c * v for c, v in zip(ghvb_coefficients(order, beta), velocities))
    return np.array([x + slope, *velocities], dtype=complex)


def step_matrix(method: str, z: complex, order: int = 4, beta: float = 1.0, nesterov: bool = False) -> np.ndarray:
    """The one-step map of ``method`` ("hb" on PLMS, or "ghvb") on the test equation, as a matrix in
    ``z = h lam``, built by stepping each basis state. Warm-up steps do not affect the region."""
    if method == "hb":
        size = order + 1
        step = lambda s: _hb_plms_state_step(s, z, order, beta, nesterov)  # noqa: E731
    elif method == "ghvb":
        size = order + 1
        step = lambda s: _ghvb_state_step(s, z, order, beta)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}; expected 'hb' or 'ghvb'")
    return np.stack([step(e) for e in np.eye(size, dtype=complex)], axis=1)


def spectral_radius(method: str, z: complex, **kw) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(step_matrix(method, z, **kw)))))


def real_stability_interval(method: str, lo: float = -10.0, tol: float = 1e-9, **kw) -> float:
    """The left end ``z* < 0`` of the stable real interval ``[z*, 0]`` (bisection on the spectral radius)."""
    a, b = lo, -1e-9  # spectral radius <= 1 at b, assumed > 1 at a
    if spectral_radius(method, a, **kw) <= 1 + 1e-12:
        raise ValueError(f"still stable at z = {lo}; lower `lo`")
    while b - a > tol:
        mid = 0.5 * (a + b)
        a, b = (a, mid) if spectral_radius(method, mid, **kw) <= 1 + 1e-12 else (mid, b)
    return b
