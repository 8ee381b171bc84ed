"""Gaussian-mixture data ``x0 ~ sum_k w_k N(m_k, diag v_k)`` in float64: sampling, densities, the exact
noised marginal and the closed-form posterior ``(E[x0 | x_t], E[eps | x_t])`` under ``x_t = alpha x0 + sigma eps``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from fewstep.samplers.denoisers import Prediction

__all__ = ["GaussianMixture", "Posterior"]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)

# A posterior: (x, alpha, sigma) -> Prediction(E[x0 | x], E[eps | x]) on flattened float64 [B, D].
Posterior = Callable[[Tensor, Tensor, Tensor], Prediction]


def _f64(x, device=None) -> Tensor:
    return torch.as_tensor(x, dtype=_F64, device=device)


def _flat(x: Tensor) -> Tensor:
    """``[N, *S] -> [N, prod(S)]`` in float64."""
    x = _f64(x)
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


def _per_sample(c: Tensor, ndim: int) -> Tensor:
    """A scalar or ``[B]`` coefficient shaped ``[B or 1, 1, ...]`` to broadcast over ``ndim`` dims."""
    return c.reshape(-1, *([1] * (ndim - 1))) if c.ndim else c


class GaussianMixture:
    """``sum_k w_k N(m_k, diag v_k)`` in float64, optionally with a class label per component.

    ``means [K, D]``; ``variances [K, D]``, ``[K]`` or a scalar (all > 0); ``weights [K]`` (> 0,
    normalised; uniform by default); ``classes [K]`` integer labels or None.
    """

    def __init__(self, means, variances=1.0, weights=None, classes=None):
        means = _f64(means)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        k, d = means.shape
        variances = _f64(variances)
        if variances.ndim == 1:
            variances = variances[:, None]
        try:
            variances = torch.broadcast_to(variances, (k, d)).clone()
        except RuntimeError:
            raise ValueError(f"variances of shape {tuple(variances.shape)} do not fit means [{k}, {d}]") from None
        if not torch.all(variances > 0):
            raise ValueError("variances must be > 0")
        weights = torch.ones(k, dtype=_F64) if weights is None else _f64(weights)
        if weights.shape != (k,) or not torch.all(weights > 0):
            raise ValueError(f"weights must be {k} positive numbers")
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.shape != (k,):
                raise ValueError(f"classes must be {k} integer labels")
        self.means, self.variances, self.classes = means, variances, classes
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def gaussian(cls, dim: int, mean=0.0, std=1.0) -> "GaussianMixture":
        """One component ``N(mean, diag std^2)``; ``mean`` and ``std`` scalars or ``[dim]``."""
        mean = torch.broadcast_to(_f64(mean), (dim,))
        std = torch.broadcast_to(_f64(std), (dim,))
        return cls(mean[None], std[None] ** 2)

    @classmethod
    def random(cls, dim: int, n_components: int, n_classes: int | None = None, spread: float = 3.0,
               std: float = 0.5, seed: int = 0) -> "GaussianMixture":
        """Seeded mixture: means ``~ N(0, spread^2)``, per-coordinate stds ``std * U(0.5, 1.5)``,
        weights ``∝ U(0.5, 1.5)``; with ``n_classes``, component ``k`` has class ``k % n_classes``."""
        if n_classes is not None and not 1 <= n_classes <= n_components:
            raise ValueError("need 1 <= n_classes <= n_components")
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_components, dim, generator=g, dtype=_F64)
        stds = std * (0.5 + torch.rand(n_components, dim, generator=g, dtype=_F64))
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=_F64)
        classes = None if n_classes is None else torch.arange(n_components) % n_classes
        return cls(means, stds**2, weights, classes)

    def __repr__(self) -> str:
        n_classes = None if self.classes is None else len(torch.unique(self.classes))
        return f"GaussianMixture(dim={self.dim}, n_components={self.n_components}, n_classes={n_classes})"

    # -- class restriction ----------------------------------------------------------------------

    def _class_mask(self, class_label) -> Tensor | None:
        """``[K]`` or ``[B, K]`` boolean mask of the components of ``class_label`` (None: all)."""
        if class_label is None:
            return None
        if self.classes is None:
            raise ValueError("this mixture has no classes; pass class_label=None")
        label = torch.as_tensor(class_label, dtype=torch.long)
        mask = self.classes == label[..., None]
        if not torch.all(mask.any(-1)):
            raise ValueError(f"class label(s) {label.tolist()} match no component of classes {self.classes.tolist()}")
        return mask

    def log_weights(self, class_label=None) -> Tensor:
        """``log w_k``, with ``-inf`` outside ``class_label`` (``[K]``, or ``[B, K]`` for per-sample labels)."""
        log_w = torch.log(self.weights)
        mask = self._class_mask(class_label)
        return log_w if mask is None else torch.where(mask, log_w, -math.inf)

    def conditional(self, class_label: int) -> "GaussianMixture":
        """The mixture of ``class_label``'s components, weights renormalised (``p(x0 | c)``)."""
        keep = self._class_mask(int(class_label))
        return GaussianMixture(self.means[keep], self.variances[keep], self.weights[keep], self.classes[keep])

    # -- distribution ---------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, class_label=None) -> Tensor:
        """``n`` draws ``[n, D]``: component ``k ~ w`` (within ``class_label`` if given), then ``N(m_k, v_k)``."""
        probs = torch.exp(self.log_weights(None if class_label is None else int(class_label)))
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return self.means[k] + self.variances[k].sqrt() * z

    def noised(self, alpha, sigma) -> "GaussianMixture":
        """Exact marginal of ``alpha x0 + sigma eps``: ``sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2)``."""
        alpha, sigma = float(alpha), float(sigma)
        return GaussianMixture(alpha * self.means, alpha**2 * self.variances + sigma**2, self.weights, self.classes)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log N(x; m_k, diag v_k)`` for every component: ``[N, K]``."""
        x = _flat(x)
        diff = x[:, None, :] - self.means.to(x.device)
        v = self.variances.to(x.device)
        return -0.5 * (diff**2 / v + torch.log(v) + _LOG_2PI).sum(-1)

    def log_prob(self, x: Tensor, class_label=None) -> Tensor:
        """``log p(x) = logsumexp_k (log w_k + log N(x; m_k, v_k))`` for ``x [N, *S]``: ``[N]``."""
        log_w = self.log_weights(class_label).to(x.device)
        return torch.logsumexp(log_w + self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor, class_label=None) -> Tensor:
        """``p(k | x0 = x)``: ``[N, K]``."""
        log_w = self.log_weights(class_label).to(x.device)
        return torch.softmax(log_w + self.component_log_probs(x), dim=-1)

    def mean(self) -> Tensor:
        """``sum_k w_k m_k``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Full ``[D, D]`` covariance: ``sum_k w_k (diag v_k + m_k m_k^T) - mu mu^T``."""
        mu = self.mean()
        second = torch.diag(self.weights @ self.variances) + (self.weights[:, None] * self.means).T @ self.means
        cov = second - torch.outer(mu, mu)
        return 0.5 * (cov + cov.T)

    # -- posterior ------------------------------------------------------------------------------

    def posterior(self, x: Tensor, alpha, sigma, class_label=None) -> Prediction:
        """``(E[x0 | x_t = x], E[eps | x_t = x])`` for ``x_t = alpha x0 + sigma eps``, ``x [B, *S]``.

        With ``s_k^2 = alpha^2 v_k + sigma^2`` and ``d_k = x - alpha m_k`` (Bishop 2006, eq. 2.116):
        ``E[x0 | x, k] = m_k + alpha v_k d_k / s_k^2``, ``E[eps | x, k] = sigma d_k / s_k^2``, mixed by
        ``r_k ∝ w_k N(x; alpha m_k, s_k^2)`` (softmax in log space). No division by ``alpha`` or
        ``sigma``, so ``sigma = 0`` gives ``x / alpha`` and ``alpha = 0`` the prior mean. ``alpha``,
        ``sigma``: scalars or ``[B]``; ``class_label``: an int or ``[B]`` ints (``p(x0 | x, c)``).
        """
        shape = x.shape
        x = _flat(x)
        dev = x.device
        a = _per_sample(_f64(alpha, dev), 3)
        s = _per_sample(_f64(sigma, dev), 3)
        m, v = self.means.to(dev), self.variances.to(dev)
        s2 = a**2 * v + s**2  # [B or 1, K, D]
        diff = x[:, None, :] - a * m  # [B, K, D]
        log_n = -0.5 * (diff**2 / s2 + torch.log(s2) + _LOG_2PI).sum(-1)  # [B, K]
        r = torch.softmax(self.log_weights(class_label).to(dev) + log_n, dim=-1)[..., None]
        x0 = (r * (m + a * v * diff / s2)).sum(1)
        eps = (r * (s * diff / s2)).sum(1)
        return Prediction(x0.reshape(shape), eps.reshape(shape))

    def posterior_mean(self, x: Tensor, alpha, sigma, class_label=None) -> Tensor:
        """``E[x0 | alpha x0 + sigma eps = x]``; see ``posterior``."""
        return self.posterior(x, alpha, sigma, class_label).x0
