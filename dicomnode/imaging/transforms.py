"""Stored values -> display values in [0, 1]: palette, Modality LUT, VOI LUT or window, MONOCHROME1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from dicomnode.imaging.frames import _Frame

logger = logging.getLogger(__name__)


def _display_transform(frame: _Frame) -> Callable[[np.ndarray], np.ndarray]:
    """A pointwise map from the frame's stored values to display values in [0, 1] (0 = black).

    Pointwise so that nearest-neighbour resizing may run before it (cheaper, same result); any
    statistics it needs (the actual range when there is no window) are taken from the whole frame.
    """
    if frame.photometric == "RGB":
        if frame.values.dtype == np.float32:  # palette colour, already in [0, 1]
            return lambda values: values
        top = float((1 << min(frame.bits_stored, 16)) - 1)
        return lambda values: values.astype(np.float32) * np.float32(1.0 / top)

    view = frame.view
    invert = frame.photometric == "MONOCHROME1"
    modality = _modality_transform(view)
    voi = _voi_transform(view, frame, modality)

    def transform(values: np.ndarray) -> np.ndarray:
        display = voi(modality(values))
        if invert:
            display = 1.0 - display
        return display.astype(np.float32, copy=False)

    return transform


def _modality_transform(view: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    if view.get("ModalityLUTSequence"):
        return lambda values: apply_modality_lut(values, view)
    if "RescaleSlope" in view and "RescaleIntercept" in view:
        slope = np.float32(float(view.RescaleSlope))
        intercept = np.float32(float(view.RescaleIntercept))

        def rescale(values: np.ndarray) -> np.ndarray:
            out = values.astype(np.float32)
            if slope != 1:
                out *= slope
            if intercept != 0:
                out += intercept
            return out

        return rescale
    return lambda values: values


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS element (PS3.3 C.11.2.1.2: use the first)."""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0]
    return float(value)


def _voi_transform(
    view: Dataset, frame: _Frame, modality: Callable[[np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    """VOI LUT Sequence, else the first window, else the full range -> [0, 1]."""
    sequence = view.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") and sequence[0].get("LUTData") is not None:
        item = sequence[0]
        depth = int(item.LUTDescriptor[2])
        top = float((1 << depth) - 1)

        def voi_lut(values: np.ndarray) -> np.ndarray:
            integers = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int32)
            mapped: np.ndarray = apply_voi(integers, view).astype(np.float32)
            return np.clip(mapped / np.float32(top), 0.0, 1.0)

        return voi_lut

    center = view.get("WindowCenter")
    width = view.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
        c, w = _first(center), _first(width)
        if function == "SIGMOID" and w > 0:
            return lambda x: (
                np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-4.0 / w) * (x - np.float32(c))))
            )
        if function == "LINEAR_EXACT" and w > 0:
            return _linear(c, w)
        if function == "LINEAR" and w >= 1:
            # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
            if w == 1:
                return lambda x: (x > np.float32(c - 0.5)).astype(np.float32)
            return _linear(c - 0.5, w - 1)
        logger.debug("ignoring window %s/%s with VOI LUT Function %s", c, w, function)

    # No VOI: the full range. 8-bit images are already display images: their stored range.
    bits = frame.bits_stored
    if bits <= 8 and not view.get("ModalityLUTSequence") and "RescaleSlope" not in view:
        low, high = 0.0, float((1 << bits) - 1)
    else:
        whole = modality(frame.values)
        low, high = float(whole.min()), float(whole.max())
    if high <= low:
        return lambda x: np.zeros(np.shape(x), dtype=np.float32)
    return _linear(low + (high - low) / 2.0, high - low)


def _linear(center: float, width: float) -> Callable[[np.ndarray], np.ndarray]:
    """Map [center - width/2, center + width/2] linearly onto [0, 1], clipping outside."""
    gain = np.float32(1.0 / width)
    bias = np.float32(0.5 - center / width)

    def linear(values: np.ndarray) -> np.ndarray:
        out = values.astype(np.float32)  # a copy: the caller's array stays untouched
        out *= gain
        out += bias
        return np.clip(out, 0.0, 1.0, out=out)

    return linear
