"""Feature extractors: torch-fidelity's (``inception-v3-compat`` by default; any name it registers) and
our own, behind one wrapper that fixes the input contract and names its protocol.

    fx = FeatureExtractor()                                  # TF-Inception pool3, 2048-d
    fx = FeatureExtractor("inception-v3-compat", weights="/data/weights-inception-2015-12-05-6726825d.pth")
    feats = fx(images)                                       # [B, D] float32; uint8 or float [-1, 1] images

Inception weights come from, in order: ``weights=``, the environment variable
``FEWSTEP_INCEPTION_WEIGHTS`` (a file, or a directory holding ``INCEPTION_FILE``), torch hub's cache
(where torch-fidelity's normal download puts it), then that download unless ``download=False``. When
none works, ``WeightsUnavailable`` names the file and the URL to fetch.

Our own extractors subclass ``ExtractorBase`` (torch-fidelity's ``FeatureExtractorBase`` with its static
methods and the uint8 input check written once) and are registered with
``register_extractor`` (also into torch-fidelity's registry, so ``calculate_metrics`` can use them).
``fewstep-tiny`` is a small, fixed, download-free extractor for tests and offline demos.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from fewstep.io import to_uint8

from .protocol import EDM_UINT8, Protocol

__all__ = [
    "FeatureExtractor", "WeightsUnavailable", "register_extractor", "EXTRACTORS", "ExtractorBase", "TinyExtractor",
    "inception_weights", "INCEPTION_URL", "INCEPTION_FILE", "WEIGHTS_ENV", "prepare_images",
    "save_random_inception_weights",
]

#: torch-fidelity's converted TF-Inception (2015-12-05) weights; the name's suffix is its SHA-256 prefix.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_SHA_PREFIX = "6726825d"
WEIGHTS_ENV = "FEWSTEP_INCEPTION_WEIGHTS"

#: Resize conventions of the extractors we know (``Protocol.resize``).
RESIZE = {
    "inception-v3-compat": "tf1-bilinear-299",
    "vgg16": "tf1-bilinear-224",
}

#: Our own extractors: name -> (class, resize convention). torch-fidelity's are found in its registry.
EXTRACTORS: dict[str, tuple[type, str]] = {}


class WeightsUnavailable(RuntimeError):
    """The extractor's weights are neither local nor downloadable."""


def register_extractor(name: str, cls: type, resize: str) -> None:
    """Register our extractor ``cls`` (a ``torch_fidelity.FeatureExtractorBase`` whose ``__init__`` takes
    ``(name, features_list, **kwargs)``) under ``name``, here and in torch-fidelity's registry. Registering
    the same class twice is a no-op; another class under a taken name raises."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractorBase)):
        raise TypeError("an extractor must subclass torch_fidelity.FeatureExtractorBase")
    taken = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"feature extractor {name!r} is already registered as {taken.__name__}")
    if taken is None:
        register_feature_extractor(name, cls)
    EXTRACTORS[name] = (cls, resize)


# ---------------------------------------------------------------------------------------------
# Weights


def _sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _missing_message(where: str) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (f"Inception weights not available ({where}). Fetch {INCEPTION_FILE} from {INCEPTION_URL} "
            f"and either put it at {hub} (torch-fidelity's download location), set {WEIGHTS_ENV}=/path/to/"
            f"{INCEPTION_FILE}, or pass weights=/path/to/{INCEPTION_FILE} (--weights on the command line)")


def _existing_file(path: str | Path, source: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise WeightsUnavailable(_missing_message(f"{source} points to {p}, which does not exist"))
    return p


def inception_weights(weights: str | Path | None = None, download: bool = True) -> Path:
    """The local path of the Inception weights (see the module docstring for the order searched)."""
    if weights is not None:
        return _existing_file(weights, "weights=")
    if os.environ.get(WEIGHTS_ENV):
        return _existing_file(os.environ[WEIGHTS_ENV], WEIGHTS_ENV)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    if not download:
        raise WeightsUnavailable(_missing_message("not in torch hub's cache and download=False"))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_SHA_PREFIX, progress=False)
    except Exception as err:  # offline, proxy, partial file: all end the same way
        raise WeightsUnavailable(_missing_message(f"download failed: {type(err).__name__}: {err}")) from None
    return cached


def _weights_identity(path: Path | None, module: torch.nn.Module) -> str:
    """``inception-2015-12-05`` for torch-fidelity's file (by content), else ``sha256:<16 hex>`` of the
    file, or of the module's tensors when there is no file."""
    if path is not None:
        digest = _sha256(path)
        if digest.startswith(INCEPTION_SHA_PREFIX):
            return "inception-2015-12-05"
        return f"sha256:{digest[:16]}"
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{h.hexdigest()[:16]}"


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` saying why it cannot be used here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device 'mps' requested but MPS is not available; use --device cpu")
    return device


# ---------------------------------------------------------------------------------------------
# Input contract


def prepare_images(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``[B, C, H, W]`` uint8 (kept) or float in ``value_range`` (quantised by ``to_uint8``, which clips a
    sampler's overshoot as EDM does) -> ``[B, 3, H, W]`` uint8; one channel is repeated to three (as EDM
    does for grayscale). Floats beyond the range by more than its width are on another scale (``[0, 255]``
    floats for ``[-1, 1]``) and refused, as are NaN and inf. Image *data* goes through the stricter
    ``fewstep.io.images_to_uint8`` in the sources first."""
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (channels first), got {images.shape[1]} "
                         f"in shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images
    elif torch.is_floating_point(images):
        lo, hi = value_range
        if images.numel():
            if not torch.isfinite(images).all():
                raise ValueError("images contain NaN or inf (did the sampler diverge?)")
            low, high = images.min().item(), images.max().item()
            if low < lo - (hi - lo) or high > hi + (hi - lo):
                raise ValueError(f"float images have values in [{low:.4g}, {high:.4g}], far outside their range "
                                 f"{list(value_range)}; pass uint8 for [0, 255] data, or declare the range")
        x = to_uint8(images, value_range)
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------------------
# The wrapper


class FeatureExtractor:
    """A torch-fidelity extractor (or one of ours) with a fixed input contract and its ``Protocol``.

    ``name``: a registered extractor; ``layer``: its feature (default: the one it uses for FID);
    ``weights``: a local file (Inception: see ``inception_weights``; others: passed to the extractor as
    ``feature_extractor_weights_path``; the file an extractor loads by default is hashed the same way, so
    one file has one identity); ``value_range``: the range of float inputs, quantised EDM's way.
    """

    def __init__(self, name: str = "inception-v3-compat", layer: str | None = None, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", download: bool = True,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        layer = str(layer) if layer is not None else cls.get_default_feature_layer_for_metric("fid")
        if layer not in cls.get_provided_features_list():
            raise ValueError(f"extractor {name!r} has no feature {layer!r}; "
                             f"it provides {cls.get_provided_features_list()}")
        device = _check_device(device)
        path = None
        if name == "inception-v3-compat":
            path = inception_weights(weights, download)
        elif weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsUnavailable(f"weights file {path} for extractor {name!r} does not exist")
        kwargs = {"feature_extractor_weights_path": str(path)} if path is not None else {}
        self.module = cls(name, [layer], verbose=False, **kwargs).eval().requires_grad_(False).to(device)
        self.name, self.layer, self.device, self.value_range = name, layer, torch.device(device), tuple(value_range)
        resize = EXTRACTORS[name][1] if name in EXTRACTORS else RESIZE.get(name, f"{name}-internal")
        quantisation = EDM_UINT8 if self.value_range == (-1.0, 1.0) else f"uint8{list(self.value_range)}"
        # the file the extractor loaded by default (``ExtractorBase.load_net``) is hashed like a named one,
        # so the same weights have one identity whether or not ``weights=`` names them
        path = path or getattr(self.module, "weights_path", None)
        self.protocol = Protocol(extractor=name, layer=layer, weights=_weights_identity(path, self.module),
                                 resize=resize, quantisation=quantisation)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``[B, D]`` float32 features of ``[B, C, H, W]`` images (see ``prepare_images``)."""
        x = prepare_images(images, self.value_range).to(self.device)
        (features,) = self.module(x)
        return features.reshape(features.shape[0], -1)

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.protocol.describe()})"


# ---------------------------------------------------------------------------------------------
# Our extractors: one base class, and a small extractor


class ExtractorBase(FeatureExtractorBase):
    """torch-fidelity's interface for our extractors, written once: a subclass names its ``features``
    (the first serves FID, KID and precision/recall; ``isc_feature`` serves IS), the side of its dummy
    compile input (``input_size``) and its input ``channels`` (None: any), and implements ``extract``
    (checked uint8 ``[B, C, H, W]`` in, ``{feature: [B, D]}`` out); ``load_net`` loads frozen weights."""

    features: tuple[str, ...] = ()
    isc_feature: str | None = None
    input_size: int = 8
    channels: int | None = 3

    @classmethod
    def get_provided_features_list(cls):
        return cls.features

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        default = cls.features[0]
        return {"fid": default, "kid": default, "prc": default, "isc": cls.isc_feature or default}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @classmethod
    def get_dummy_input_for_compile(cls):
        return torch.zeros(1, 3, cls.input_size, cls.input_size, dtype=torch.uint8)

    def load_net(self, make: Callable[[], nn.Module], path: Path, missing: str) -> None:
        """``self.net = make()`` with the state dict in ``path``, frozen in eval mode; ``missing`` is the
        ``FileNotFoundError``'s message when there is no such file."""
        if not path.is_file():
            raise FileNotFoundError(missing)
        self.net = make()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.weights_path = Path(path)  # the protocol's weights identity hashes this file
        self.net.eval().requires_grad_(False)

    def extract(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x):
        channels = "C" if self.channels is None else self.channels
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4
                and (self.channels is None or x.shape[1] == self.channels)):
            raise ValueError(f"expected uint8 [B, {channels}, H, W], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        out = self.extract(x)
        return tuple(out[f] for f in self.features_list)


class TinyExtractor(ExtractorBase):
    """``fewstep-tiny``: 4x4 average-pooled pixels (48 numbers in [0, 1]) through a fixed random
    linear map (seed 0) and ``tanh``; features ``"16"`` (default) or ``"48"`` (the pooled pixels).
    No download, microseconds per image: for tests and offline demos, not for reported numbers."""

    features = ("16", "48")
    input_size = 8

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, 16, generator=g) * (3.0 / 48 ** 0.5))
        self.register_buffer("bias", torch.randn(16, generator=g) * 0.1)

    def extract(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return {"48": pooled, "16": torch.tanh((pooled - 0.5) @ self.proj + self.bias)}


register_extractor("fewstep-tiny", TinyExtractor, resize="adaptive-avg-4x4")


# ---------------------------------------------------------------------------------------------
# torch-fidelity's own input, for comparing against its ``calculate_metrics`` on the same images


class ImageTensorDataset(torch.utils.data.Dataset):
    """What torch-fidelity's ``calculate_metrics`` takes as input: ``dataset[i]`` is one uint8 ``[3, H, W]``."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's ``inception-v3-compat`` with random weights, as a local file (no download): for
    plumbing checks and timing offline (tests, ``benchmarks/bench_fid.py``), never for reported numbers.

    The architecture built from an empty weights file through a subclass whose ``load_state_dict`` is
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
