"""The statistics layer of the FID harness (eval.stats): Frechet distance, streaming float64 moments,
KID and precision/recall. Pure arrays: no network, no images."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fewstep.eval.stats import (RunningStats, all_reduce_stats, frechet_distance, frechet_distance_eigvals,
                        kernel_distance, merge_all, precision_recall)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def frechet_sqrtm(mu1, s1, mu2, s2) -> float:
    """The EDM / pytorch-fid route: ``scipy.linalg.sqrtm(S1 S2)``, real part of its trace."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_fd_of_two_diagonal_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_fd_with_equal_covariances_is_the_squared_mean_distance():
    rng = np.random.default_rng(1)
    s = random_spd(32, rng)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fd_of_a_distribution_with_itself_is_zero():
    rng = np.random.default_rng(2)
    mu, s = rng.normal(size=64), random_spd(64, rng)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)


def test_fd_is_symmetric_and_rotation_invariant():
    rng = np.random.default_rng(3)
    d = 24
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_spd(d, rng), random_spd(d, rng)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(fd, rel=1e-10)


@pytest.mark.parametrize("n, d, seed", [(4, 4, 1), (8, 2, 0), (16, 32, 0), (64, 16, 3), (500, 64, 4), (50, 128, 5)])
def test_eigenvalue_routes_equal_scipy_sqrtm_on_sample_statistics(n, d, seed):
    """Including torch-fidelity's N=4, C=4, seed 1 case (rank-deficient covariances that once gave NaN)
    and N < C, where both covariances are singular."""
    rng = np.random.RandomState(seed)
    f1, f2 = rng.randn(n, d), rng.randn(n, d) * 1.5 + 0.2
    args = (*moments(f1), *moments(f2))
    ref = frechet_sqrtm(*args)
    assert np.isfinite(frechet_distance(*args))
    assert frechet_distance(*args) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_eigvals(*args) == pytest.approx(ref, rel=1e-6)


def test_fd_accepts_float32_and_torch_inputs_and_rejects_bad_shapes():
    rng = np.random.default_rng(5)
    mu, s = rng.normal(size=8), random_spd(8, rng)
    fd64 = frechet_distance(mu, s, mu + 1, s)
    assert frechet_distance(torch.tensor(mu), torch.tensor(s), (mu + 1).astype(np.float32), s) == pytest.approx(fd64)
    with pytest.raises(ValueError, match="vectors of one length"):
        frechet_distance(mu, s, mu[:4], s[:4, :4])
    with pytest.raises(ValueError, match="covariances must be 8x8"):
        frechet_distance(mu, s[:4, :4], mu, s)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu * np.nan, s, mu, s)


def test_small_sample_fd_is_biased_upwards_by_about_2d_over_n():
    """Two independent N(0, I) samples of size N: E||mu1 - mu2||^2 = 2d/N, so FD_N > 0 and shrinks with N."""
    rng = np.random.default_rng(6)
    d = 8
    fds = {n: frechet_distance(*moments(rng.normal(size=(n, d))), *moments(rng.normal(size=(n, d))))
           for n in (100, 10_000)}
    assert fds[100] > fds[10_000] > 0
    assert fds[10_000] < 20 * 2 * d / 10_000


# ---------------------------------------------------------------------------------------------
# Streaming moments


@pytest.mark.parametrize("splits", [[1000], [1, 999], [7, 13, 480, 500], [2] * 500, [333, 333, 334]])
def test_streaming_float64_moments_equal_numpy_for_any_batch_split(splits):
    rng = np.random.default_rng(7)
    features = (rng.normal(size=(1000, 12)) * rng.uniform(0.1, 5, 12) + 30).astype(np.float32)  # large mean
    stats = RunningStats()
    for chunk in np.split(features, np.cumsum(splits)[:-1]):
        stats.update(torch.from_numpy(chunk))
    mu, sigma = moments(features.astype(np.float64))
    assert stats.n == 1000 and stats.mean.dtype == torch.float64
    np.testing.assert_allclose(stats.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), sigma, rtol=1e-9, atol=1e-12 * np.abs(sigma).max())


def test_merged_partial_sums_equal_the_whole():
    """Per-process parts (different shifts, sizes, one empty) merge to the statistics of all rows,
    in any order: the arithmetic of all_reduce_stats."""
    rng = np.random.default_rng(8)
    features = rng.normal(size=(600, 10)) * 3 + rng.normal(size=10) * 50
    sizes = [1, 99, 0, 300, 200]
    parts = []
    for chunk in np.split(features, np.cumsum(sizes)[:-1]):
        s = RunningStats(10)
        for sub in np.array_split(chunk, 3):
            s.update(torch.from_numpy(sub))
        parts.append(s)
    mu, sigma = moments(features)
    for order in (parts, parts[::-1]):
        merged = merge_all(order)
        assert merged.n == 600
        np.testing.assert_allclose(merged.mean.numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(merged.cov.numpy(), sigma, rtol=1e-10)
    pair = parts[1].merge(parts[3])
    np.testing.assert_allclose(pair.cov.numpy(), np.cov(features[1:100].tolist() + features[100:400].tolist(),
                                                         rowvar=False), rtol=1e-10)


def test_all_reduce_without_a_process_group_is_the_identity():
    s = RunningStats().update(torch.randn(5, 3))
    assert all_reduce_stats(s) is s


def test_all_reduce_over_a_one_process_gloo_group(tmp_path):
    import torch.distributed as dist

    features = torch.randn(50, 6, dtype=torch.float64) + 4
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reduced = all_reduce_stats(RunningStats().update(features[:20]).merge(RunningStats().update(features[20:])))
    finally:
        dist.destroy_process_group()
    assert reduced.n == 50
    np.testing.assert_allclose(reduced.cov.numpy(), np.cov(features.numpy(), rowvar=False), rtol=1e-10)


def test_running_stats_errors():
    s = RunningStats().update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples, got N=1"):
        s.cov
    with pytest.raises(ValueError, match="feature dimension 5 != 4"):
        s.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        s.update(torch.randn(3, 4, 1))
    with pytest.raises(ValueError, match="different feature dimensions"):
        merge_all([s, RunningStats().update(torch.randn(2, 3))])


# ---------------------------------------------------------------------------------------------
# KID and precision / recall


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, _ = kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.05 * shifted and shifted > 0


def test_kid_needs_as_many_samples_as_its_subset_size():
    a = torch.randn(50, 4)
    with pytest.raises(ValueError, match="KID subset size 100 exceeds the number of samples"):
        kernel_distance(a, a, subset_size=100)
    with pytest.raises(ValueError, match="dimensions differ"):
        kernel_distance(a, torch.randn(50, 5), subset_size=10)


def test_precision_recall_follow_kynkaanniemi_convention():
    """torch-fidelity's convention test: narrow generated N(0, 0.1^2) inside wide real N(0, 3^2) has
    high precision and low recall; swapping the roles swaps them."""
    g = torch.Generator().manual_seed(10)
    generated, real = 0.1 * torch.randn(200, 16, generator=g), 3 * torch.randn(200, 16, generator=g)
    precision, recall = precision_recall(generated, real)
    assert precision > 0.8 and recall < 0.3
    p2, r2 = precision_recall(real, generated)
    assert p2 < 0.3 and r2 > 0.8
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(generated[:3], real)
