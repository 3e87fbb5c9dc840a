"""Pictures for the study page: the key image (a Secondary Capture in the results folder) and the
heat maps (``.npy`` beside it) as PNG, read only from inside the storage folder."""

from __future__ import annotations

import functools
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SIDE = 1024  # pictures for a browser: no bigger than a screen needs


def inside(root: Path, relative_or_absolute: str) -> Path | None:
    """The path under ``root`` (a stored path is relative to it), or None when it points outside."""
    path = Path(relative_or_absolute)
    resolved = (path if path.is_absolute() else root / path).resolve()
    return resolved if resolved.is_relative_to(root.resolve()) and resolved.is_file() else None


def _png(array: np.ndarray) -> bytes:
    image = Image.fromarray(array)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=64)
def key_image_png(path: Path, _mtime: float) -> bytes:
    """The key image's pixels (8-bit grey or RGB, as the worker built it) as PNG."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) * (255.0 / max(high - low, 1.0))).astype(np.uint8)
    return _png(pixels)


@functools.lru_cache(maxsize=64)
def heatmap_png(path: Path, _mtime: float) -> bytes:
    """A 0..1 heat map in the matplotlib colormap the key image uses."""
    import matplotlib

    from dicomnode.imaging.overlay import HEATMAP_COLORMAP

    heat = np.clip(np.nan_to_num(np.load(path).astype(np.float32).squeeze(), nan=0.0), 0.0, 1.0)
    colormap = matplotlib.colormaps[HEATMAP_COLORMAP]
    rgb = np.asarray(colormap(heat)[..., :3] * 255.0, dtype=np.uint8)
    return _png(rgb)
