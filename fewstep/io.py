"""Writing images and files, one way for the whole suite.

- ``to_uint8``: float images -> uint8 pixels with EDM's quantisation (``generate.py``).
- ``images_to_uint8``: the input contract for image *data* (tensors, data sets, files): uint8 as is, or
  floats in a declared ``value_range`` that they must fit; anything else is refused with how to convert.
- ``save_grid``: images in ``[-1, 1]`` as one image grid (``nrow`` per row, 1-pixel padding), atomically.
- ``atomic_write`` (and ``atomic_write_bytes``, ``atomic_save``): write a temporary file beside the
  target, fsync, then rename it over the target, so a killed process never leaves a torn file.
- ``atomic_dir``: the same for a folder (an exported diffusers pipeline): write into a temporary
  sibling, and only once it is complete rename it into place, replacing the older one.
A full disk or quota (``ENOSPC``, ``EDQUOT``, and torch's short-write ``unexpected pos``) raises
``NoSpaceLeft`` ("no space left on the device for PATH", exit status 1 from ``fewstep``); any error, a
``KeyboardInterrupt`` included, leaves no temporary file or folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from torch import Tensor

__all__ = ["to_uint8", "images_to_uint8", "parse_value_range", "VALUE_RANGES", "save_grid", "atomic_write",
           "atomic_write_bytes", "atomic_save", "atomic_dir", "NoSpaceLeft"]


def to_uint8(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Float images in ``value_range`` -> uint8, EDM's way: ``(x * 127.5 + 128).clip(0, 255).to(uint8)``
    for ``[-1, 1]`` (truncation after ``+ 0.5``: round half up); ``x * 255 + 0.5`` for ``[0, 1]``.
    Out-of-range values are clipped; NaN raises (a silent black pixel would bias the FD)."""
    if not torch.is_floating_point(x):
        raise ValueError(f"to_uint8 expects a float tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("images contain NaN (did the sampler diverge?)")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if (lo, hi) == (-1.0, 1.0):
        y = x * 127.5 + 128  # EDM generate.py, bit for bit
    else:
        scale = 255.0 / (hi - lo)
        y = (x - lo) * scale + 0.5
    return y.clip(0, 255).to(torch.uint8)


#: The float ranges images come in: ``[-1, 1]`` (diffusion models, ``fewstep.data.preprocess``) and
#: ``[0, 1]`` (torchvision's ``ToTensor``), by the names ``--range`` takes.
VALUE_RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0)}

_CONVERT = ("declare the range (--range -1,1 or --range 0,1; value_range=(-1, 1) or (0, 1) in Python), or "
            "convert to uint8 first: fewstep.io.to_uint8(x, (-1, 1)) or to_uint8(x, (0, 1))")


def parse_value_range(text) -> tuple[float, float]:
    """``"-1,1"`` / ``"0,1"`` (or a pair) -> ``(low, high)``; anything else raises ``ValueError``."""
    if isinstance(text, (tuple, list)) and tuple(map(float, text)) in VALUE_RANGES.values():
        return tuple(map(float, text))
    key = str(text).replace(" ", "").strip("[]()")
    if key not in VALUE_RANGES:
        raise ValueError(f"value range must be one of {', '.join(VALUE_RANGES)}, got {text!r}")
    return VALUE_RANGES[key]


def images_to_uint8(images: Tensor, value_range: tuple[float, float] | None = None, what: str = "images") -> Tensor:
    """Image data -> uint8, refusing what is ambiguous. uint8 passes unchanged. Floats need a declared
    ``value_range`` and must lie inside it (up to float round-off), then are quantised by ``to_uint8``
    (exact for data that came from uint8: ``k / 255`` and ``k / 127.5 - 1`` both return ``k``). Other
    dtypes (int64, uint16, bool) and non-finite values are refused; ``what`` names the input in messages."""
    if images.dtype == torch.uint8:
        return images
    if not torch.is_floating_point(images):
        raise ValueError(f"{what} are {images.dtype}; expected uint8 [0, 255] or float with a declared range. "
                         "For 16-bit data: (x.float() / 65535 * 255).round().to(torch.uint8); for 8-bit values "
                         "in a wider integer type: x.to(torch.uint8)")
    if images.numel() == 0:
        return images.to(torch.uint8)
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contain NaN or inf")
    lo_seen, hi_seen = images.min().item(), images.max().item()
    if value_range is None:
        raise ValueError(f"{what} are {images.dtype} with values in [{lo_seen:.4g}, {hi_seen:.4g}] and no declared "
                         f"range, so their scale is ambiguous; {_CONVERT}")
    lo, hi = value_range
    slack = 1e-4 * (hi - lo)  # float round-off of a conversion, never a different scale
    if lo_seen < lo - slack or hi_seen > hi + slack:
        raise ValueError(f"{what} have values in [{lo_seen:.4g}, {hi_seen:.4g}], outside the declared range "
                         f"[{lo:g}, {hi:g}]; {_CONVERT}")
    return to_uint8(images, value_range)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> str:
    """``[N, C, H, W]`` images in ``[-1, 1]`` (clamped) as one image file, ``nrow`` images a row, written
    atomically (``atomic_write``); the file's extension picks the format (``ValueError`` for an unknown one)."""
    import torchvision
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {Path(path).suffix!r}; use .png (or .jpg, .webp)")
    grid = (images.clamp(-1, 1) + 1) / 2
    atomic_write(path, lambda f: torchvision.utils.save_image(grid, f, format=fmt, nrow=nrow, padding=1))
    return path


class NoSpaceLeft(OSError):
    """A write failed because the disk is full; nothing torn was left behind."""

    exit_code = 1  # the ``fewstep`` command prints it as one line

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message, without OSError's "[Errno 28]"


#: How a full disk shows: ``OSError``'s errno, or torch's zip writer, which reports a short write as
#: ``"... unexpected pos N vs M"`` / ``"file write failed"`` and drops the errno.
_FULL_ERRNOS = tuple(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e is not None)
_FULL_TEXTS = ("No space left", "Disk quota exceeded", "unexpected pos", "file write failed")


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in _FULL_ERRNOS or any(t in str(err) for t in _FULL_TEXTS)


def _no_space(path: Path, err: BaseException) -> NoSpaceLeft:
    quota = getattr(err, "errno", None) == getattr(errno, "EDQUOT", object()) or "quota" in str(err)
    return NoSpaceLeft(errno.ENOSPC, f"no space left on the device for {path}{' (disk quota exceeded)' if quota else ''}"
                                     "; free space and run again")


def _remove(tmp: str | None) -> None:
    """Remove a temporary file, whatever interrupted its write (never masking that error)."""
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path`` (its folder made if needed), then rename it over
    ``path``; on any error the temporary file is removed and ``path`` is untouched (a full disk raises
    ``NoSpaceLeft``)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception) and _disk_full(err):
            raise _no_space(path, err) from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (``atomic_write``): a killed run never leaves a torn checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write a folder atomically: ``with atomic_dir(out) as tmp: pipe.save_pretrained(tmp)``.

    The block writes into a temporary sibling of ``path``; when it completes, the files are fsynced and
    the folder renamed to ``path``. An older ``path`` is moved aside only then and deleted after the new
    one is in place, so a reader sees the old export or the new one, never a half-written one. On any
    error the temporary folder is removed and ``path`` is untouched (a full disk raises ``NoSpaceLeft``).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and _disk_full(err):
            raise _no_space(path, err) from err
        raise


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (so the rename publishes complete files)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_folder(root)


def _fsync_folder(folder: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is moved aside first and removed afterwards."""
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
    else:
        old = new.with_name(new.name[: -len(".tmp")] + ".old")
        os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old, path)  # put the old export back
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    _fsync_folder(path.parent)
