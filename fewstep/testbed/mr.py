"""The exact MR testbed: data ``x0 ~ mixture``, condition ``mu``, ``x_t = alpha x0 + (1 - alpha) mu + sigma eps``.

In ``y = x - mu`` the path is ``y_t = alpha y0 + sigma eps`` with ``y0 = x0 - mu``, so the exact denoiser,
PF-ODE solutions and distances of the other modules apply in ``y``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.samplers.denoisers import Prediction
from fewstep.samplers.schedules import Schedule

from .exact import ExactDenoiser
from .mixture import _F64, GaussianMixture, _f64, _per_sample

__all__ = ["mr_mixture_in_y", "mr_marginal", "ExactMRDenoiser"]


def mr_mixture_in_y(mixture: GaussianMixture, mu) -> GaussianMixture:
    """The distribution of ``y0 = x0 - mu`` for one shared condition ``mu [D]``: the means shifted by ``-mu``."""
    mu = _f64(mu).reshape(-1)
    if mu.shape != (mixture.dim,):
        raise ValueError(f"mu must flatten to the mixture's dim {mixture.dim}, got {mu.numel()} values")
    return GaussianMixture(mixture.means - mu, mixture.variances, mixture.weights, mixture.classes)


def mr_marginal(mixture: GaussianMixture, mu, alpha, sigma) -> GaussianMixture:
    """Exact MR marginal of ``x_t``: ``sum_k w_k N(alpha m_k + (1 - alpha) mu, alpha^2 v_k + sigma^2)``."""
    mu = _f64(mu).reshape(-1)
    alpha = float(alpha)
    noised = mixture.noised(alpha, sigma)
    return GaussianMixture(noised.means + (1 - alpha) * mu, noised.variances, noised.weights, noised.classes)


class ExactMRDenoiser(ExactDenoiser):
    """The Bayes-optimal MR denoiser of ``x0 ~ mixture`` given the condition ``mu``, in ``y = x - mu``.

    Built with a shared ``mu [D]`` it is the ``ExactDenoiser`` of ``mr_mixture_in_y(mixture, mu)`` (so the
    exact PF-ODE solutions and ``convergence.endpoint_error`` apply in ``y``). ``forward(y, t, mu=...)``
    also takes a per-sample condition ``mu [B, *S]``: ``E[x0 | y]`` is the mixture's posterior at
    ``y + alpha mu = alpha x0 + sigma eps``; it returns ``Prediction(x0_hat - mu, eps_hat)``.
    ``schedule``: an ``MRSchedule`` (any ``Schedule`` works in ``y``).
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, mu):
        super().__init__(mr_mixture_in_y(mixture, mu), schedule)
        self.data, self.mu = mixture, _f64(mu).reshape(-1)
        self.sample_shape = None

    def forward(self, y: Tensor, t, mu: Tensor | None = None) -> Prediction:
        if mu is None:
            return super().forward(y, t)
        if mu.shape != y.shape and tuple(mu.shape) != tuple(y.shape[1:]):
            raise ValueError(f"mu of shape {tuple(mu.shape)} does not match the sample's {tuple(y.shape)}")
        if y[0].numel() != self.data.dim:
            raise ValueError(f"sample shape {tuple(y.shape[1:])} does not flatten to the mixture's dim {self.data.dim}")
        alpha, sigma = self.coefficients(t, y)
        a = _per_sample(alpha, y.ndim)
        mu64 = torch.broadcast_to(mu.to(_F64), y.shape)
        pred = self.data.posterior(y.to(_F64) + a * mu64, alpha, sigma)
        return Prediction((pred.x0 - mu64).to(y.dtype), pred.eps.to(y.dtype))
