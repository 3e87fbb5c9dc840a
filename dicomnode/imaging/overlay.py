"""Drawing over a display image: the heat map blended in, text burned in. Owns the matplotlib import.

Used by the key image (report) and by ``dicomnode explain``; pure functions on uint8 RGB arrays.
"""

from __future__ import annotations

import functools
import logging

import matplotlib
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

HEATMAP_COLORMAP = "jet"
HEATMAP_FLOOR = 0.3  # map values below this stay transparent
HEATMAP_MAX_ALPHA = 0.5


def blend_heatmap(rgb: np.ndarray, heatmap: np.ndarray, grey: np.ndarray | None = None) -> np.ndarray:
    """Alpha-blend ``heatmap`` (0..1, any size) over ``rgb`` with a colormap where the map is high.

    Only pixels above the floor change, so only those are computed; the colours are matplotlib's
    (its lookup table indexed as ``Colormap.__call__`` indexes it), the arithmetic is the same.
    ``grey``, when given, is ``rgb``'s one channel of a grey image (each channel equal).
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32).squeeze(), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"heat map must be two-dimensional, not {heat.shape}")
    rows, columns = rgb.shape[:2]
    if heat.shape != (rows, columns):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((columns, rows), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    alpha = np.clip((heat - HEATMAP_FLOOR) / (1.0 - HEATMAP_FLOOR), 0.0, 1.0)
    alpha *= HEATMAP_MAX_ALPHA
    blended = np.array(rgb, dtype=np.uint8, copy=True)
    shown = np.flatnonzero(alpha)  # elsewhere the blend is the image itself
    if shown.size == 0:
        return blended
    lut, size = _colormap_lut()
    # as matplotlib maps floats: index = floor(x * N), with x == 1 in the last entry
    index = np.minimum((heat.ravel()[shown] * np.float32(size)).astype(np.intp), size - 1)
    weight = alpha.ravel()[shown][:, np.newaxis]
    pixels = blended.reshape(-1, 3)
    if grey is not None:  # the same in each channel: one gather instead of three
        base = grey.ravel()[shown].astype(np.float32)[:, np.newaxis]
    else:
        base = pixels[shown].astype(np.float32)
    mixed = base * (1.0 - weight) + lut[index] * weight
    pixels[shown] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return blended


@functools.cache
def _colormap_lut() -> tuple[np.ndarray, int]:
    """The heat map colormap's RGB lookup table scaled to 0..255 (float64), and its size."""
    colormap = matplotlib.colormaps[HEATMAP_COLORMAP]
    return colormap(np.arange(colormap.N))[:, :3] * 255.0, int(colormap.N)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans as shipped with matplotlib (covers Latin, Greek, Cyrillic and the em dash)."""
    try:
        path = font_manager.findfont("DejaVu Sans", fallback_to_default=False)
        return ImageFont.truetype(path, size)
    except (OSError, ValueError):
        logger.debug("DejaVu Sans not found; using Pillow's default font")
        return ImageFont.load_default(size=size)


def burn_in_text(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """Draw ``lines`` at the top left, white with a black outline, sized to the image width."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    size = max(12, image.width // 36)
    font = _font(size)
    y = size // 2
    for line in lines:
        draw.text(
            (size // 2, y),
            line,
            fill=(255, 255, 255),
            font=font,
            stroke_width=max(1, size // 12),
            stroke_fill=(0, 0, 0),
        )
        y += int(size * 1.3)
    return np.asarray(image)
