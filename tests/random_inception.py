"""torch-fidelity's ``inception-v3-compat`` with random weights, as a local file: no download, no mock.

Used by the test suite (the ``random_inception_weights`` fixture) and by ``benchmarks/bench_fid.py``
(timing without the real weights). Plumbing checks only, never reported numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_random_inception_weights"]


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """The architecture built from an empty weights file through a subclass whose ``load_state_dict`` is
    non-strict, its convolutions re-initialised He-normal (PyTorch's default initialisation collapses
    the features to a constant), saved to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, **kwargs):
            return super().load_state_dict(state_dict, strict=False, **kwargs)

    torch.save({}, path)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    return Path(path)
