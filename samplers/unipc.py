"""UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", NeurIPS 2023, arXiv 2302.04867): multistep UniP-p predictor plus the UniC-p corrector.

Registered as ``unipc`` (bh2) and ``unipc_bh1``; both take ``order`` (default 2), ``corrector``, ``disable_corrector``, ``lower_order_final`` and
``prediction`` ("data" | "noise") as overridable options.

The update, in log-SNR ``lam = log(alpha / sigma)`` with step ``h = lam' - lam > 0`` (paper sec. 3:
UniC-p and its order, Theorem 3.1; UniP-p, Corollary 3.2; here in the data-prediction form):

    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) m_0 - alpha' B(h) sum_m a_m D_m,   D_m = (m_{-m} - m_0) / r_m

with ``m`` the data predictions, ``r_m = (lam_{-m} - lam) / h`` and ``a`` from the order conditions
``R_p a = g_p / B(h)`` (``R_p``: rows ``r^{k-1}``, ``g_k = z phi_{k+1}(z) k!``, ``z = -h``). The noise
prediction form swaps ``(sigma, alpha, -h)`` for ``(alpha, sigma, h)`` and ``m`` for ``eps``.

The predictor UniP-p uses the ``p - 1`` previous model outputs; the corrector UniC-p re-does the same
step with the new model output at the predicted point as one more node (``r = 1``), raising the order
by one. The corrected sample replaces the predicted one, but the model output kept in the history is
the one evaluated at the predicted point: no extra model call, NFE = steps (as in the paper). The
result of the last step is never corrected (there is no model call after it).

Conventions as diffusers' ``UniPCMultistepScheduler`` (and the reference code): UniP-2 uses
``a_1 = 1/2`` and UniC-1 ``a_1 = 1/2`` instead of the solved values (both keep the order); with
``lower_order_final`` the step ``i`` of ``n`` has order at most ``n - i`` (no "fewer than 15 steps"
condition, unlike DPM-Solver++). The step to clean data is always first order here: diffusers
produces NaN / inf there for ``bh1``, for noise prediction and for ``lower_order_final=False``
(docs/unipc_lms.md).

References are to the theorem / corollary labels of arXiv 2302.04867 (Theorem 3.1: UniC-p has order
p + 1; Corollary 3.2: UniP-p has order p); the inline equation numbers were not checked against the
PDF. Measured orders on the exact testbed: docs/unipc_lms.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import Tensor

from .solvers import Solver

__all__ = [
    "UniPC",
    "phi",
    "unipc_b",
    "unipc_g",
    "unip_coefficients",
    "unic_coefficients",
    "unipc_update",
]

VARIANTS = ("bh1", "bh2")
PREDICTIONS = ("data", "noise")


# ---------------------------------------------------------------------------------------------
# Coefficients (pure functions of Python floats)


def phi(k: int, z: float) -> float:
    """``phi_k(z) = int_0^1 e^{(1 - s) z} s^{k-1} / (k-1)! ds`` (``phi_0 = e^z``; DPM-Solver's phi-functions),
    by its Taylor series ``sum_j z^j / (j + k)!`` for ``|z| < 1`` (the recursion
    ``phi_{k+1} = (phi_k - 1/k!) / z`` cancels catastrophically there), else by that recursion."""
    if abs(z) < 1.0:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(40):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def unipc_b(z: float, variant: str) -> float:
    """``B(h)`` of the two UniPC variants (any ``B = O(h)`` keeps Theorem 3.1): ``bh1``: ``B = z``;
    ``bh2``: ``B = e^z - 1``.

    ``z`` is the signed step: ``-h`` for data prediction, ``h`` for noise prediction.
    """
    if variant == "bh1":
        return z
    if variant == "bh2":
        return math.expm1(z)
    raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {VARIANTS}")


def unipc_g(z: float, p: int) -> list[float]:
    """The right-hand side ``g_k = z phi_{k+1}(z) k!``, ``k = 1..p``, of the order conditions
    (paper Theorem 3.1: ``R_p(h) a_p = g_p(h) / B(h)``); ``g_k -> 1 / (k + 1)`` times ``z`` as ``z -> 0``."""
    return [z * phi(k + 1, z) * math.factorial(k) for k in range(1, p + 1)]


def _vandermonde(rks: Sequence[float]) -> np.ndarray:
    """``R_p``: row ``k`` holds ``r_m^{k}``, ``k = 0..p-1`` (paper Theorem 3.1)."""
    r = np.asarray(rks, dtype=np.float64)
    return np.stack([r**k for k in range(len(r))])


def unip_coefficients(rks: Sequence[float], z: float, variant: str) -> list[float]:
    """``a_1..a_{p-1}`` of the predictor UniP-p (paper Corollary 3.2) for the ratios ``rks`` of the
    ``p - 1`` previous nodes, ``r_m = (lam_{-m} - lam) / h``: ``R_{p-1} a = g_{p-1} / B(h)``.

    UniP-2 uses ``a_1 = 1/2`` (diffusers and the reference code): ``a_1 B(h) - z phi_2(z) = O(h^2)``
    for either ``B``, so the order is kept. UniP-1 (``rks = []``) is DDIM / DPM-Solver++ 1.
    """
    p = len(rks) + 1
    if p == 1:
        return []
    if p == 2:
        return [0.5]
    b = np.asarray(unipc_g(z, p - 1)) / unipc_b(z, variant)
    return np.linalg.solve(_vandermonde(rks), b).tolist()


def unic_coefficients(rks: Sequence[float], z: float, variant: str) -> list[float]:
    """``a_1..a_p`` of the corrector UniC-p (paper Theorem 3.1): the ``p - 1`` previous
    nodes ``rks`` plus the new model output at ``r_p = 1``: ``R_p a = g_p / B(h)``.

    UniC-1 uses ``a_1 = 1/2`` (diffusers and the reference code), which keeps order 2.
    """
    p = len(rks) + 1
    if p == 1:
        return [0.5]
    b = np.asarray(unipc_g(z, p)) / unipc_b(z, variant)
    return np.linalg.solve(_vandermonde(list(rks) + [1.0]), b).tolist()


def unipc_update(x: Tensor, m0: Tensor, diffs: Sequence[Tensor], coeffs: Sequence[float], ratio: float,
                 scale: float, z: float, variant: str) -> Tensor:
    """One UniP / UniC update (the exponential-integrator form of paper sec. 3, shared by UniP and UniC):

        x' = ratio x - scale (e^z - 1) m0 - scale B(z) sum_m a_m D_m

    data prediction: ``ratio = sigma'/sigma``, ``scale = alpha'``, ``z = -h``, ``m`` = x0;
    noise prediction: ``ratio = alpha'/alpha``, ``scale = sigma'``, ``z = h``, ``m`` = eps.
    ``diffs`` are ``D_m = (m_{-m} - m0) / r_m`` (and, for UniC, ``m_new - m0`` last).
    """
    out = ratio * x - (scale * math.expm1(z)) * m0
    if diffs:
        res = coeffs[0] * diffs[0]
        for a, d in zip(coeffs[1:], diffs[1:]):
            res = res + a * d
        out = out - (scale * unipc_b(z, variant)) * res
    return out


# ---------------------------------------------------------------------------------------------
# Solver


class UniPC(Solver):
    """UniPC-p multistep (Zhao et al. 2023): UniP-``order`` predictor, UniC corrector on by default.

    ``variant``: ``"bh2"`` (``B(h) = e^h - 1``, diffusers' default) or ``"bh1"`` (``B(h) = h``).
    ``prediction``: ``"data"`` (x0, diffusers' ``predict_x0=True``) or ``"noise"`` (eps).
    ``corrector``: apply UniC after every step but the last; ``disable_corrector``: step indices whose
    result is not corrected (diffusers' option of the same name). ``lower_order_final``: diffusers' rule,
    step ``i`` of ``n`` has order at most ``n - i``. Warm-up: step ``i`` has order at most ``i + 1``.
    NFE = steps.
    """

    name = "unipc"

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True,
                 disable_corrector: Sequence[int] = (), lower_order_final: bool = True, prediction: str = "data"):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {VARIANTS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        self.order, self.variant, self.prediction = int(order), variant, prediction
        self.corrector, self.disable_corrector = bool(corrector), tuple(int(i) for i in disable_corrector)
        self.lower_order_final = bool(lower_order_final)

    def step_order(self, i: int, n: int, to_data: bool) -> int:
        """Order of UniP at step ``i`` of ``n`` (diffusers' ``this_order``); the step to data is order 1."""
        order = min(self.order, n - i) if self.lower_order_final else self.order
        order = min(order, i + 1)
        return 1 if (to_data and i == n - 1) else order

    def _frame(self, alpha, sigma, lam, i):
        """``(ratio, scale, z)`` of step ``i -> i + 1`` in the chosen parameterisation."""
        h = lam[i + 1] - lam[i]
        if self.prediction == "data":
            return sigma[i + 1] / sigma[i], alpha[i + 1], -h
        return alpha[i + 1] / alpha[i], sigma[i + 1], h

    def _step(self, x, ms, lams, i, alpha, sigma, lam, order, m_new=None):
        """UniP-``order`` from ``x`` at node ``i`` (``ms``/``lams``: history, newest last), or UniC-``order``
        when ``m_new`` (the model output at the predicted point ``i + 1``) is given."""
        ratio, scale, z = self._frame(alpha, sigma, lam, i)
        h = lam[i + 1] - lam[i]
        m0 = ms[-1]
        if order == 1 and m_new is None and math.isinf(h):  # to clean data: the limit of the update
            return m0 * alpha[i + 1] if self.prediction == "data" else \
                (alpha[i + 1] / alpha[i]) * (x - sigma[i] * m0)
        rks = [(lams[-1 - k] - lam[i]) / h for k in range(1, order)]
        diffs = [(ms[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
        if m_new is None:
            coeffs = unip_coefficients(rks, z, self.variant)
        else:
            coeffs = unic_coefficients(rks, z, self.variant)
            diffs = diffs + [m_new - m0]
        return unipc_update(x, m0, diffs, coeffs, ratio, scale, z, self.variant)

    def steps(self, grid, noise):
        t, alpha, sigma, lam = grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist(), grid.log_snr.tolist()
        n, to_data = grid.n_steps, grid.ends_at_data
        ms, lams = [], []  # model outputs and their log-SNRs, newest last (at most ``order``)
        x_next, x_last, last_order = None, None, 1
        for i in range(n):
            x, pred = yield x_next, t[i]
            m = pred.x0 if self.prediction == "data" else pred.eps
            if i > 0 and self.corrector and (i - 1) not in self.disable_corrector:
                # UniC: redo step i-1 from its start x_last with the new output as one more node.
                x = self._step(x_last, ms, lams, i - 1, alpha, sigma, lam, last_order, m_new=m)
            ms, lams = (ms + [m])[-self.order:], (lams + [lam[i]])[-self.order:]
            if lam[i + 1] == lam[i]:  # zero-length final step (diffusers' leading grids can end on t_min)
                x_next = x
                continue
            last_order = self.step_order(i, n, to_data)
            x_last = x
            x_next = self._step(x, ms, lams, i, alpha, sigma, lam, last_order)
        yield x_next, None
