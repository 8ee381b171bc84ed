"""fewstep.eval: the FID harness that scores samplers (swept over NFE) and students alike.

Layers, each usable alone (features -> statistics -> metric, as torch-fidelity; streaming and float64
sums as EDM2):

- ``protocol``: ``Protocol`` (extractor, layer, weights identity, resize, quantisation, N, seeds,
  reference), stored beside every result; ``ProtocolMismatch`` when results under different protocols
  meet; ``to_uint8`` (from ``fewstep.io``), EDM's quantisation.
- ``stats``: ``RunningStats`` (float64 streaming, mergeable, ``all_reduce_stats`` under
  ``torch.distributed``), ``frechet_distance`` (symmetric eigenvalue route), ``kernel_distance`` (KID) and
  ``precision_recall`` (torch-fidelity's estimators behind our checks).
- ``features``: ``FeatureExtractor`` over torch-fidelity's extractors (``inception-v3-compat`` default;
  weights from ``weights=``, ``$FEWSTEP_INCEPTION_WEIGHTS``, torch hub's cache or the download) and our
  own (``register_extractor``; ``fewstep-tiny`` for tests and offline demos).
- ``harness``: image sources (``SamplerSource``: one ``x_T`` per seed; tensors, data sets, folders),
  ``compute_stats``, ``score`` and ``reference_stats`` (cached by content).
- ``sweep``: samplers x NFE x seed ranges from ``configs/sweep_*.yaml`` or ``fewstep sweep`` / ``fewstep
  fid``, written as CSV / JSON / Markdown tables and an FD-vs-NFE plot. A config's ``model: {kind: factory,
  target: "module:function"}`` imports and calls that function (it runs code): ``fewstep.*`` targets only,
  unless ``--allow-code`` / ``allow_code=True``.

    from fewstep.eval import FeatureExtractor, SamplerSource, compute_stats, reference_stats, score
    fx = FeatureExtractor()                                   # TF-Inception pool3, EDM's protocol
    gen = compute_stats(SamplerSource(sampler, range(50_000), shape=(3, 32, 32)), fx)
    print(score(gen, FeatureStats.load("cifar10-32x32.npz")).fd)   # EDM's reference statistics
"""

if __name__ != "fewstep.eval":  # the checkout's folder imported as a top-level package
    raise ImportError(f"this folder is the package fewstep.eval; `import fewstep.eval` instead of "
                      f"`import {__name__}` (install it once with `pip install -e .` from the repository root)")

from fewstep.io import to_uint8

from .features import FeatureExtractor, WeightsUnavailable, register_extractor
from . import classifier, effnet  # noqa: E402  register "fmnist-classifier", "efficientnet-lite0"
from .harness import (DatasetSource, FeatureStats, FolderSource, SamplerSource, Score, TensorSource, compute_stats,
                      reference_stats, score)
from .protocol import Protocol, ProtocolMismatch
from .stats import RunningStats, all_reduce_stats, frechet_distance, kernel_distance, merge_all, precision_recall

__all__ = [
    "Protocol", "ProtocolMismatch", "to_uint8",
    "RunningStats", "merge_all", "all_reduce_stats", "frechet_distance", "kernel_distance", "precision_recall",
    "FeatureExtractor", "WeightsUnavailable", "register_extractor",
    "TensorSource", "DatasetSource", "FolderSource", "SamplerSource", "compute_stats", "FeatureStats", "Score",
    "score", "reference_stats",
]
