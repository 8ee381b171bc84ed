"""The targets of trajectory distillation, as small pure functions of tensors.

Progressive distillation (Salimans & Ho 2022) and multistep consistency models (Heek et al. 2024) both
reduce to two maps between a noisy sample and a clean-data estimate, in the VP notation
``z_t = alpha_t x + sigma_t eps`` (``alpha_t, sigma_t`` per example, shape ``[B]`` or scalars):

    DDIM_{t->s}(x_hat, z_t)    = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat)    MCM eq. (4)
    invDDIM_{t->s}(z_s, z_t)   = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - alpha_t sigma_s / sigma_t)   eq. (5)

``invDDIM`` is the ``x`` whose one DDIM step from ``z_t`` lands on ``z_s``: the target a student
regresses so that one of its steps does what a longer teacher path did. The weights and the distance
are here too: ``max(SNR, 1)`` ("truncated SNR"), ``SNR + 1`` (the v-loss), and the pseudo-Huber norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..samplers.denoisers import broadcast_like

__all__ = ["ddim_transfer", "inverse_ddim", "addim_transfer", "progressive_target", "consistency_target",
           "truncated_snr_weight", "snr_plus_one_weight", "pseudo_huber"]


def ddim_transfer(x_hat: Tensor, z_t: Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> Tensor:
    """One deterministic DDIM step ``t -> s`` given the clean estimate ``x_hat`` (MCM eq. 4)."""
    a_t, s_t, a_s, s_s = (broadcast_like(c, z_t) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    return a_s * x_hat + (s_s / s_t) * (z_t - a_t * x_hat)


def inverse_ddim(z_s: Tensor, z_t: Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> Tensor:
    """The ``x`` with ``ddim_transfer(x, z_t, ...) == z_s`` (MCM eq. 5; PD's ``x_target``).

    Needs ``s`` strictly less noisy than ``t`` (``alpha_s / sigma_s > alpha_t / sigma_t``), else the
    denominator ``alpha_s - alpha_t sigma_s / sigma_t`` is not positive and no such ``x`` exists.
    """
    a_t, s_t, a_s, s_s = (broadcast_like(c, z_t) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    ratio = s_s / s_t
    return (z_s - ratio * z_t) / (a_s - a_t * ratio)


def addim_transfer(x_hat: Tensor, z_t: Tensor, alpha_t, sigma_t, alpha_s, sigma_s, x_var) -> Tensor:
    """Adjusted DDIM (MCM Algorithm 3, eq. 14): DDIM with the noise component inflated by the variance
    DDIM drops, ``z_s = alpha_s x_hat + sqrt(sigma_s^2 + (d / |eps_hat|^2) z_var) eps_hat``, with
    ``z_var = (alpha_s - alpha_t sigma_s / sigma_t)^2 x_var`` and ``x_var`` the per-dimension variance of
    ``x`` given ``z_t`` (scalar or ``[B]``; the paper uses ``0.75 |x - x_hat|^2 / d``).

    ``|eps_hat|^2`` and ``d`` are per example (not batch-global); the clean term is ``alpha_s x_hat``
    (eq. 14), not ``alpha_t x_hat`` as one public implementation has it.
    """
    a_t, s_t, a_s, s_s, v = (broadcast_like(c, z_t) for c in (alpha_t, sigma_t, alpha_s, sigma_s, x_var))
    eps_hat = (z_t - a_t * x_hat) / s_t
    d = z_t[0].numel()
    eps_norm2 = broadcast_like(eps_hat.flatten(1).square().sum(1), z_t).clamp_min(torch.finfo(z_t.dtype).tiny)
    z_var = (a_s - a_t * s_s / s_t) ** 2 * v
    return a_s * x_hat + torch.sqrt(s_s**2 + d / eps_norm2 * z_var) * eps_hat


def progressive_target(x_hat_t: Tensor, x_hat_mid: Tensor, z_t: Tensor, t: tuple, mid: tuple, s: tuple,
                       last_step: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Progressive distillation's student target from two teacher DDIM steps ``t -> mid -> s``
    (Salimans & Ho 2022, Algorithm 2), with ``t``, ``mid``, ``s`` each ``(alpha, sigma)``.

    ``x_hat_t`` is the teacher's clean estimate at ``z_t`` and ``x_hat_mid`` at the midpoint
    ``z_mid = DDIM_{t->mid}(x_hat_t, z_t)``, so the caller makes the two teacher calls. Returns
    ``(x_target, z_s)``: ``invDDIM_{t->s}(z_s, z_t)``, except where ``last_step`` (bool ``[B]``) marks
    the student's final step to clean data, where the target is the teacher's midpoint estimate itself
    (the reference code's ``i == 0`` branch: ``s`` is data and ``invDDIM`` would be ``z_s`` again).
    """
    z_mid = ddim_transfer(x_hat_t, z_t, *t, *mid)
    z_s = ddim_transfer(x_hat_mid, z_mid, *mid, *s)
    target = inverse_ddim(z_s, z_t, *t, *s)
    if last_step is not None:
        target = torch.where(broadcast_like(torch.as_tensor(last_step), z_t).bool(), x_hat_mid, target)
    return target, z_s


def consistency_target(x_hat_ref: Tensor, z_s: Tensor, z_t: Tensor, t: tuple, s: tuple, end: tuple) -> Tensor:
    """Multistep consistency's x-space target (MCM Algorithm 1): the student's own (stop-gradient)
    estimate ``x_hat_ref = f(z_s, s)`` carries ``z_s`` to the segment end ``end``, and ``invDDIM`` turns
    that point into the ``x`` one student step from ``z_t`` must predict. ``t``, ``s``, ``end``:
    ``(alpha, sigma)``. With ``s == end`` this is ``invDDIM_{t->s}(z_s, z_t)`` (a teacher-step target)."""
    z_end = ddim_transfer(x_hat_ref, z_s, *s, *end)
    return inverse_ddim(z_end, z_t, *t, *end)


def truncated_snr_weight(alpha, sigma) -> Tensor:
    """``max(SNR, 1)``: the x-MSE weight PD's configs use (``snr_trunc`` = max of x- and eps-MSE)."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    return torch.clamp_min(alpha**2 / sigma**2, 1.0)


def snr_plus_one_weight(alpha, sigma) -> Tensor:
    """``SNR + 1``: the x-MSE weight equal to v-MSE (``|v - v_hat|^2 = (SNR + 1) sigma^2 |x - x_hat|^2``
    on a VP schedule, where ``alpha^2 + sigma^2 = 1``)."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    return alpha**2 / sigma**2 + 1.0


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """``sqrt(|diff|^2 + c^2) - c`` per example (``|.|`` the L2 norm over all but the batch dim):
    ~ ``|diff|^2 / (2c)`` for small errors and ``|diff|`` for large ones (MCM: ``c = 1e-4``)."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    return torch.sqrt(diff.flatten(1).square().sum(1) + c * c) - c
