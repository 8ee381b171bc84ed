"""Streaming: image sources -> extractor -> float64 statistics; references; the scores.

    fx = FeatureExtractor("fewstep-tiny")
    gen = compute_stats(SamplerSource(sampler, range(0, 1000), shape=(3, 32, 32)), fx, keep_features=True)
    ref = reference_stats(FolderSource("data/cifar10-train"), fx, cache_dir="~/.cache/fewstep")
    result = score(gen, ref, kid_subset_size=100)      # Score(fd=..., kid=..., protocol=...)

The input contract. Data sources (``TensorSource``, ``DatasetSource``, ``FolderSource``) yield uint8:
they take uint8 as it is, floats only with a declared ``value_range`` that the values must fit
(``fewstep.io.images_to_uint8``), and 16-bit files scaled to 8 bits. ``SamplerSource`` yields the
sampler's floats in ``[-1, 1]``, quantised EDM's way (clipped) by the extractor.
Sources say who they are:
``identity`` (a content hash, for reference caching) and ``seeds``. ``SamplerSource`` draws ``x_T``
per seed (``torch.Generator().manual_seed(seed)``), so an image depends on its seed only: the same
seeds give the same initial noise at every NFE, and any batch split or process shard gives the
same images. Stochastic samplers draw their step noise from per-seed generators too.

Under ``torch.distributed`` (e.g. ``accelerate launch``) ``compute_stats`` takes this rank's share
of a shardable source (``shard``) and all-reduces the float64 sums (``stats.all_reduce_stats``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from fewstep.data import IMAGE_EXTENSIONS, image_files, read_image
from fewstep.io import atomic_write_bytes, images_to_uint8

from .features import FeatureExtractor
from .protocol import Protocol
from .stats import RunningStats, all_reduce_stats, frechet_distance, kernel_distance, precision_recall

__all__ = [
    "ImageSource", "TensorSource", "DatasetSource", "FolderSource", "SamplerSource", "compute_stats",
    "FeatureStats", "Score", "score", "reference_stats", "cache_key",
]


# ---------------------------------------------------------------------------------------------
# Image sources


class ImageSource:
    """An iterable of image batches ``[B, C, H, W]`` with ``identity`` and ``seeds`` (None for data).
    ``content_addressed``: the identity hashes the images themselves (only such sources are cached)."""

    seeds: tuple[int, int] | None = None
    content_addressed: bool = True

    def __iter__(self) -> Iterator[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def identity(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def shard(self, rank: int, world: int) -> "ImageSource":
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded across processes")

    def _with(self, **changes) -> "ImageSource":
        """A shallow copy with some attributes replaced (what ``shard`` returns)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, **changes)
        return out


class TensorSource(ImageSource):
    """Images in one tensor ``[N, C, H, W]``: uint8, or floats with their ``value_range`` declared
    (``(-1, 1)`` or ``(0, 1)``), converted to uint8 once here (``fewstep.io.images_to_uint8``; so the
    same images score, and cache, the same in either form)."""

    def __init__(self, images: Tensor, batch_size: int = 64, name: str = "tensor",
                 value_range: tuple[float, float] | None = None):
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images in {name} must be a tensor [N, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0 or images[0].numel() == 0:
            raise ValueError(f"{name} holds no images (shape {tuple(images.shape)})")
        images = images_to_uint8(images, value_range, f"images in {name}")
        self.images, self.batch_size, self.name = images, int(batch_size), name
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        yield from self.images.split(self.batch_size)

    @property
    def identity(self) -> str:
        if self._identity is None:
            x = self.images.detach().cpu().contiguous()
            h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.numpy().tobytes() if x.dtype != torch.bfloat16 else x.float().numpy().tobytes())
            self._identity = f"{self.name}:{h.hexdigest()[:16]}"
        return self._identity

    def shard(self, rank: int, world: int) -> "TensorSource":
        out = object.__new__(TensorSource)  # uint8 already; a shard may be empty (N < world)
        out.images, out.batch_size, out.name = self.images[rank::world], self.batch_size, self.name
        out._identity = self._identity
        return out


def _item_image(item) -> Tensor:
    """A dataset item -> ``[C, H, W]`` tensor: tuples/lists give their first element (torchvision's
    ``(image, label)``), PIL images become uint8 CHW."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not torch.is_tensor(item):
        try:
            arr = np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
        except Exception:
            raise TypeError(f"dataset items must be tensors or PIL images, got {type(item).__name__}") from None
        item = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)
    return item


class DatasetSource(ImageSource):
    """A map-style dataset (torch ``Dataset``, torchvision data set, list) of images or ``(image, label)``;
    ``limit`` keeps the first ``limit`` items. The identity hashes every image (one extra pass over the
    data, cheap next to feature extraction); ``trust_name=True`` uses ``name`` and the index range
    instead, for data sets known to be immutable. Float items (torchvision's ``ToTensor`` gives
    ``[0, 1]``) need ``value_range``, as ``TensorSource``."""

    def __init__(self, dataset, name: str, batch_size: int = 64, limit: int | None = None, trust_name: bool = False,
                 value_range: tuple[float, float] | None = None):
        self.dataset, self.name, self.batch_size, self.trust_name = dataset, name, int(batch_size), trust_name
        self.value_range = value_range
        self.indices = range(min(len(dataset), limit) if limit else len(dataset))
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            batch = torch.stack([_item_image(self.dataset[i]) for i in idx])
            yield images_to_uint8(batch, self.value_range, f"items {idx.start}..{idx.stop - 1} of data set {self.name}")

    @property
    def identity(self) -> str:
        if self.trust_name:
            return f"dataset:{self.name}:{self.indices.start}-{self.indices.stop}"
        if self._identity is None:
            h = hashlib.sha256()
            for batch in self:
                x = batch.contiguous()
                h.update(f"{x.dtype}{tuple(x.shape)}".encode())
                h.update(x.numpy().tobytes())
            self._identity = f"dataset:{self.name}:{h.hexdigest()[:16]}"
        return self._identity

    def shard(self, rank: int, world: int) -> "DatasetSource":
        return self._with(indices=self.indices[rank::world])


class FolderSource(ImageSource):
    """Image files in a folder (sorted; ``recursive`` for subfolders), read as uint8 RGB (16-bit files
    scaled to 8 bits, ``fewstep.data.read_image``); every image must have the first one's size. The
    identity hashes every file's relative path and bytes, so an edited folder never hits a stale cache."""

    def __init__(self, folder: str | Path, batch_size: int = 64, recursive: bool = False, limit: int | None = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise ValueError(f"image folder {self.folder} does not exist")
        files = image_files(self.folder, recursive)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder}")
        self.files = files[:limit] if limit else files
        self.batch_size = int(batch_size)
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        first = None  # (name, shape) of the first image: every image is checked against it
        for start in range(0, len(self.files), self.batch_size):
            batch = []
            for p in self.files[start:start + self.batch_size]:
                batch.append(read_image(p))
                if first is None:
                    first = (p.name, batch[-1].shape)
                elif batch[-1].shape != first[1]:
                    raise ValueError(f"images in {self.folder} differ in size: {p.name} is "
                                     f"{tuple(batch[-1].shape[1:])}, {first[0]} is {tuple(first[1][1:])}; "
                                     "resize them to one size first")
            yield torch.stack(batch)

    @property
    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256()
            for p in self.files:
                h.update(str(p.relative_to(self.folder)).encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
            self._identity = f"folder:{self.folder.name}:{h.hexdigest()[:16]}"
        return self._identity

    def shard(self, rank: int, world: int) -> "FolderSource":
        return self._with(files=self.files[rank::world])


def seeded_noise(seeds: Iterable[int], shape: tuple[int, ...], device=None, dtype=torch.float32) -> Tensor:
    """``[len(seeds), *shape]`` standard normal, row ``i`` from ``torch.Generator().manual_seed(seeds[i])``
    (on the CPU, so a seed gives the same noise on every device)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(rows).to(device)


class _PerSeedNoise:
    """Step noise for stochastic samplers: row ``i`` from its own generator (seeded ``seed + 2**31``,
    so it never repeats ``x_T``'s stream), so an image depends on its seed alone."""

    def __init__(self, seeds: Iterable[int]):
        self.generators = [torch.Generator().manual_seed(int(s) + 2 ** 31) for s in seeds]

    def __call__(self, like: Tensor) -> Tensor:
        rows = [torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in self.generators]
        return torch.stack(rows).to(like.device)


class SamplerSource(ImageSource):
    """Images from ``sampler.sample(x_T)`` for each seed in ``seeds`` (``range(start, stop)``).

    ``x_T`` is ``seeded_noise`` (standard normal), times the grid's first sigma on non-VP schedules
    (as ``Sampler.prior_sample``). ``decode`` maps samples to images (e.g. a VAE, or a reshape of
    testbed vectors); outputs are expected in ``[-1, 1]``. Anything with ``.sample(x_T, noise=...)``
    works, a student included. The identity names the sampler and seeds, not the network's weights, so
    ``reference_stats`` never caches a sampler's statistics. ``seconds`` accumulates the wall time spent
    in ``sampler.sample`` (and ``decode``), so a cost can be reported without the feature extraction, and
    ``cpu_seconds`` the process CPU time spent there (what a busy, shared machine does not inflate).
    """

    content_addressed = False

    def __init__(self, sampler, seeds: range, shape: tuple[int, ...], batch_size: int = 64,
                 decode: Callable[[Tensor], Tensor] | None = None, device=None, name: str | None = None):
        if not isinstance(seeds, range) or seeds.step != 1:
            raise ValueError(f"seeds must be a range(start, stop), got {seeds!r}")
        self.sampler, self.seed_range, self.shape = sampler, seeds, tuple(shape)
        self.batch_size, self.decode, self.device = int(batch_size), decode, device
        self.name = name or repr(sampler)
        self._subset: range | None = None  # this rank's seeds, when sharded
        self.seconds = self.cpu_seconds = 0.0

    @property
    def seeds(self) -> tuple[int, int]:
        return (self.seed_range.start, self.seed_range.stop)

    def __len__(self) -> int:
        return len(self._subset if self._subset is not None else self.seed_range)

    def __iter__(self):
        seeds = self._subset if self._subset is not None else self.seed_range
        schedule = getattr(self.sampler, "schedule", None)
        scale = 1.0
        if schedule is not None and not getattr(schedule, "variance_preserving", True):
            scale = float(self.sampler.grid.sigma[0])
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            start, cpu = time.perf_counter(), time.process_time()
            x_T = seeded_noise(chunk, self.shape, self.device) * scale
            x0 = self.sampler.sample(x_T, noise=_PerSeedNoise(chunk))
            x0 = self.decode(x0) if self.decode is not None else x0
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
            yield x0

    @property
    def identity(self) -> str:
        return f"sampler:{self.name}:seeds{self.seeds[0]}-{self.seeds[1]}"

    def shard(self, rank: int, world: int) -> "SamplerSource":
        return self._with(_subset=self.seed_range[rank::world])


# ---------------------------------------------------------------------------------------------
# Statistics of a source


@dataclass
class FeatureStats:
    """Float64 mean and covariance of features, the ``Protocol`` they were computed under, and the
    features themselves when kept (KID and precision/recall need them)."""

    mu: np.ndarray
    sigma: np.ndarray
    protocol: Protocol
    features: Tensor | None = None
    source: str = ""

    @property
    def n(self) -> int:
        return self.protocol.n

    def save(self, path: str | Path) -> None:
        """``.npz`` with ``mu``, ``sigma`` (EDM's keys), ``protocol`` (JSON) and ``source``; atomic."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, protocol=np.array(self.protocol.to_json()),
                 source=np.array(self.source))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, protocol: Protocol | None = None, assume: Protocol | None = None) -> "FeatureStats":
        """Our ``.npz`` (protocol stored), or a bare one like EDM's ``fid.py ref`` output (``mu``, ``sigma``
        only), whose protocol is ``assume`` (default: EDM's -- TF-Inception pool3, TF1 resize, EDM uint8;
        N unknown = 0); ``source`` then names the file by content. With ``protocol``, raises
        ``ProtocolMismatch`` unless the file's feature protocol is the same."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such statistics file: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError("it holds one array, not named arrays")
                if "mu" not in z or "sigma" not in z:
                    raise ValueError(f"it has no 'mu' and 'sigma' arrays (keys: {sorted(z.files)})")
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                stored = Protocol.from_dict(json.loads(str(z["protocol"]))) if "protocol" in z else None
                source = str(z["source"]) if "source" in z else ""
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not FD statistics (an .npz with 'mu' and 'sigma'): {err}") from None
        if stored is None:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            stored = (assume or Protocol()).replace(seeds=None)
            source = f"npz:{path.name}:{digest}"
        if protocol is not None:
            stored.check_same_features(protocol, f"statistics in {path} and the extractor")
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu, sigma, stored, None, source)


def compute_stats(source: Iterable[Tensor], extractor: FeatureExtractor, keep_features: bool = False,
                  distributed: bool = True, progress: bool = False) -> FeatureStats:
    """Stream ``source`` through ``extractor`` into float64 ``RunningStats``.

    ``source``: an ``ImageSource`` (or any iterable of image batches, then identity and seeds are
    unknown). Under an initialised ``torch.distributed`` group and ``distributed=True`` this rank takes
    ``source.shard(rank, world)`` and the sums are all-reduced (kept features are this rank's only).
    """
    import torch.distributed as dist

    rank_world = None
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank_world = (dist.get_rank(), dist.get_world_size())
        source = source.shard(*rank_world)
    running, kept = RunningStats(), []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(source) if hasattr(source, "__len__") else None, unit="img", desc="features")
    for images in source:
        f = extractor(images)
        running.update(f)
        if keep_features:
            kept.append(f.detach().cpu())
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    if rank_world is not None:
        running = all_reduce_stats(running, dim=running.dim)
    if running.n < 2:
        raise ValueError(f"FD statistics need at least 2 images, got N={running.n}")
    protocol = extractor.protocol.replace(n=running.n, seeds=getattr(source, "seeds", None))
    features = torch.cat(kept) if keep_features else None
    return FeatureStats(running.mean.cpu().numpy(), running.cov.cpu().numpy(), protocol, features,
                        getattr(source, "identity", "") if isinstance(source, ImageSource) else "")


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass(frozen=True)
class Score:
    """FD (and KID / precision / recall when asked) of generated stats against a reference, with the
    full protocol (``protocol.n`` generated images, ``protocol.seeds``, ``protocol.reference``)."""

    fd: float
    protocol: Protocol
    n_reference: int
    kid_mean: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"fd": self.fd, "kid_mean": self.kid_mean, "kid_std": self.kid_std, "precision": self.precision,
                "recall": self.recall, "n_reference": self.n_reference, "protocol": self.protocol.to_dict(),
                **self.extra}

    def check_comparable(self, other: "Score") -> None:
        self.protocol.check_comparable(other.protocol)

    def __lt__(self, other: "Score") -> bool:
        """Ordering (``min`` over repeats) is defined only under one protocol; otherwise it raises."""
        self.check_comparable(other)
        return self.fd < other.fd


def score(generated: FeatureStats, reference: FeatureStats, kid_subset_size: int | None = None,
          kid_subsets: int = 100, prc_k: int | None = None, seed: int = 2020) -> Score:
    """FD of ``generated`` against ``reference`` (raises ``ProtocolMismatch`` unless both share the feature
    protocol); KID when ``kid_subset_size`` is given and precision/recall when ``prc_k`` is (both need
    kept features on both sides)."""
    generated.protocol.check_same_features(reference.protocol, "generated and reference statistics")
    ref_id = reference.source or "unnamed"
    fd = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
    kid = (None, None)
    pr = (None, None)
    if kid_subset_size is not None or prc_k is not None:
        if generated.features is None or reference.features is None:
            raise ValueError("KID and precision/recall need features: compute both sides with keep_features=True "
                             "(a reference loaded from mu/sigma statistics has none)")
    if kid_subset_size is not None:
        kid = kernel_distance(generated.features, reference.features, kid_subsets, kid_subset_size, seed)
    if prc_k is not None:
        pr = precision_recall(generated.features, reference.features, prc_k)
    extra = {}
    dim = len(generated.mu)
    if 0 < min(generated.n, reference.n or generated.n) <= dim:
        extra["note"] = (f"N={min(generated.n, reference.n or generated.n)} <= feature dim {dim}: a rank-deficient "
                         "covariance; FD is biased upward, compare only at equal N (KID is unbiased)")
    return Score(fd, generated.protocol.replace(reference=ref_id), reference.n, *kid, *pr, extra=extra)


# ---------------------------------------------------------------------------------------------
# References, cached by content


def cache_key(protocol: Protocol, identity: str, keep_features: bool = False) -> str:
    """Content-addressed key: the feature protocol and the data's identity (which hashes its content)."""
    features = {k: v for k, v in protocol.to_dict().items() if k not in ("n", "seeds", "reference")}
    payload = json.dumps({"protocol": features, "data": identity, "features": keep_features}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep")) / "fid-refs"


def reference_stats(source: ImageSource, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
                    keep_features: bool = False, progress: bool = False) -> FeatureStats:
    """Statistics of a reference data set, cached under ``cache_dir`` (default ``$FEWSTEP_CACHE/fid-refs``)
    by ``cache_key`` when the source is ``content_addressed`` (so a changed protocol, extractor weights or
    data set is a new entry, never a stale one). With ``keep_features`` the features are cached too
    (needed for KID / precision-recall)."""
    if not getattr(source, "content_addressed", False):  # no content hash, no cache: never stale
        return compute_stats(source, extractor, keep_features=keep_features, progress=progress)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(extractor.protocol, source.identity, keep_features)
    path = cache / f"{key}.npz"
    feat_path = cache / f"{key}.features.pt"
    if path.is_file() and (not keep_features or feat_path.is_file()):
        try:
            stats = FeatureStats.load(path)
            if keep_features:
                stats.features = torch.load(feat_path, weights_only=True)
        except Exception as err:  # a torn or foreign file: never fatal, never silently used
            warnings.warn(f"cached reference statistics {path} are unreadable ({err}); recomputing them "
                          f"(delete {path} if this repeats)", RuntimeWarning, stacklevel=2)
        else:
            stats.protocol.check_same_features(extractor.protocol, f"cached reference {path}")
            return stats
    stats = compute_stats(source, extractor, keep_features=keep_features, progress=progress)
    try:
        if keep_features:
            buf = io.BytesIO()
            torch.save(stats.features, buf)
            atomic_write_bytes(feat_path, buf.getvalue())
        stats.save(path)
    except OSError as err:  # read-only or full cache folder: the score stands, only the cache is lost
        warnings.warn(f"reference statistics not cached: cannot write to {cache} ({err.strerror or err}); "
                      "scored anyway (set --cache-dir or $FEWSTEP_CACHE to a writable folder)",
                      RuntimeWarning, stacklevel=2)
    return stats
