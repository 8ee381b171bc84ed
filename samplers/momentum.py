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

import numpy as np
from torch import Tensor

from .sampler import SAMPLERS, SamplerSpec
from .solvers import (AB_COEFFICIENTS, Solver, _multistep_order, _scalars, adams_bashforth, dpmpp_first_order,
                      sigma_bar_transfer)

__all__ = [
    "momentum_number",
    "heavy_ball",
    "ghvb_coefficients",
    "ghvb_combination",
    "HeavyBall",
    "GHVB",
    "step_matrix",
    "spectral_radius",
    "real_stability_interval",
    "plot_stability_regions",
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


class HeavyBall(Solver):
    """HB(beta) momentum on PLMS_r (``base="plms"``, fixed-step AB with lower-order warm-up) or on
    DPM-Solver++(2M) (``base="dpmsolver++"``, midpoint). ``beta = 1`` is the base method exactly.

    ``nesterov=True`` (PLMS base only) takes the step with ``(1 - beta) v + beta AB_r(eps)`` after the
    velocity update (the official NT variant). Give ``order`` and ``beta``, or ``momentum`` (3.8).
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
        return self._plms(grid) if self.base == "plms" else self._dpmpp(grid)

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

    def _dpmpp(self, grid):
        t, alpha, sigma, lam = _scalars(grid)
        n, x_next, m, h_prev, v = grid.n_steps, None, [], None, None
        for i in range(n):
            x, pred = yield x_next, t[i]
            h = lam[i + 1] - lam[i]
            m = (m + [pred.x0])[-2:]
            if h == 0:
                x_next = x
                continue
            if _multistep_order(i, n, 2, self.lower_order_final, grid.ends_at_data) == 1:
                d = m[-1]  # first-order steps bypass the momentum
            else:
                combined = dpmpp_2m_data_prediction(m[-1], m[-2], h, h_prev)
                v = combined if v is None else heavy_ball(v, combined, self.beta)
                d = v
            x_next = dpmpp_first_order(x, d, sigma[i], alpha[i + 1], sigma[i + 1], h)
            h_prev = h
        yield x_next, None


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


SAMPLERS["hb"] = SamplerSpec(HeavyBall, {}, "Heavy-ball momentum on PLMS_r or DPM-Solver++(2M) (Wizadwongsa et al. 2024)")
SAMPLERS["ghvb"] = SamplerSpec(GHVB, {}, "Generalized heavy ball GHVB_r(beta), order r (Wizadwongsa et al. 2024)")


# ---------------------------------------------------------------------------------------------
# Stability regions on the linear test equation d x_bar / d sigma_bar = lam x_bar (paper sec. 4)


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


def plot_stability_regions(methods: dict[str, dict], path: str, re_range=(-4.0, 0.5), im_range=(-2.5, 2.5),
                           resolution: int = 241) -> str:
    """Contour plot (PNG) of ``{label: dict(method=..., order=..., beta=...)}`` stability regions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    re = np.linspace(*re_range, resolution)
    im = np.linspace(*im_range, resolution)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, (label, spec) in enumerate(methods.items()):
        spec = dict(spec)
        method = spec.pop("method")
        rho = np.array([[spectral_radius(method, complex(r, i), **spec) for r in re] for i in im])
        ax.contour(re, im, rho, levels=[1.0], colors=[f"C{k}"])
        ax.plot([], [], color=f"C{k}", label=label)  # contour sets carry no legend entry
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("Re(h lambda)")
    ax.set_ylabel("Im(h lambda)")
    ax.set_title("Stability regions on d x/d sigma = lambda x (inside the curves)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
