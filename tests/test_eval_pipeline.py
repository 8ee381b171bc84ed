"""The FID harness end to end with the small registered extractor ``fewstep-tiny`` (no downloads):
sources -> features -> float64 statistics -> scores, against torch-fidelity's ``calculate_metrics``;
seeds, sharding, the reference cache, sweeps, the CLI and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity

from fewstep import cli
from fewstep.eval import harness
from fewstep.eval.features import INCEPTION_URL, WEIGHTS_ENV, FeatureExtractor, ImageTensorDataset, WeightsUnavailable
from fewstep.eval.harness import (DatasetSource, FeatureStats, FolderSource, SamplerSource, TensorSource, compute_stats,
                          reference_stats, score, seeded_noise)
from fewstep.eval.protocol import ProtocolMismatch
from fewstep.eval.stats import merge_all, RunningStats
from fewstep.eval.sweep import SweepConfig, run_sweep, write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def images(n: int, seed: int, size: int = 16, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((low + (high - low) * torch.rand(n, 3, size, size, generator=g)) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def tiny():
    return FeatureExtractor("fewstep-tiny")


# ---------------------------------------------------------------------------------------------
# Agreement with torch-fidelity


def test_fd_and_kid_equal_torch_fidelity_calculate_metrics_with_the_tiny_extractor(tiny):
    a, b = images(120, 0), images(100, 1, low=0.2, high=0.9)
    ref = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(a), input2=ImageTensorDataset(b), fid=True, kid=True, kid_subset_size=50, kid_subsets=20,
        feature_extractor="fewstep-tiny", cuda=False, cache=False, save_cpu_ram=True, verbose=False, batch_size=32)
    gen = compute_stats(TensorSource(a, 7), tiny, keep_features=True)
    real = compute_stats(TensorSource(b, 64), tiny, keep_features=True)
    s = score(gen, real, kid_subset_size=50, kid_subsets=20)
    assert s.fd == pytest.approx(ref["frechet_inception_distance"], rel=1e-5)
    assert s.kid_mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert s.protocol.n == 120 and s.n_reference == 100 and s.protocol.extractor == "fewstep-tiny"
    assert "note" not in s.extra  # N above the feature dimension
    small = score(compute_stats(TensorSource(a[:10], 7), tiny), real)
    assert "rank-deficient" in small.extra["note"] and small.to_dict()["note"] == small.extra["note"]


def test_stats_do_not_depend_on_batch_size_and_float_inputs_are_quantised_once(tiny):
    x = torch.rand(64, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    one = compute_stats(TensorSource(x, 1, value_range=(-1, 1)), tiny)
    many = compute_stats(TensorSource(x, 64, value_range=(-1, 1)), tiny)
    u8 = compute_stats(TensorSource((x * 127.5 + 128).clip(0, 255).to(torch.uint8), 10), tiny)
    for other in (many, u8):
        np.testing.assert_allclose(other.mu, one.mu, rtol=1e-6)
        np.testing.assert_allclose(other.sigma, one.sigma, rtol=1e-5, atol=1e-6 * np.abs(one.sigma).max())


# ---------------------------------------------------------------------------------------------
# Sources


class EchoSampler:
    """A stand-in sampler: returns ``tanh(x_T)`` plus one draw of its step noise, and records ``x_T``."""

    def __init__(self):
        self.seen = []

    def sample(self, x_T, generator=None, noise=None):
        self.seen.append(x_T.clone())
        return torch.tanh(x_T + 0.1 * noise(x_T))


def test_sampler_source_images_depend_on_their_seed_only():
    whole = torch.cat(list(SamplerSource(EchoSampler(), range(10, 30), (3, 4, 4), batch_size=20)))
    split = torch.cat(list(SamplerSource(EchoSampler(), range(10, 30), (3, 4, 4), batch_size=3)))
    assert torch.equal(whole, split)
    tail = torch.cat(list(SamplerSource(EchoSampler(), range(20, 30), (3, 4, 4), batch_size=4)))
    assert torch.equal(tail, whole[10:])
    shards = [torch.cat(list(SamplerSource(EchoSampler(), range(10, 30), (3, 4, 4), 4).shard(r, 3))) for r in range(3)]
    for r in range(3):
        assert torch.equal(shards[r], whole[r::3])


def test_the_same_seeds_give_the_same_initial_noise_to_every_nfe():
    from fewstep.samplers.sampler import Sampler
    from fewstep.samplers.schedules import DiscreteVPSchedule
    from fewstep.testbed import ExactDenoiser, GaussianMixture

    denoiser = ExactDenoiser(GaussianMixture.gaussian(12, 0.0, 0.5), DiscreteVPSchedule.from_diffusers_config({}))
    starts = []
    for nfe in (2, 5):
        sampler = Sampler.for_nfe(denoiser, "ddim", nfe)
        first = []
        sampler_sample = sampler.sample
        sampler.sample = lambda x_T, **kw: (first.append(x_T.clone()), sampler_sample(x_T, **kw))[1]
        list(SamplerSource(sampler, range(0, 6), (3, 2, 2), batch_size=4))
        starts.append(torch.cat(first))
    assert torch.equal(starts[0], starts[1])
    assert torch.equal(starts[0], seeded_noise(range(6), (3, 2, 2)))


def test_sharded_partial_statistics_merge_to_the_whole(tiny):
    source = SamplerSource(EchoSampler(), range(0, 90), (3, 8, 8), batch_size=16)
    whole = compute_stats(source, tiny)
    parts = []
    for rank in range(4):
        s = RunningStats()
        for batch in source.shard(rank, 4):
            s.update(tiny(batch))
        parts.append(s)
    merged = merge_all(parts)
    # equal up to float32 feature round-off (features of one image vary in the last bits with its batch)
    np.testing.assert_allclose(merged.mean.numpy(), whole.mu, rtol=1e-6)
    np.testing.assert_allclose(merged.cov.numpy(), whole.sigma, rtol=1e-5, atol=1e-6 * np.abs(whole.sigma).max())
    assert whole.protocol.seeds == (0, 90) and whole.protocol.n == 90


def test_folder_and_dataset_sources_read_the_same_images(tiny, tmp_path):
    from PIL import Image

    x = images(12, 3, size=8)
    for i, img in enumerate(x):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = FolderSource(tmp_path, batch_size=5)
    assert torch.equal(torch.cat(list(folder)), x)
    labelled = [(img, 7) for img in x]  # torchvision-style (image, label) items
    assert torch.equal(torch.cat(list(DatasetSource(labelled, "toy", batch_size=5))), x)
    assert folder.identity.startswith("folder:") and folder.identity == FolderSource(tmp_path).identity
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path / "empty")
    Image.fromarray(images(1, 3, size=9)[0].permute(1, 2, 0).numpy()).save(tmp_path / "004b.png")
    with pytest.raises(ValueError, match="differ in size: 004b.png is \\(9, 9\\), 000.png is \\(8, 8\\)"):
        list(FolderSource(tmp_path, batch_size=5))


# ---------------------------------------------------------------------------------------------
# The reference cache


def test_reference_statistics_are_cached_by_content(tiny, tmp_path, monkeypatch):
    data = images(40, 4)
    first = reference_stats(TensorSource(data, 16, "toy"), tiny, tmp_path, keep_features=True)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and len(list(tmp_path.glob("*.features.pt"))) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(harness, "compute_stats", no_recompute)
    again = reference_stats(TensorSource(data.clone(), 8, "toy"), tiny, tmp_path, keep_features=True)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert torch.equal(again.features, first.features) and again.protocol == first.protocol
    monkeypatch.undo()
    changed = data.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel: a new key, never the stale entry
    reference_stats(TensorSource(changed, 16, "toy"), tiny, tmp_path)
    reference_stats(TensorSource(data, 16, "toy"), FeatureExtractor("fewstep-tiny", layer="48"), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not list(tmp_path.glob(".*"))  # atomic writes left no temporary files
    # a data set is keyed by its images, not its name; a sampler (no content hash) is never cached
    listed = [img for img in data]
    reference_stats(DatasetSource(listed, "toy"), tiny, tmp_path)
    listed[5] = listed[5].flip(-1)
    reference_stats(DatasetSource(listed, "toy"), tiny, tmp_path)
    reference_stats(SamplerSource(EchoSampler(), range(8), (3, 8, 8)), tiny, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 5


# ---------------------------------------------------------------------------------------------
# Bad input


def test_errors_on_bad_input(tiny):
    with pytest.raises(ValueError, match="at least 2 images, got N=1"):
        compute_stats(TensorSource(images(1, 0), 4), tiny)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        compute_stats(TensorSource(torch.zeros(4, 4, 8, 8, dtype=torch.uint8), 4), tiny)
    with pytest.raises(ValueError, match="int64; expected uint8"):
        compute_stats(TensorSource(torch.zeros(4, 3, 8, 8, dtype=torch.int64), 4), tiny)
    a = compute_stats(TensorSource(images(30, 0), 16), tiny, keep_features=True)
    b = compute_stats(TensorSource(images(30, 1), 16), tiny, keep_features=True)
    with pytest.raises(ValueError, match="KID subset size 50 exceeds the number of samples"):
        score(a, b, kid_subset_size=50)
    with pytest.raises(ValueError, match="need features"):
        score(a, FeatureStats(b.mu, b.sigma, b.protocol), kid_subset_size=10)
    wide = compute_stats(TensorSource(images(30, 1), 16), FeatureExtractor("fewstep-tiny", layer="48"))
    with pytest.raises(ProtocolMismatch, match="layer: '16' != '48'"):
        score(a, wide)
    with pytest.raises(ValueError, match="unknown feature extractor 'no-such'"):
        FeatureExtractor("no-such")
    with pytest.raises(ValueError, match="has no feature '2048'"):
        FeatureExtractor("fewstep-tiny", layer="2048")


def test_missing_inception_weights_offline_name_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable) as info:
        FeatureExtractor("inception-v3-compat", download=False)
    assert INCEPTION_URL in str(info.value) and WEIGHTS_ENV in str(info.value)

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable, match="download failed: OSError: Temporary failure"):
        FeatureExtractor("inception-v3-compat")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(WeightsUnavailable, match=f"{WEIGHTS_ENV} points to .*missing, which does not exist"):
        FeatureExtractor("inception-v3-compat")
    with pytest.raises(WeightsUnavailable, match="weights= points to"):
        FeatureExtractor("inception-v3-compat", weights=tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------------------
# Sweeps and the CLI


def test_a_sweep_writes_tables_and_a_plot_under_one_protocol(tiny, tmp_path):
    cfg = SweepConfig(samplers=["ddim", "heun"], nfe=[1, 2], n=48, repeats=2, batch_size=48, n_reference=64,
                      model={"kind": "testbed", "image_size": 4, "components": 2}, extractor="fewstep-tiny",
                      kid_subset_size=20, out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), grid_images=4)
    runs, grids = run_sweep(cfg, tiny, log=lambda m: None)
    out = write_outputs(cfg, runs, grids)
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.csv", "results.md", "fd_vs_nfe.png", "samples.png"} <= names
    doc = json.loads((out / "results.json").read_text())
    assert doc["protocol"]["extractor"] == "fewstep-tiny" and doc["protocol"]["n"] == 48
    seeds = {(r["repeat"], tuple(r["protocol"]["seeds"])) for r in doc["runs"] if "fd" in r}
    assert seeds == {(0, (0, 48)), (1, (48, 96))}  # disjoint per repeat, shared by every cell
    skipped = [r for r in doc["runs"] if r["sampler"] == "heun" and r["nfe"] == 2]
    assert skipped and "fd" not in skipped[0] and "cannot" in skipped[0]["note"]
    table = (out / "results.md").read_text()
    assert table.startswith("| sampler | NFE 1 | NFE 2 |") and table.splitlines()[3].endswith(" | - |")
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2 * 2


def test_cli_fid_between_two_image_tensors(tmp_path, capsys):
    torch.save(images(40, 0), tmp_path / "gen.pt")
    torch.save(images(40, 1, low=0.3), tmp_path / "ref.pt")
    args = ["fid", "--gen", str(tmp_path / "gen.pt"), "--ref", str(tmp_path / "ref.pt"), "--extractor", "fewstep-tiny",
            "--kid-subset-size", "20", "--cache-dir", str(tmp_path / "cache"), "--save", str(tmp_path / "g.npz"),
            "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fd"] > 0 and out["kid_mean"] is not None and out["protocol"]["n"] == 40
    # the saved statistics score the same against the same reference
    assert cli.main(["fid", "--gen", str(tmp_path / "g.npz"), "--ref", str(tmp_path / "ref.pt"),
                             "--extractor", "fewstep-tiny", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == pytest.approx(out["fd"], rel=1e-12)
    # statistics saved under one protocol refuse another
    assert cli.main(["fid", "--gen", str(tmp_path / "g.npz"), "--ref", str(tmp_path / "ref.pt"),
                             "--extractor", "fewstep-tiny", "--layer", "48",
                             "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "different feature protocols" in capsys.readouterr().err


def test_cli_sweep_from_the_demo_config_with_overrides(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "sweep_testbed.yaml"
    code = cli.main(["sweep", "--config", str(config), "--samplers", "dpmpp_2m", "--nfe", "2", "4",
                             "--n", "64", "--n-reference", "64", "--kid-subset-size", "32",
                             "--out", str(tmp_path / "sweep"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    assert "| dpmpp_2m |" in capsys.readouterr().out
    assert (tmp_path / "sweep" / "fd_vs_nfe.png").stat().st_size > 1000


def test_cli_rejects_bad_sweep_options_before_running(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--samplers", "no_such_sampler"])
    assert info.value.code == 2 and "unknown sampler(s) 'no_such_sampler'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--n", "10", "--kid-subset-size", "20"])
    assert "exceeds n=10" in capsys.readouterr().err
