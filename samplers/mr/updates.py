"""The MR reverse SDE's Euler-Maruyama step (IR-SDE's baseline). The MRS updates themselves are the
DPM-Solver family's in ``y = x - mu`` (``samplers.updates``)."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["mr_euler_maruyama_step"]


def mr_euler_maruyama_step(y: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float,
                           sigma_inf: float, noise: Tensor) -> Tensor:
    """One Euler-Maruyama step of the MR reverse SDE (IR-SDE's ``reverse_sde_step``) in ``y = x - mu``:

    ``dy = [-theta y - g^2 score] dt + g dW``, ``g^2 = 2 sigma_inf^2 theta``, ``score = -eps / sigma``. With
    ``dc = int theta dt = log(alpha' / alpha)`` over the step: ``y' = y + dc (y + 2 sigma_inf^2 score) +
    sigma_inf sqrt(2 dc) z`` (IR-SDE: ``theta_t dt`` with ``theta`` at the current ``t``; equal on its
    integer grid)."""
    dc = math.log(alpha_next / alpha)
    return y + dc * (y - (2.0 * sigma_inf**2 / sigma) * eps) + sigma_inf * math.sqrt(2.0 * dc) * noise
