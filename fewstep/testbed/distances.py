"""Distances between sample sets and Gaussians, in float64: exact 2-Wasserstein between Gaussians,
sliced Wasserstein and the unbiased RBF MMD between sample sets."""

from __future__ import annotations

import torch
from torch import Tensor

from .mixture import _F64, _f64, _flat

__all__ = ["sample_moments", "w2_gaussian", "w2_to_gaussian", "sliced_wasserstein", "mmd_rbf"]


def sample_moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, *S]`` samples (float64)."""
    x = _flat(samples)
    return x.mean(0), torch.atleast_2d(torch.cov(x.T))


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric PSD square root ``U diag(sqrt(max(l, 0))) U^T`` by ``eigh``."""
    lam, u = torch.linalg.eigh(0.5 * (a + a.T))
    return (u * lam.clamp(min=0).sqrt()) @ u.T


def w2_gaussian(mean1, cov1, mean2, cov2) -> Tensor:
    """Exact 2-Wasserstein distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)`` (Dowson & Landau 1982):

    ``W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)``. Returns ``W2`` (not squared);
    roundoff leaves ``~1e-8 sqrt(tr C)`` for identical Gaussians.
    """
    m1, m2 = _f64(mean1).reshape(-1), _f64(mean2).reshape(-1)
    c1, c2 = torch.atleast_2d(_f64(cov1)), torch.atleast_2d(_f64(cov2))
    if c1.shape != (len(m1), len(m1)) or c2.shape != (len(m2), len(m2)) or len(m1) != len(m2):
        raise ValueError("w2_gaussian needs means [D] and covariances [D, D] of one D")
    root2 = _sqrtm_psd(c2)
    cross = torch.linalg.eigvalsh(0.5 * ((root2 @ c1 @ root2) + (root2 @ c1 @ root2).T)).clamp(min=0).sqrt().sum()
    w2_sq = ((m1 - m2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross
    return w2_sq.clamp(min=0).sqrt()


def w2_to_gaussian(samples: Tensor, mean, cov) -> Tensor:
    """``w2_gaussian`` between the Gaussian fitted to ``samples [N, *S]`` (mean, unbiased cov) and ``N(mean, cov)``."""
    mu, c = sample_moments(samples)
    return w2_gaussian(mu, c, mean, cov)


def _quantiles(sorted_x: Tensor, q: Tensor) -> Tensor:
    """Linear-interpolation quantiles at levels ``q`` of sorted rows ``[P, N]`` (level ``q`` at position ``q N - 1/2``)."""
    n = sorted_x.shape[1]
    pos = (q * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.to(_F64)
    return sorted_x[:, lo] * (1 - frac) + sorted_x[:, hi] * frac


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> Tensor:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(theta.x, theta.y))`` (Bonneel et al. 2015)
    over ``n_projections`` seeded uniform directions. 1-D ``W2`` between empirical measures: sorted
    samples when ``N = M``, else quantile functions at ``max(N, M)`` midpoint levels."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dims differ: {x.shape[1]} vs {y.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, x.shape[1], generator=g, dtype=_F64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    # projections as [P, N] rows: sorting along the contiguous dim is several times faster
    px, py = torch.sort(theta @ x.T, dim=1).values, torch.sort(theta @ y.T, dim=1).values
    if px.shape[1] != py.shape[1]:
        n = max(px.shape[1], py.shape[1])
        q = (torch.arange(n, dtype=_F64) + 0.5) / n
        px, py = _quantiles(px, q), _quantiles(py, q)
    return ((px - py) ** 2).mean().sqrt()


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """Unbiased ``MMD^2`` (Gretton et al. 2012, eq. 3) with ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``.

    ``h = bandwidth``, or by default the median pairwise distance of the pooled samples (median
    heuristic). Can be slightly negative for samples of one distribution.
    """
    x, y = _flat(x), _flat(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 samples on each side")
    d2 = torch.cdist(torch.cat([x, y]), torch.cat([x, y])) ** 2
    if bandwidth is None:
        iu = torch.triu_indices(n + m, n + m, offset=1)
        bandwidth = d2[iu[0], iu[1]].median().sqrt()
    k = torch.exp(-d2 / (2 * _f64(bandwidth) ** 2))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
