"""Image data that needs no download at run time, with one preprocessing for all sources.

Sources, by name (``load_images``, ``load_conditioned``):
- ``"fashion_mnist"``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
  IDX files under ``/usr/share/datasets/fashion-mnist``), or torchvision's download with
  ``download=True`` where the internet is reachable;
- ``"mnist"``, ``"cifar10"``: torchvision's datasets (download where reachable);
- ``"digits"``: scikit-learn's 8x8 digits (1,797 images; ``pip install scikit-learn``);
- a folder of images (``"folder:/path"``; ``image_files`` and ``read_image`` also read the folders of
  ``fewstep.eval.FolderSource``).

Every source comes out as float32 ``[N, C, size, size]`` in ``[-1, 1]`` (``preprocess``). Both
``fewstep.distill`` and ``fewstep.eval`` import their data from here.

Conditions (``load_conditioned``), the conventions users already have their data in:
- Fashion-MNIST, MNIST, CIFAR-10, digits: class labels (int64) and class names;
- ``folder:PATH`` with ``PATH/metadata.jsonl`` (Hugging Face ``datasets`` ImageFolder): one JSON object a
  line with ``file_name`` (relative to PATH, subfolders allowed) and ``text``; images in metadata order,
  with ``text`` as captions. Every image under PATH must be listed;
- ``folder:PATH`` whose images all sit one level down (torchvision ImageFolder, a subfolder per class):
  labels are indices into the sorted subfolder names;
- ``folder:PATH`` with images only at its top: no conditions. Top-level images beside class subfolders
  are ambiguous and refused.
Prompts alone (the data-free methods) come from a text file, one a line (``load_prompts``).
"""

from __future__ import annotations

import gzip
import os
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.config import DATA_CONDITIONS, DATA_SOURCES, DATA_SPLITS, check_data_source as check_source

__all__ = ["DEBIAN_FASHION_MNIST", "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "CONDITIONS", "read_idx",
           "load_fashion_mnist", "load_images", "load_conditioned", "load_prompts", "ConditionedImages",
           "preprocess", "image_files", "read_image", "ImageReadError", "SOURCES", "SPLITS", "check_source"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
_IDX_LABELS = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# the named sources, splits and condition kinds live in fewstep.config (torch-free), which checks a config's
CONDITIONS = DATA_CONDITIONS
SOURCES, SPLITS = DATA_SOURCES, DATA_SPLITS
METADATA = "metadata.jsonl"


def read_idx(path: str | os.PathLike) -> Tensor:
    """An IDX file (the MNIST format, gzipped or not) as a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       labels: bool = False):
    """Fashion-MNIST (60k train / 10k test, 28x28 uint8) from Debian's package or ``root``."""
    if split not in _IDX_FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    path = root / _IDX_FILES[split]
    if not path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {path}. Install it with `apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu), or load it through torchvision with download=True where the internet is reachable.")
    images = read_idx(path)
    return (images, read_idx(root / _IDX_LABELS[split]).long()) if labels else images


def preprocess(images: Tensor, size: int | None = None, channels: int | None = None) -> Tensor:
    """uint8 ``[N, H, W]`` / ``[N, C, H, W]`` (or floats in [0, 1]) to float32 ``[N, C, size, size]`` in [-1, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [N, H, W] or [N, C, H, W], got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot turn {x.shape[1]} channels into {channels}")
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).contiguous()


def _torchvision(name: str, split: str, root: str, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Images, labels and class names of a torchvision data set."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        how = ("set data.root to the folder that holds it" if download else
               "set data.download=true where the internet is reachable, or data.root to the folder that holds it")
        raise FileNotFoundError(f"data set {name!r} not found under {Path(root).resolve()}; {how}") from None
    except OSError as err:  # a download that could not reach the internet
        raise FileNotFoundError(f"cannot download data set {name!r} to {root}: {err}; download it where the "
                                "internet is reachable and set data.root to its folder") from None
    data = torch.as_tensor(ds.data)
    data = data.permute(0, 3, 1, 2) if data.ndim == 4 else data  # CIFAR is NHWC
    return data, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)


class MissingPackage(ImportError):
    """An optional package a data source needs: one line for the user (``fewstep`` exits 2)."""

    exit_code = 2


def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as uint8 images (0..16 scaled to 0..255) and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingPackage("the 'digits' data set needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.as_tensor(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files (``IMAGE_EXTENSIONS``, any case) in ``folder`` (and its subfolders), sorted."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageReadError(ValueError):
    """An image file that cannot be read (corrupt, truncated, or of an unsupported kind); names the file."""


def read_image(path: str | os.PathLike) -> Tensor:
    """One image file as uint8 RGB ``[3, H, W]``. 16-bit files (PNG modes ``I;16``/``I``) are scaled
    ``65535 -> 255`` (rounded), never clipped; a corrupt or truncated file raises ``ImageReadError``
    naming it."""
    from PIL import Image
    import numpy as np

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, with its name
            if im.mode.startswith("I;16") or im.mode == "I":
                wide = np.asarray(im).astype(np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise ImageReadError(f"{path}: {im.mode} pixels outside [0, 65535]")
                gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
                pixels = torch.from_numpy(np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)))
                return pixels.permute(2, 0, 1).contiguous()
            if im.mode == "F":
                raise ImageReadError(f"{path}: float-valued image (mode F) has no defined pixel range; "
                                     "save it as 8- or 16-bit")
            im = im.convert("RGB")
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways of failing
        raise ImageReadError(f"cannot read image {path}: {err} (corrupt or truncated? replace or remove it)") from None
    return pixels.reshape(im.size[1], im.size[0], 3).permute(2, 0, 1)


def _stack(files: list[Path], path: str) -> Tensor:
    arrays = [read_image(p) for p in files]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images under {path} differ in size; resize them first")
    return torch.stack(arrays)


def _folder(path: str) -> Tensor:
    files = image_files(path)
    if not files:
        raise FileNotFoundError(f"no images under {path}")
    return _stack(files, path)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare by
class ConditionedImages:
    """Images with the condition of each: class ``labels`` (int64 ``[N]``, indices into ``class_names``)
    or ``captions`` (one string per image), or neither."""

    images: Tensor
    labels: Tensor | None = None
    captions: list[str] | None = None
    class_names: list[str] | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.labels is not None and self.captions is not None:
            raise ValueError("ConditionedImages takes labels or captions, not both")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != (n,)):
            raise ValueError(f"labels must be int64 of shape [{n}], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} images")
        if self.class_names is not None and self.labels is None:
            raise ValueError("class_names without labels")

    @property
    def kind(self) -> str:
        """``"labels"``, ``"captions"`` or ``"none"``: which condition the images carry."""
        return "labels" if self.labels is not None else "captions" if self.captions is not None else "none"


def _metadata(path: Path) -> list[tuple[Path, str]]:
    """``(file, caption)`` pairs of a folder's ``metadata.jsonl``, in its order, each file checked to exist."""
    meta = path / METADATA
    pairs, seen = [], {}
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(entry, dict) or "file_name" not in entry or "text" not in entry:
            raise ValueError(f"{where}: expected an object with 'file_name' and 'text'")
        name, text = entry["file_name"], entry["text"]
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"{where}: 'file_name' and 'text' must be strings")
        relative = Path(os.path.normpath(name))
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise ValueError(f"{where}: file_name {name!r} is outside {path}")
        if relative in seen:  # the same image twice would weigh it double, silently
            raise ValueError(f"{where}: {name!r} is already listed on line {seen[relative]}")
        seen[relative] = number
        if not (path / relative).is_file():
            raise ValueError(f"{where}: listed file {path / relative} does not exist")
        pairs.append((path / relative, text))
    if not pairs:
        raise ValueError(f"{meta} lists no images")
    return pairs


def _captioned_folder(path: Path) -> tuple[Tensor, list[str]]:
    pairs = _metadata(path)
    listed = {p for p, _ in pairs}
    unlisted = [p for p in image_files(path) if p not in listed]
    if unlisted:  # a silent subset would be a silently different data set
        raise ValueError(f"{len(unlisted)} image(s) under {path} are not in {METADATA}, e.g. {unlisted[0]}; "
                         "list them or move them out")
    return _stack([p for p, _ in pairs], str(path)), [t for _, t in pairs]


def _folder_conditioned(path: str) -> tuple[Tensor, Tensor | None, list[str] | None, list[str] | None]:
    """A folder's images and conditions: captions from metadata, labels from class subfolders, or none."""
    root = Path(path)
    if (root / METADATA).is_file():
        images, captions = _captioned_folder(root)
        return images, None, captions, None
    files = image_files(root)
    if not files:
        raise FileNotFoundError(f"no images under {path}")
    depths = {len(p.relative_to(root).parts) for p in files}
    if depths == {1}:
        return _stack(files, path), None, None, None
    if depths != {2}:
        where = "both at top level and in subfolders" if 1 in depths else "deeper than one subfolder"
        raise ValueError(f"images under {path} sit {where}: cannot tell whether the subfolders are classes; "
                         "put each class's images directly in its own subfolder (move loose images out), "
                         f"or add {METADATA} with captions")
    class_names = sorted({p.parent.name for p in files})
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in class_names)
    if empty:  # torchvision refuses an empty class too: it would shift every later label
        raise ValueError(f"class folder {root / empty[0]} has no images; add some or remove it")
    labels = torch.tensor([class_names.index(p.parent.name) for p in files], dtype=torch.int64)
    return _stack(files, path), labels, None, class_names


def _source(name: str, split: str, root: str | None, download: bool, with_conditions: bool):
    """Raw images (uint8) with labels, captions and class names, as the named source stores them."""
    check_source(name, split)
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        return _folder_conditioned(path) if with_conditions else (_folder(path), None, None, None)
    if name == "fashion_mnist" and not download:
        images, labels = load_fashion_mnist(split, root, labels=True)
        return images, labels, None, list(FASHION_MNIST_CLASSES)
    if name in ("mnist", "fashion_mnist", "cifar10"):
        images, labels, classes = _torchvision(name, split, root or "data", download)
        return images, labels, None, classes
    if name == "digits":
        images, labels = _digits()
        return images, labels, None, [str(d) for d in range(10)]
    raise AssertionError(name)  # check_source knows every name


def load_images(name: str, split: str = "train", size: int | None = None, channels: int | None = None,
                root: str | None = None, download: bool = False, limit: int | None = None,
                conditions: str | None = None, prompts: str | None = None) -> Tensor:
    """Float32 ``[N, C, size, size]`` images in [-1, 1] from a named source (see the module docstring).

    ``conditions`` and ``prompts`` are ignored here, so that a whole ``DataConfig`` can be passed: they
    are read by ``load_conditioned`` and ``load_prompts``."""
    raw = _source(name, split, root, download, with_conditions=False)[0]
    if limit is not None:
        raw = raw[:limit]
    return preprocess(raw, size, channels)


def _require(kind: str, has: str, name: str) -> None:
    if kind in ("auto", "none") or kind == has:
        return
    what = {"labels": "class labels", "captions": "captions", "none": "no conditions"}[has]
    raise ValueError(f"conditions={kind!r}, but data set {name!r} has {what}; use conditions='{has}' or "
                     f"'auto', or a source with {kind}")


def load_conditioned(name: str, split: str | None = None, size: int | None = None, channels: int | None = None,
                     root: str | None = None, download: bool | None = None, limit: int | None = None,
                     conditions: str = "auto", prompts: str | None = None) -> ConditionedImages:
    """Images as ``load_images`` makes them, each with its condition (the conventions in the module docstring).

    ``conditions``: ``"auto"`` (whatever the source has), ``"none"`` (exactly ``load_images``'s images, no
    conditions), ``"labels"`` or ``"captions"`` (that kind, or a ValueError). ``prompts`` is ignored (read
    by ``load_prompts``), so that a whole ``DataConfig`` can be passed."""
    if conditions not in CONDITIONS:
        raise ValueError(f"unknown conditions {conditions!r}; expected one of {', '.join(CONDITIONS)}")
    raw, labels, captions, class_names = _source(name, split or "train", root, bool(download),
                                                 with_conditions=conditions != "none")
    if conditions == "none":
        labels = captions = class_names = None
    _require(conditions, "labels" if labels is not None else "captions" if captions is not None else "none", name)
    if limit is not None:
        raw = raw[:limit]
        labels = labels[:limit] if labels is not None else None
        captions = captions[:limit] if captions is not None else None
    return ConditionedImages(preprocess(raw, size, channels), labels, captions, class_names)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """A text file's prompts, one a line (whitespace stripped, empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found (expected a text file, one prompt a line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompts file {path}: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one prompt a line; empty lines are skipped)")
    return prompts
