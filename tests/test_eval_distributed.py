"""Sharded statistics across real processes: two gloo ranks each take their share of the seeds
(``compute_stats`` under ``torch.distributed``, as under ``accelerate launch``) and all-reduce the
float64 sums; every rank ends with the statistics of all images."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep.eval.features import FeatureExtractor
from fewstep.eval.harness import SamplerSource, compute_stats


class TanhSampler:
    """A stand-in sampler whose images depend on ``x_T`` (and so on the seed) only."""

    def sample(self, x_T, generator=None, noise=None):
        return torch.tanh(x_T)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        source = SamplerSource(TanhSampler(), range(5, 68), (3, 8, 8), batch_size=10)
        stats = compute_stats(source, FeatureExtractor("fewstep-tiny"))
        np.savez(f"{out}/rank{rank}.npz", mu=stats.mu, sigma=stats.sigma, n=stats.n)
    finally:
        dist.destroy_process_group()


def test_two_processes_all_reduce_to_the_single_process_statistics(tmp_path):
    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    single = compute_stats(SamplerSource(TanhSampler(), range(5, 68), (3, 8, 8), batch_size=10),
                           FeatureExtractor("fewstep-tiny"))
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["n"]) == 63
        np.testing.assert_allclose(got["mu"], single.mu, rtol=1e-6)
        np.testing.assert_allclose(got["sigma"], single.sigma, rtol=1e-5, atol=1e-6 * np.abs(single.sigma).max())
