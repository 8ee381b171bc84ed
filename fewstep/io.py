"""Writing images and files, one way for the whole suite.

- ``to_uint8``: float images -> uint8 pixels with EDM's quantisation (``generate.py``).
- ``save_grid``: images in ``[-1, 1]`` as one PNG grid (``nrow`` per row, 1-pixel padding).
- ``atomic_write`` (and ``atomic_write_bytes``, ``atomic_save``): write a temporary file beside the
  target, fsync, then rename it over the target, so a killed process never leaves a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import Tensor

__all__ = ["to_uint8", "save_grid", "atomic_write", "atomic_write_bytes", "atomic_save"]


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


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> str:
    """``[N, C, H, W]`` images in ``[-1, 1]`` (clamped) as one image file, ``nrow`` images a row."""
    import torchvision

    torchvision.utils.save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path`` (its folder made if needed), then rename it over
    ``path``; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (``atomic_write``): a killed run never leaves a torn checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))
