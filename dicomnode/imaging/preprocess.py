"""Resizing and model input: a model card's preprocessing applied to decoded frames; the display image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from dicomnode.errors import DicomNodeError, InvalidDatasetError
from dicomnode.imaging.frames import _decode_frames, _Frame, read_header
from dicomnode.imaging.spec import _PIL_FILTERS, Interpolation, PreprocessSpec, validate_spec
from dicomnode.imaging.transforms import _display_transform

_T = TypeVar("_T")


def _nearest_indices(source: int, target: int) -> np.ndarray:
    """The source index Pillow's NEAREST resize samples for each target index.

    Pillow (ImagingScaleAffine) starts at ``scale * 0.5`` and adds ``scale`` per pixel in double
    precision; a sequential cumulative sum reproduces its rounding exactly.
    """
    scale = source / target
    steps = np.full(target, scale, dtype=np.float64)
    steps[0] = scale * 0.5
    positions = np.cumsum(steps)
    return np.minimum(positions.astype(np.int64), source - 1)


def _resize_nearest(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape[:2] == size:
        return values
    rows = _nearest_indices(values.shape[0], size[0])
    cols = _nearest_indices(values.shape[1], size[1])
    picked: np.ndarray = values[rows[:, None], cols[None, :]]
    return picked


def _resize(values: np.ndarray, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """Resize a 2-D or (rows, cols, 3) uint8/float32 array with Pillow (as Keras/torchvision do)."""
    if values.shape[:2] == size:
        return values
    if interpolation == "nearest":
        return _resize_nearest(values, size)
    resample = _PIL_FILTERS[interpolation]
    target = (size[1], size[0])
    if values.dtype == np.uint8:
        return np.asarray(Image.fromarray(values).resize(target, resample))
    planes = [values] if values.ndim == 2 else [values[..., i] for i in range(values.shape[2])]
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(target, resample))
        for p in planes
    ]
    return resized[0] if values.ndim == 2 else np.stack(resized, axis=-1)


def _luminance(display: np.ndarray, quantized: bool) -> np.ndarray:
    """RGB -> grey with ITU-R 601 weights; on 8-bit values exactly as Pillow's convert('L')."""
    if quantized:
        rgb = np.rint(display * 255.0).astype(np.uint32)
        grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return grey.astype(np.float32) / np.float32(255.0)
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    grey_values: np.ndarray = display @ weights
    return grey_values


def _frame_to_input(frame: _Frame, spec: PreprocessSpec) -> np.ndarray:
    """One decoded frame -> (channels, rows, cols) float32 following ``spec``."""
    transform = _display_transform(frame)
    if spec.interpolation == "nearest":
        display = transform(_resize_nearest(frame.values, spec.size))
    else:
        display = transform(frame.values)
    if display.ndim == 3 and spec.channels == 1:
        display = _luminance(display, spec.quantize_8bit)
    if spec.quantize_8bit:
        levels = np.rint(display * np.float32(255.0)).astype(np.uint8)
        values64 = _resize(levels, spec.size, spec.interpolation).astype(np.float64) / 255.0
    else:
        values64 = _resize(display, spec.size, spec.interpolation).astype(np.float64)
    planes = values64[None] if values64.ndim == 2 else np.moveaxis(values64, -1, 0)
    if planes.shape[0] == 1 and spec.channels == 3:
        planes = np.repeat(planes, 3, axis=0)
    planes = planes * spec.scale + spec.offset
    if spec.mean is not None:
        planes = planes - np.asarray(spec.mean, dtype=np.float64).reshape(-1, 1, 1)
    if spec.std is not None:
        planes = planes / np.asarray(spec.std, dtype=np.float64).reshape(-1, 1, 1)
    return planes.astype(np.float32)


def _need_for(spec: PreprocessSpec) -> tuple[int, int] | None:
    if not spec.reduced_decode or spec.interpolation == "nearest":
        return None
    margin = max(spec.reduced_decode_margin, 1.0)
    return (int(np.ceil(spec.size[0] * margin)), int(np.ceil(spec.size[1] * margin)))


def decode_model_input(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """In this process, without a time limit: the model input, (frames, channels, rows, cols) float32."""
    validate_spec(spec)
    frames = _guard(path, lambda: _decode_frames(path, spec.frames, _need_for(spec)))
    return _guard(path, lambda: np.stack([_frame_to_input(frame, spec) for frame in frames]))


def _display_need(rows: int, cols: int, max_size: int | None) -> tuple[int, int] | None:
    """The smallest decoded size a display image of at most ``max_size`` pixels needs (None: full)."""
    if max_size is None:
        return None
    ratio = max_size / max(rows, cols, 1)
    if ratio >= 1:
        return None
    return (max(int(rows * ratio), 1), max(int(cols * ratio), 1))


def _render_display(frame: _Frame, max_size: int | None) -> np.ndarray:
    """A decoded frame as shown: display values as uint8, area-shrunk to ``max_size`` when given."""
    display = _display_transform(frame)(frame.values)
    levels = np.rint(display * np.float32(255.0)).astype(np.uint8)
    if max_size is not None and max(levels.shape[:2]) > max_size:
        ratio = max_size / max(levels.shape[:2])
        size = (max(round(levels.shape[0] * ratio), 1), max(round(levels.shape[1] * ratio), 1))
        levels = _resize(levels, size, "area")
    return levels


def decode_display_image(path: str | Path, max_size: int | None = None) -> np.ndarray:
    """In this process, without a time limit: the first frame as shown, uint8 (rows, cols[, 3])."""
    need: tuple[int, int] | None = None
    if max_size is not None:
        header = read_header(path)
        need = _display_need(int(header.get("Rows") or 0), int(header.get("Columns") or 0), max_size)
    frame = _guard(path, lambda: _decode_frames(path, "first", need)[0])
    return _guard(path, lambda: _render_display(frame, max_size))


def decode_model_input_and_display(
    path: str | Path, spec: PreprocessSpec, max_size: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """In this process: :func:`decode_model_input` and :func:`decode_display_image` with one decode.

    The display image is rendered from the frame decoded for the model when that is the first frame
    at a resolution no lower than the display image needs (e.g. a full-resolution decode); otherwise
    the first frame is decoded a second time for it, as :func:`decode_display_image` does. The
    display image is None when only it fails.
    """
    validate_spec(spec)
    frames = _guard(path, lambda: _decode_frames(path, spec.frames, _need_for(spec)))
    model_input = _guard(path, lambda: np.stack([_frame_to_input(frame, spec) for frame in frames]))
    first = frames[0]
    try:
        if first.index == 0 and first.full_resolution:
            return model_input, _guard(path, lambda: _render_display(first, max_size))
        need = _display_need(*first.source_size, max_size)
        frame = _guard(path, lambda: _decode_frames(path, "first", need)[0])
        return model_input, _guard(path, lambda: _render_display(frame, max_size))
    except InvalidDatasetError:
        return model_input, None  # the model input stands; the caller may retry the display alone


def _guard(path: str | Path, work: Callable[[], _T]) -> _T:
    """Run ``work``; unexpected failures become InvalidDatasetError naming only the file."""
    try:
        return work()
    except DicomNodeError:
        raise
    except MemoryError as exc:
        raise InvalidDatasetError(f"{Path(path).name}: pixel data too large to decode") from exc
    except Exception as exc:
        raise InvalidDatasetError(
            f"{Path(path).name}: cannot process pixel data ({type(exc).__name__})"
        ) from exc
