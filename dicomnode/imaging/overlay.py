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
# the map is shown only where it reaches this fraction of its own maximum: Grad-CAM is relative, and a
# lower level tints most of the film (0.3 of an absolute scale tinted two thirds of a real radiograph)
HEATMAP_LEVEL = 0.5
HEATMAP_MAX_ALPHA = 0.45  # at the map's maximum; the radiograph stays readable through the colour


def heatmap_alpha(heat: np.ndarray) -> np.ndarray:
    """Per-pixel blend weight of a map normalised to its maximum: 0 below the level, rising to the maximum."""
    return np.clip((heat - HEATMAP_LEVEL) / (1.0 - HEATMAP_LEVEL), 0.0, 1.0) * HEATMAP_MAX_ALPHA


def blend_heatmap(rgb: np.ndarray, heatmap: np.ndarray, grey: np.ndarray | None = None) -> np.ndarray:
    """Alpha-blend ``heatmap`` (any scale, any size) over ``rgb`` where it is high, through a colormap.

    The map is divided by its maximum, so the colour and the level are relative to it (see the legend of
    :func:`add_result_band`). Only pixels above the level change, so only those are computed; the colours
    are matplotlib's (its lookup table indexed as ``Colormap.__call__`` indexes it). ``grey``, when
    given, is ``rgb``'s one channel of a grey image (each channel equal).
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32).squeeze(), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"heat map must be two-dimensional, not {heat.shape}")
    rows, columns = rgb.shape[:2]
    if heat.shape != (rows, columns):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((columns, rows), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, None)
    blended = np.array(rgb, dtype=np.uint8, copy=True)
    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0.0:
        return blended
    heat = np.minimum(heat / np.float32(peak), np.float32(1.0))
    alpha = heatmap_alpha(heat)
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


BAND_BACKGROUND = (0, 0, 0)
BAND_TEXT = (255, 255, 255)
MIN_FONT_SIZE = 10


def _fitted_font(lines: list[str], width: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """The font (and its size) that fits the longest line into ``width``: 1/40 of it, smaller if needed."""
    size = max(MIN_FONT_SIZE, width // 40)
    while True:
        font = _font(size)
        margin = size // 2
        widest = max((font.getlength(line) for line in lines), default=0.0)
        if widest <= width - 2 * margin or size <= MIN_FONT_SIZE:
            return font, size
        size -= 1


def add_result_band(rgb: np.ndarray, lines: list[str], *, legend: bool) -> np.ndarray:
    """The image with a black band added below it holding ``lines`` and, with ``legend``, the heat map's key.

    The text goes outside the radiograph so it never covers the film's own markers (side markers,
    positioning text); the image's rows grow by the band's height, its pixels are unchanged. The legend
    is the colour bar of the blended colours from the level to the map's maximum, with labels.
    """
    image = np.asarray(rgb, dtype=np.uint8)
    columns = image.shape[1]
    level = f"{round(HEATMAP_LEVEL * 100)} %"
    legend_title = f"heat map: where the model looked, shown from {level} of its maximum"
    font, size = _fitted_font([*lines, legend_title], columns)
    margin = max(2, size // 2)
    line_height = int(size * 1.3)
    bar_height = max(4, int(size * 0.8))
    height = margin + line_height * len(lines) + margin
    if legend:
        height += line_height + bar_height + line_height + margin
    band = Image.new("RGB", (columns, height), BAND_BACKGROUND)
    draw = ImageDraw.Draw(band)
    y = margin
    for line in lines:
        draw.text((margin, y), line, fill=BAND_TEXT, font=font)
        y += line_height
    if legend:
        y += margin
        draw.text((margin, y), legend_title, fill=BAND_TEXT, font=font)
        y += line_height
        bar_width = max(2, min(columns - 2 * margin, columns // 2))
        lut, lut_size = _colormap_lut()
        levels = np.linspace(HEATMAP_LEVEL, 1.0, bar_width, dtype=np.float32)
        colours = lut[np.minimum((levels * np.float32(lut_size)).astype(np.intp), lut_size - 1)]
        bar = np.repeat(np.rint(colours).astype(np.uint8)[np.newaxis, :, :], bar_height, axis=0)
        band.paste(Image.fromarray(bar), (margin, y))
        y += bar_height + max(1, size // 6)
        draw.text((margin, y), level, fill=BAND_TEXT, font=font)
        right = "100 %"
        draw.text((margin + bar_width - font.getlength(right), y), right, fill=BAND_TEXT, font=font)
    return np.concatenate([image, np.asarray(band)], axis=0)
