"""The real ``inception-v3-compat`` architecture (TF1 resize to 299, TF-Inception blocks) through our
harness, against torch-fidelity's ``calculate_metrics`` on the same images.

No download: the test saves random weights (conv layers re-initialised He-normal; PyTorch's default
initialisation collapses the pool3 features to a constant) and passes them as a local file, to us
and to torch-fidelity (``cuda=False, cache=False, save_cpu_ram=True``). Inception runs at a few
images per second on a small CPU and a 2048-d eigendecomposition takes 5-15 s there, so the default
test compares the ``"768"`` features of 8 + 8 images (every block up to Mixed_6e, 10-25 s); the pool3 (2048-d)
comparison on 24 + 24 images is marked slow (35-130 s on 2 shared cores).
"""

from __future__ import annotations


import pytest
import torch
import torch_fidelity

from fewstep.eval.features import WEIGHTS_ENV, FeatureExtractor, ImageTensorDataset
from fewstep.eval.harness import TensorSource, compute_stats, score


def two_image_sets(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = ((0.2 + 0.6 * torch.rand(n, 3, 32, 32, generator=g)) * 255).to(torch.uint8)
    return a, b


def fd_both_ways(weights, layer: str, n: int) -> tuple[float, float]:
    a, b = two_image_sets(n)
    fx = FeatureExtractor("inception-v3-compat", layer=layer, weights=weights)
    ours = score(compute_stats(TensorSource(a, 8), fx), compute_stats(TensorSource(b, 8), fx)).fd
    theirs = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(a), input2=ImageTensorDataset(b), fid=True, feature_layer_fid=layer,
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, save_cpu_ram=True, verbose=False,
        batch_size=8)["frechet_inception_distance"]
    return ours, theirs


def test_our_fd_equals_torch_fidelity_through_inception_up_to_mixed_6e(random_inception_weights):
    ours, theirs = fd_both_ways(random_inception_weights, "768", n=8)
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-4)


@pytest.mark.slow
def test_our_fd_equals_torch_fidelity_on_inception_pool3(random_inception_weights):
    ours, theirs = fd_both_ways(random_inception_weights, "2048", n=24)
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_local_weights_by_environment_variable_and_their_identity_in_the_protocol(random_inception_weights,
                                                                                 monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(random_inception_weights))
    fx = FeatureExtractor("inception-v3-compat", layer="64")
    p = fx.protocol
    assert (p.extractor, p.layer, p.resize, p.quantisation) == ("inception-v3-compat", "64", "tf1-bilinear-299",
                                                                "edm-uint8[-1,1]")
    assert p.weights.startswith("sha256:")  # not torch-fidelity's file, so not "inception-2015-12-05"
    gray = fx(torch.zeros(2, 1, 20, 20))  # grayscale float in [-1, 1] -> three uint8 channels
    assert gray.shape == (2, 64) and torch.equal(gray[0], gray[1])
