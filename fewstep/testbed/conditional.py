"""A class-conditional exact denoiser: ground truth for classifier-free guidance inside the trainers.

Each of the ``K`` components of a ``GaussianMixture`` is a class. ``class_labels = c < K`` conditions on
component ``c`` alone (the posterior of one Gaussian); the null class ``K`` conditions on nothing (the whole
mixture's posterior, i.e. the unconditional model a CFG-trained network learns under its null label). So a
guided teacher ``x0_u + w (x0_c - x0_u)`` is known in closed form at every ``w``, and a trainer that calls
``denoiser(x, t, **cond)`` (``distill.conditioning.Bound``) can be checked to the last digit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.samplers.denoisers import Denoiser, Prediction
from fewstep.samplers.schedules import Schedule

from .mixture import _F64, GaussianMixture

__all__ = ["ConditionalExactDenoiser"]


class ConditionalExactDenoiser(Denoiser):
    """The Bayes-optimal denoiser of ``mixture`` given the component: ``forward(x, t, class_labels)``.

    ``class_labels``: ``[B]`` (or one int for all rows) in ``[0, K]``, ``K`` the null class; ``None`` is
    the null class for every row. Takes no other condition: a trainer that passes it ``guidance_scale``
    (meant for a w-conditioned student only) fails loudly. Float64 inside, ``x.dtype`` out.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        k = mixture.n_components
        self.mixture, self.schedule = mixture, schedule
        # the same components, each its own class: posterior(..., class_label=c) is component c alone
        self._by_component = GaussianMixture(mixture.means, mixture.variances, mixture.weights, torch.arange(k))

    @property
    def null_label(self) -> int:
        return self.mixture.n_components

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        """The null condition of ``rows`` rows (``Conditioning(null=...)`` takes one row)."""
        return {"class_labels": torch.full((rows,), self.null_label, dtype=torch.long)}

    def labels(self, class_labels, rows: int) -> Tensor:
        """``class_labels`` as a validated ``[rows]`` LongTensor."""
        if class_labels is None:
            return torch.full((rows,), self.null_label, dtype=torch.long)
        labels = torch.as_tensor(class_labels).to(torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(rows)
        if labels.shape != (rows,):
            raise ValueError(f"{labels.numel()} class labels for a batch of {rows}")
        if labels.min() < 0 or labels.max() > self.null_label:
            raise ValueError(f"class labels must lie in [0, {self.null_label}] ({self.null_label}: null), "
                             f"got {labels.unique().tolist()}")
        return labels

    def forward(self, x: Tensor, t, class_labels=None) -> Prediction:
        if x[0].numel() != self.mixture.dim:
            raise ValueError(f"sample shape {tuple(x.shape[1:])} does not flatten to the mixture's dim "
                             f"{self.mixture.dim}")
        labels = self.labels(class_labels, x.shape[0]).to(x.device)
        alpha, sigma = self.coefficients(t, x)
        z = x.to(_F64)
        pred = self._by_component.posterior(z, alpha, sigma)  # the null class: the whole mixture
        is_null = labels == self.null_label
        if not is_null.all():
            cond = self._by_component.posterior(z, alpha, sigma, labels.clamp(max=self.null_label - 1))
            mask = is_null.reshape(-1, *([1] * (x.ndim - 1)))
            pred = Prediction(torch.where(mask, pred.x0, cond.x0), torch.where(mask, pred.eps, cond.eps))
        return Prediction(pred.x0.to(x.dtype), pred.eps.to(x.dtype))
