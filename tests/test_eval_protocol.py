"""The protocol stored beside every FD (eval.protocol), EDM's quantisation, statistics files and the
image input contract (eval.features.prepare_images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.eval.features import prepare_images
from fewstep.eval.harness import FeatureStats, Score
from fewstep.eval.protocol import EDM_UINT8, Protocol, ProtocolMismatch
from fewstep.io import to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def edm_formula(x: torch.Tensor) -> torch.Tensor:
    """EDM generate.py, verbatim: ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Quantisation


def test_quantisation_equals_edm_formula_on_edge_values():
    lsb = 1 / 127.5
    edges = torch.tensor([-2.0, -1.0, -1 + 1e-7, -1 + lsb / 2, -1 + lsb, -0.5, -lsb / 2, 0.0, lsb / 2, 0.5,
                          1 - lsb, 1 - 1e-7, 1.0, 1.5, float("inf"), float("-inf")])
    assert torch.equal(to_uint8(edges), edm_formula(edges))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_quantisation_equals_edm_formula_on_a_dense_grid_in_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(-1.1, 1.1, 200_001, dtype=dtype)
        assert torch.equal(to_uint8(x), edm_formula(x))


def test_quantisation_rounds_to_nearest_without_the_half_lsb_bias_of_truncation():
    """``x * 127.5 + 128`` truncated is ``round(x * 127.5 + 127.5)`` (half up): the quantisation error
    averages to 0, where plain truncation (torchmetrics' ``(x * 255).byte()`` style) is half an LSB low."""
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    level = x * 127.5 + 127.5
    err = to_uint8(x).double() - level
    assert err.abs().max() <= 0.5 + 1e-9 and abs(err.mean()) < 0.01
    assert torch.equal(to_uint8(x), torch.floor(level + 0.5).to(torch.uint8))
    truncated = level.to(torch.uint8).double() - level
    assert truncated.mean() == pytest.approx(-0.5, abs=0.01)
    assert torch.equal(to_uint8(torch.tensor([0.0, 0.49 / 255, 0.51 / 255, 1.0]), (0.0, 1.0)),
                       torch.tensor([0, 0, 1, 255], dtype=torch.uint8))


def test_quantisation_refuses_nan_and_integer_input():
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="float tensor"):
        to_uint8(torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------
# Input contract


def test_prepare_images_keeps_uint8_quantises_floats_and_repeats_grayscale():
    u8 = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert prepare_images(u8) is u8
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    assert torch.equal(prepare_images(x), edm_formula(x))
    gray = prepare_images(torch.zeros(2, 1, 5, 5, dtype=torch.uint8))
    assert gray.shape == (2, 3, 5, 5)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(2, 4, 5, 5), "1 or 3 channels"),
    (torch.zeros(2, 5, 5, 3, dtype=torch.uint8), "1 or 3 channels"),
    (torch.zeros(3, 5, 5), r"\[batch, channels, height, width\]"),
    (torch.zeros(2, 3, 5, 5, dtype=torch.int32), "uint8 or floating point"),
    (torch.zeros(2, 3, 5, 5, dtype=torch.bool), "uint8 or floating point"),
])
def test_prepare_images_rejects_bad_input(images, message):
    with pytest.raises(ValueError, match=message):
        prepare_images(images)


def test_prepare_images_refuses_floats_that_look_like_0_255_and_non_finite_values():
    with pytest.raises(ValueError, match="far outside their range.*pass uint8"):
        prepare_images(torch.full((1, 3, 4, 4), 200.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        prepare_images(torch.full((1, 3, 4, 4), float("inf")))
    overshoot = torch.tensor([-1.3, 1.2]).reshape(1, 1, 1, 2)  # a sampler's overshoot: clipped, EDM's way
    assert prepare_images(overshoot).flatten().tolist() == [0, 255, 0, 255, 0, 255]


# ---------------------------------------------------------------------------------------------
# Protocols


def test_results_under_different_protocols_refuse_to_be_compared():
    p = Protocol(n=1000, seeds=(0, 1000), reference="cifar10")
    p.check_comparable(p.replace(seeds=(1000, 2000)))  # repeats: different seeds are fine
    for change, field in [({"n": 500}, "n"), ({"resize": "pytorch-bilinear-299"}, "resize"),
                          ({"weights": "sha256:0123"}, "weights"), ({"reference": "imagenet64"}, "reference"),
                          ({"quantisation": "truncate"}, "quantisation")]:
        with pytest.raises(ProtocolMismatch, match=f"cannot be compared: {field}"):
            p.check_comparable(p.replace(**change))
    a, b = Score(3.0, p, 50000), Score(2.0, p.replace(n=500), 50000)
    with pytest.raises(ProtocolMismatch):
        min([a, b])
    assert min([a, Score(2.5, p.replace(seeds=(5, 6)), 50000)]).fd == 2.5


def test_feature_protocol_check_names_every_differing_field():
    p = Protocol()
    with pytest.raises(ProtocolMismatch, match="extractor: .*layer: ") as info:
        p.check_same_features(p.replace(extractor="vgg16", layer="fc2", n=3))
    assert "n:" not in str(info.value)  # N is not a feature-space field
    p.check_same_features(p.replace(n=7, seeds=(0, 7), reference="x"))


def test_protocol_round_trips_through_a_dict_and_rejects_unknown_fields():
    p = Protocol(n=10, seeds=(3, 13), reference="r")
    assert Protocol.from_dict(p.to_dict()) == p
    assert Protocol.from_dict(eval(repr(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown protocol field"):
        Protocol.from_dict({**p.to_dict(), "resolution": 32})
    assert "N=10, seeds 3..12" in p.describe() and EDM_UINT8 in p.describe()


# ---------------------------------------------------------------------------------------------
# Statistics files


def test_stats_files_keep_their_protocol_and_edm_npz_gets_the_edm_protocol(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), np.eye(6)
    ours = FeatureStats(mu, sigma, Protocol(extractor="fewstep-tiny", layer="16", n=40, seeds=(0, 40)), source="x")
    ours.save(tmp_path / "ours.npz")
    back = FeatureStats.load(tmp_path / "ours.npz")
    assert back.protocol == ours.protocol and back.source == "x"
    np.testing.assert_array_equal(back.mu, mu)
    with pytest.raises(ProtocolMismatch, match="extractor"):
        FeatureStats.load(tmp_path / "ours.npz", Protocol())
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file

    np.savez(tmp_path / "cifar10-32x32.npz", mu=mu, sigma=sigma)  # EDM's fid.py ref layout
    edm = FeatureStats.load(tmp_path / "cifar10-32x32.npz")
    assert edm.protocol.extractor == "inception-v3-compat" and edm.protocol.quantisation == EDM_UINT8
    assert edm.source.startswith("npz:cifar10-32x32.npz:") and edm.mu.dtype == np.float64
    with pytest.raises(ProtocolMismatch, match="extractor: 'inception-v3-compat' != 'fewstep-tiny'"):
        FeatureStats.load(tmp_path / "cifar10-32x32.npz", ours.protocol)  # EDM's stats are Inception's
    assumed = FeatureStats.load(tmp_path / "cifar10-32x32.npz", ours.protocol, assume=ours.protocol.replace(n=0))
    assert assumed.protocol.extractor == "fewstep-tiny" and assumed.protocol.seeds is None
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        FeatureStats.load(tmp_path / "bad.npz")
