"""Image data that needs no download at run time, with one preprocessing for all sources.

Sources, by name (``load_images``):
- ``"fashion_mnist"``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
  IDX files under ``/usr/share/datasets/fashion-mnist``), or torchvision's download with
  ``download=True`` where the internet is reachable;
- ``"mnist"``, ``"cifar10"``: torchvision's datasets (download where reachable);
- ``"digits"``: scikit-learn's 8x8 digits (1,797 images; ``pip install scikit-learn``);
- a folder of images (``"folder:/path"``; ``image_files`` and ``read_image`` also read the folders of
  ``fewstep.eval.FolderSource``).

Every source comes out as float32 ``[N, C, size, size]`` in ``[-1, 1]`` (``preprocess``). Both
``fewstep.distill`` and ``fewstep.eval`` import their data from here.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEBIAN_FASHION_MNIST", "IMAGE_EXTENSIONS", "read_idx", "load_fashion_mnist", "load_images", "preprocess",
           "image_files", "read_image", "ImageReadError"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
_IDX_LABELS = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}


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


def _torchvision(name: str, split: str, root: str, download: bool) -> Tensor:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    ds = cls(root=root, train=split == "train", download=download)
    data = torch.as_tensor(ds.data)
    return data.permute(0, 3, 1, 2) if data.ndim == 4 else data  # CIFAR is NHWC


def _digits() -> Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from err
    return torch.as_tensor(load_digits().images * (255.0 / 16.0)).round().to(torch.uint8)


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


def _folder(path: str) -> Tensor:
    files = image_files(path)
    if not files:
        raise FileNotFoundError(f"no images under {path}")
    arrays = [read_image(p) for p in files]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images under {path} differ in size; resize them first")
    return torch.stack(arrays)


def load_images(name: str, split: str = "train", size: int | None = None, channels: int | None = None,
                root: str | None = None, download: bool = False, limit: int | None = None) -> Tensor:
    """Float32 ``[N, C, size, size]`` images in [-1, 1] from a named source (see the module docstring)."""
    if name.startswith("folder:"):
        raw = _folder(name[len("folder:"):])
    elif name == "fashion_mnist" and not download:
        raw = load_fashion_mnist(split, root)
    elif name in ("mnist", "fashion_mnist", "cifar10"):
        raw = _torchvision(name, split, root or "data", download)
    elif name == "digits":
        raw = _digits()
    else:
        raise ValueError(f"unknown data set {name!r}; expected fashion_mnist, mnist, cifar10, digits or folder:PATH")
    if limit is not None:
        raw = raw[:limit]
    return preprocess(raw, size, channels)
