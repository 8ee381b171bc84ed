"""Statistics and metrics on features: pure functions of arrays, no network, no protocol.

- ``RunningStats``: float64 streaming sums of ``x`` and ``x x^T`` about a shift, mergeable across
  batches and processes (``merge``, ``merge_all``, ``all_reduce_stats``). EDM2 and torchmetrics keep raw
  sums; we keep them about a shift (the first batch's mean, then the common mean when merging), which
  avoids the cancellation of ``sum xx^T - n mu mu^T`` when ``|mu|`` is large next to the spread.
- ``frechet_distance``: ours. ``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2``, the trace of the
  square root from the eigenvalues of a *symmetric* PSD matrix similar to ``S1 S2`` on its nonzero
  spectrum (``trace_sqrt_product``: real ``eigh``, round-off negatives clipped to 0), all in float64.
  Not torch-fidelity's: 0.4.0 takes ``eigvals`` of the non-symmetric ``S1 S2`` in complex128
  (``frechet_distance_eigvals`` here) and asserts both means share a dtype (its own means are
  float32), so EDM's float64 ``.npz`` cannot be passed to it; EDM, clean-fid and pytorch-fid use
  ``scipy.linalg.sqrtm`` (slow; its ``disp`` is deprecated). All three agree to ~1e-6 relative
  (tests/test_eval_stats.py); ours needs one full ``eigh`` and one of size rank(S1).
- ``kernel_distance`` (KID): torch-fidelity's ``kid_features_to_metric`` (unbiased MMD^2 with the cubic
  polynomial kernel over random subsets; correct), behind our checks (clear error when N is below the
  subset size).
- ``precision_recall`` (Kynkaanniemi et al. 2019, k-NN balls): torch-fidelity's ``prc_features_to_metric``
  (correct since 0.4.0, where the P/R swap of issue #58 was fixed), batched (``save_cpu_ram``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RunningStats", "merge_all", "all_reduce_stats", "frechet_distance", "frechet_distance_eigvals",
    "trace_sqrt_product",
    "kernel_distance", "precision_recall", "format_fd",
]

_F64 = torch.float64


class RunningStats:
    """Float64 sums over feature rows: ``n``, ``s1 = sum (x - shift)``, ``s2 = sum (x - shift)(x - shift)^T``.

    ``update(features [B, D])`` adds a batch; ``merge(other)`` returns the stats of both sets;
    ``mean`` and ``cov`` (unbiased, ``n - 1``, as ``numpy.cov``) are float64 tensors.
    """

    def __init__(self, dim: int | None = None, device=None):
        self.n = 0
        self.dim = dim
        self.device = device
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None

    @classmethod
    def from_sums(cls, n: int, shift: Tensor, s1: Tensor, s2: Tensor) -> "RunningStats":
        out = cls(int(shift.shape[0]), shift.device)
        out.n, out.shift, out.s1, out.s2 = int(n), shift.to(_F64), s1.to(_F64), s2.to(_F64)
        return out

    def update(self, features: Tensor) -> "RunningStats":
        if not torch.is_tensor(features):
            features = torch.as_tensor(np.asarray(features))
        if features.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {tuple(features.shape)}")
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(f"feature dimension {features.shape[1]} != {self.dim} of earlier batches")
        if features.shape[0] == 0:
            return self
        f = features.to(_F64)
        if self.shift is None:
            self.dim, self.device = f.shape[1], f.device
            self.shift = f.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(self.dim, self.dim, dtype=_F64, device=f.device)
        c = f - self.shift.to(f.device)
        self.s1 += c.sum(0)
        self.s2 += c.T @ c
        self.n += f.shape[0]
        return self

    def recentered(self, shift: Tensor) -> "RunningStats":
        """The same sums about another shift (exact algebra: with ``d = old - new``,
        ``s1' = s1 + n d``, ``s2' = s2 + d s1^T + s1 d^T + n d d^T``)."""
        if self.shift is None:
            return self.from_sums(0, shift, torch.zeros_like(shift), torch.zeros(len(shift), len(shift), dtype=_F64,
                                                                                device=shift.device))
        shift = shift.to(_F64).to(self.s1.device)
        d = self.shift - shift
        s1 = self.s1 + self.n * d
        s2 = self.s2 + torch.outer(d, self.s1) + torch.outer(self.s1, d) + self.n * torch.outer(d, d)
        return self.from_sums(self.n, shift, s1, s2)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Stats of the union of both sets (neither is modified)."""
        return merge_all([self, other])

    @property
    def mean(self) -> Tensor:
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self.shift + self.s1 / self.n

    @property
    def cov(self) -> Tensor:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got N={self.n}")
        return (self.s2 - torch.outer(self.s1, self.s1) / self.n) / (self.n - 1)

    def __repr__(self) -> str:
        return f"RunningStats(n={self.n}, dim={self.dim})"


def _common_shift(stats: Sequence[RunningStats]) -> Tensor:
    """The pooled mean, used as the shift all parts are moved to before summing."""
    total = sum(s.n for s in stats)
    return sum(s.n * s.mean for s in stats if s.n) / total


def merge_all(stats: Sequence[RunningStats]) -> RunningStats:
    """Stats of the union of several parts: move each to the pooled mean, then add the sums. This is
    the arithmetic ``all_reduce_stats`` does across processes (one all-reduce per step)."""
    parts = [s for s in stats if s.n > 0]
    if not parts:
        return RunningStats()
    dims = {s.dim for s in parts}
    if len(dims) != 1:
        raise ValueError(f"cannot merge statistics of different feature dimensions {sorted(dims)}")
    shift = _common_shift(parts)
    moved = [s.recentered(shift) for s in parts]
    return RunningStats.from_sums(sum(s.n for s in moved), shift, sum(s.s1 for s in moved), sum(s.s2 for s in moved))


def all_reduce_stats(stats: RunningStats, group=None, dim: int | None = None) -> RunningStats:
    """Merge every process's ``stats`` (``torch.distributed``, e.g. under ``accelerate launch``); every
    rank gets the merged stats. Without an initialised process group this returns ``stats`` unchanged.

    ``dim`` is needed only when some rank may have seen no features. Two all-reduces: the raw sums
    (for the common shift), then the sums moved to that shift -- the same arithmetic as ``merge_all``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    d = stats.dim or dim
    if d is None:
        raise ValueError("all_reduce_stats needs dim= when this rank accumulated nothing")
    device = stats.s1.device if stats.s1 is not None else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    raw = torch.zeros(d + 1, dtype=_F64, device=device)
    if stats.n:
        raw[0], raw[1:] = stats.n, (stats.n * stats.mean).to(device)
    dist.all_reduce(raw, group=group)
    if raw[0] < 1:
        return RunningStats(d)
    shift = raw[1:] / raw[0]
    local = stats.recentered(shift) if stats.n else RunningStats.from_sums(
        0, shift, torch.zeros(d, dtype=_F64, device=device), torch.zeros(d, d, dtype=_F64, device=device))
    s1, s2 = local.s1.to(device).clone(), local.s2.to(device).clone()
    dist.all_reduce(s1, group=group)
    dist.all_reduce(s2, group=group)
    return RunningStats.from_sums(int(raw[0].item()), shift, s1, s2)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _as64(a) -> np.ndarray:
    return (a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)).astype(np.float64)


def _check_gaussians(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = map(_as64, (mu1, sigma1, mu2, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    return mu1, sigma1, mu2, sigma2


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr (S1 S2)^1/2`` for PSD ``S1``, ``S2``: with ``S1 = V W V^T`` and ``B = V_+ W_+^1/2`` (the
    positive eigenpairs), ``S1 S2`` has the nonzero eigenvalues of the symmetric PSD ``B^T S2 B``. One
    ``eigh`` and one ``eigvalsh`` of size rank(S1) (small when N < dim), no complex arithmetic."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = w > w.max(initial=0.0) * sigma1.shape[0] * np.finfo(np.float64).eps
    b = v[:, keep] * np.sqrt(w[keep])
    m = b.T @ sigma2 @ b
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (Dowson & Landau 1982; Heusel et al. 2017),
    ``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2``, in float64 (``trace_sqrt_product``)."""
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def format_fd(value: float, digits: int = 6) -> str:
    """``value`` with ``digits`` decimals, a round-off negative that would print as ``-0.000...`` shown as
    ``0.000...`` (FD is >= 0; the float64 trace terms cancel to ~1e-12). A negative large enough to show a
    nonzero digit is printed as it is: that is a bug to see, not to hide."""
    if value is not None and -0.5 * 10.0 ** -digits < value < 0:
        value = 0.0
    return f"{value:.{digits}f}"


def frechet_distance_eigvals(mu1, sigma1, mu2, sigma2) -> float:
    """torch-fidelity 0.4.0's route, in float64: ``sum Re sqrt(eigvals(S1 S2))`` in complex128."""
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    tr_covmean = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# KID and precision / recall (torch-fidelity's functions behind our checks)


def _features(f, what: str) -> Tensor:
    f = f if torch.is_tensor(f) else torch.as_tensor(np.asarray(f))
    if f.ndim != 2:
        raise ValueError(f"{what} must be [N, dim], got shape {tuple(f.shape)}")
    return f.detach().cpu()


def kernel_distance(features_1, features_2, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
                    degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std over ``subsets`` random subsets of the unbiased MMD^2
    with kernel ``(gamma x.y + coef0)^degree`` (``gamma = 1/dim``). torch-fidelity's estimator, seeded as
    its ``rng_seed``. Small negative values are valid (the estimator is unbiased)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    f1, f2 = _features(features_1, "features_1"), _features(features_2, "features_2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} != {f2.shape[1]}")
    if subset_size < 2:
        raise ValueError(f"KID subset size must be >= 2, got {subset_size}")
    if min(len(f1), len(f2)) < subset_size:
        raise ValueError(f"KID subset size {subset_size} exceeds the number of samples (N={len(f1)} and "
                         f"{len(f2)}); lower kid_subset_size or compute more images")
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed,
                                 kid_kernel="poly", kid_kernel_poly_degree=degree, kid_kernel_poly_gamma=gamma,
                                 kid_kernel_poly_coef0=coef0, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(generated, real, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of generated
    samples inside some real sample's k-NN ball, recall the share of real samples inside some
    generated sample's ball. torch-fidelity's batched implementation (``generated`` first)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    g, r = _features(generated, "generated"), _features(real, "real")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {g.shape[1]} != {r.shape[1]}")
    if min(len(g), len(r)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(g)} and {len(r)}")
    out = prc_features_to_metric(g.float(), r.float(), prc_neighborhood=k, prc_batch_size=batch_size,
                                 save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
