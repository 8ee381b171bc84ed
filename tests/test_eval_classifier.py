"""The offline Fashion-MNIST feature space: registered, loads given weights, gives an FD that is zero for
identical sets and positive for different ones."""

import pytest
import torch

from fewstep.eval.classifier import FMNISTNet
from fewstep.eval.features import FeatureExtractor


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "classifier.pt"
    torch.save(FMNISTNet().state_dict(), path)
    return path


def test_classifier_features_and_fd(weights):
    from fewstep.eval.stats import RunningStats, frechet_distance

    fx = FeatureExtractor("fmnist-classifier", weights=weights, device="cpu")
    assert fx.layer == "128" and fx.protocol.extractor == "fmnist-classifier"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    b = (torch.rand(64, 1, 28, 28, generator=g) * 2 - 1) * 0.3
    fa, fb = fx(a), fx(b)
    assert fa.shape == (64, 128)
    sa, sb = RunningStats(128), RunningStats(128)
    sa.update(fa)
    sb.update(fb)
    assert frechet_distance(sa.mean, sa.cov, sa.mean, sa.cov) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov) > 0.1


def test_missing_classifier_weights_name_the_training_command(tmp_path):
    with pytest.raises(Exception, match="weights"):
        FeatureExtractor("fmnist-classifier", weights=tmp_path / "nope.pt", device="cpu")
