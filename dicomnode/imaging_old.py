"""DICOM -> model input: decode, Modality LUT, VOI LUT/window, photometric, resize, normalise.

Pixel data arrives from untrusted peers, and some decoders loop forever or crash on crafted input
(pydicom 3.0.2's ``get_j2k_parameters`` spins on a JPEG 2000 box of length zero). So the default
path decodes in a child process with a deadline: :class:`DecodePool` keeps spawned workers alive
between images, kills one that overruns and starts a replacement. ``decode_model_input`` and
``decode_display_image`` do the same work in the calling process, for callers that are already an
isolated, disposable worker.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np
import pydicom
import pydicom.errors
import pydicom.uid
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space
from pydicom.pixels.decoders.base import get_decoder

from dicomnode.errors import DicomNodeError, InvalidDatasetError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

Interpolation = Literal["nearest", "bilinear", "bicubic", "area"]
FrameSelection = Literal["first", "middle", "all"]


@dataclass(frozen=True)
class PreprocessSpec:
    """The exact input preprocessing a model was trained with (from its model card).

    Pipeline: decode -> Modality LUT -> VOI LUT / first window / full range -> MONOCHROME1 inversion
    -> display values in [0, 1] (0 = black) -> resize to ``size`` with ``interpolation`` (stretching,
    no aspect preservation, as Keras' ImageDataGenerator and TorchXRayVision do) -> ``channels``
    (grey replicated to 3 when 3) -> ``value * scale + offset`` -> optional ``(value - mean) / std``.
    """

    size: tuple[int, int]  # (rows, columns) of the model input
    channels: int = 3  # 1 or 3
    interpolation: Interpolation = "bilinear"
    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    quantize_8bit: bool = False  # round display values to 256 levels first (models trained on 8-bit JPEG/PNG)
    frames: FrameSelection = "first"
    # Decode JPEG 2000 at a lower resolution level / baseline JPEG with DCT scaling when the image is
    # at least ``reduced_decode_margin`` times the model input (never for "nearest", which samples
    # single pixels and so is not faithful to an averaged, reduced image).
    reduced_decode: bool = True
    reduced_decode_margin: float = 2.0


# Transfer syntaxes whose codestream Pillow (OpenJPEG) can decode at a reduced resolution level.
_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_MAX_J2K_REDUCE = 5  # OpenJPEG's default number of decomposition levels
_MAX_FRAME_PIXELS = 1 << 28  # 268 M pixels: refuse bigger frames before any decoder allocates them
_PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}
# Elements that decide a frame's value transformations; in enhanced objects they live in the
# Pixel Value Transformation / Frame VOI LUT functional groups instead of the top level.
_LUT_KEYWORDS = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_IMAGE_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation")
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


# --------------------------------------------------------------------------------------------------
# header


def read_header(path: str | Path) -> Dataset:
    """Read a file's attributes without its pixel data (cheap; safe to run in the caller)."""
    return _dcmread(path, stop_before_pixels=True)


def _dcmread(path: str | Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a file; tolerate a missing preamble/meta (take the encoding pydicom detected)."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            if "TransferSyntaxUID" not in ds.file_meta and ds.original_encoding[0] is not None:
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian
                    if implicit
                    else pydicom.uid.ExplicitVRLittleEndian
                    if little
                    else pydicom.uid.ExplicitVRBigEndian
                )
    except Exception as exc:
        raise InvalidDatasetError(
            f"{Path(path).name}: not a readable DICOM file ({type(exc).__name__})"
        ) from exc
    return ds


# --------------------------------------------------------------------------------------------------
# decoding


@dataclass
class _Frame:
    """One decoded frame and what is needed to turn its stored values into display values."""

    values: np.ndarray  # (rows, cols) or (rows, cols, 3), stored values (after colour conversion)
    photometric: str  # after the decoder's colour conversion (YBR_* -> RGB)
    view: Dataset  # the frame's value-transformation attributes (functional groups resolved)
    bits_stored: int
    index: int = 0  # the frame's index in the instance
    full_resolution: bool = True  # False when decoded at a reduced resolution level
    source_size: tuple[int, int] = (0, 0)  # the instance's (Rows, Columns)


def _name(ds: Dataset | None, path: str | Path) -> str:
    """How errors name an instance: its SOP Instance UID, else the file name (never patient data)."""
    uid = ds.get("SOPInstanceUID") if ds is not None else None
    return str(uid) if uid else Path(path).name


def _read_dataset(path: str | Path) -> Dataset:
    """Read a whole file and check that it has decodable pixel data."""
    ds = _dcmread(path)
    name = _name(ds, path)
    if "PixelData" not in ds:
        raise InvalidDatasetError(f"{name}: no Pixel Data (7FE0,0010)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise InvalidDatasetError(f"{name}: {keyword} is missing")
    if int(ds.Rows) * int(ds.Columns) > _MAX_FRAME_PIXELS or int(ds.Rows) == 0 or int(ds.Columns) == 0:
        raise InvalidDatasetError(f"{name}: implausible frame size {ds.Rows}x{ds.Columns}")
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InvalidDatasetError(f"{name}: no Transfer Syntax UID in the file meta information")
    return ds


def _frame_indices(ds: Dataset, frames: FrameSelection) -> list[int]:
    try:
        count = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        count = 1
    if frames == "all":
        return list(range(count))
    if frames == "middle":
        return [count // 2]
    return [0]


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The attributes that transform frame ``index``: top level, then shared, then per-frame groups."""
    view = Dataset()
    view.file_meta = ds.file_meta  # LUT Data with VR OW needs the byte order
    for keyword in (*_IMAGE_KEYWORDS, *_LUT_KEYWORDS):
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for sequence_keyword in _FRAME_GROUPS:
            items = group.get(sequence_keyword)
            if not items:
                continue
            for element in items[0]:
                if element.keyword in _LUT_KEYWORDS:
                    view[element.tag] = element
    return view


def _j2k_precision(codestream: bytes) -> int | None:
    """Ssiz of the first component of a bare J2K codestream (SOC, SIZ), or None if not one."""
    if len(codestream) < 43 or codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    return (codestream[42] & 0x7F) + 1


def _reduced_decode(ds: Dataset, index: int, count: int, need: tuple[int, int]) -> np.ndarray | None:
    """Decode a frame at a power-of-two reduced size that stays >= ``need``; None when not possible."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    reduce = 0
    while reduce < _MAX_J2K_REDUCE and rows >> (reduce + 1) >= need[0] and cols >> (reduce + 1) >= need[1]:
        reduce += 1
    if reduce == 0:
        return None
    if syntax in _J2K_SYNTAXES:
        # Pillow sizes a reduced image as round(n / 2**r) where OpenJPEG gives ceil(n / 2**r): use
        # only levels where the two agree, or Pillow reports a broken data stream.
        while reduce and any(
            (n + ((1 << reduce) >> 1)) // (1 << reduce) != -(-n // (1 << reduce)) for n in (rows, cols)
        ):
            reduce -= 1
        if reduce == 0:
            return None
        codestream = get_frame(ds.PixelData, index, number_of_frames=count)
        precision = _j2k_precision(codestream)
        if precision is None or precision > 16:
            return None
        image = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
        image.reduce = reduce  # type: ignore[method-assign,assignment]  # Pillow's J2K property
        image.load()
        array = np.asarray(image)
        if image.mode == "I;16" and precision < 16:
            array = np.right_shift(array, 16 - precision)  # Pillow scales samples to 16 bits
        expected = (-(-rows // (1 << reduce)), -(-cols // (1 << reduce)))
        return array if array.shape == expected else None
    if syntax == _JPEG_BASELINE and int(ds.get("BitsAllocated", 8)) == 8:
        data = get_frame(ds.PixelData, index, number_of_frames=count)
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        image.draft("L", (cols >> reduce, rows >> reduce))
        array = np.asarray(image.convert("L"))
        return array if array.shape[0] < rows else None
    return None


def _decode_frame(
    ds: Dataset, index: int, count: int, need: tuple[int, int] | None
) -> tuple[np.ndarray, str]:
    """Decode frame ``index``: reduced-resolution when ``need`` allows, else pydicom, else GDCM."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if need is not None:
        try:
            reduced = _reduced_decode(ds, index, count, need)
        except Exception as exc:  # fall back to the full decode below
            logger.debug("reduced decode of %s failed: %s", _name(ds, ""), type(exc).__name__)
            reduced = None
        if reduced is not None:
            return reduced, photometric
    syntax = str(ds.file_meta.TransferSyntaxUID)
    decoder = get_decoder(syntax)
    # Models trained on 8-bit JPEGs saw Pillow's (libjpeg-turbo's) IDCT: decode baseline JPEG alike.
    plugins = ["pillow", "", "gdcm"] if syntax == _JPEG_BASELINE else ["", "gdcm"]
    first: Exception | None = None
    for plugin in plugins:
        try:
            array, meta = decoder.as_array(ds, index=index, decoding_plugin=plugin)
            break
        except Exception as exc:
            first = first or exc
    else:
        assert first is not None
        raise first
    return array, str(meta.get("photometric_interpretation", photometric)).strip().upper()


def _decode_frames(path: str | Path, frames: FrameSelection, need: tuple[int, int] | None) -> list[_Frame]:
    ds = _read_dataset(path)
    name = _name(ds, path)
    indices = _frame_indices(ds, frames)
    count = max(int(ds.get("NumberOfFrames") or 1), 1)
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    result: list[_Frame] = []
    for index in indices:
        try:
            values, photometric = _decode_frame(ds, index, count, need)
        except DicomNodeError:
            raise
        except Exception as exc:
            detail = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
            raise InvalidDatasetError(
                f"{name}: cannot decode frame {index + 1} (transfer syntax "
                f"{ds.file_meta.TransferSyntaxUID}): {type(exc).__name__} {detail}".rstrip()
            ) from exc
        if photometric == "PALETTE COLOR":
            values = _palette_to_rgb(ds, values, name)
            photometric = "RGB"
        elif photometric in ("YBR_FULL", "YBR_FULL_422"):
            values = convert_color_space(values, photometric, "RGB")
            photometric = "RGB"
        elif photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
            raise InvalidDatasetError(f"{name}: photometric interpretation {photometric} is not supported")
        if photometric == "RGB" and (values.ndim != 3 or values.shape[-1] != 3):
            raise InvalidDatasetError(f"{name}: RGB pixel data without 3 samples per pixel")
        if photometric.startswith("MONOCHROME") and values.ndim != 2:
            raise InvalidDatasetError(f"{name}: monochrome pixel data with {values.ndim} dimensions")
        size = (int(ds.Rows), int(ds.Columns))
        full = tuple(values.shape[:2]) == size
        result.append(_Frame(values, photometric, _frame_view(ds, index), bits_stored, index, full, size))
    return result


def _palette_to_rgb(ds: Dataset, values: np.ndarray, name: str) -> np.ndarray:
    """PALETTE COLOR -> RGB in [0, 1] (float32), whatever the LUT entry depth."""
    try:
        rgb = apply_color_lut(values, ds)
    except Exception as exc:
        raise InvalidDatasetError(
            f"{name}: unusable palette colour lookup tables ({type(exc).__name__})"
        ) from exc
    depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
    top = float((1 << depth) - 1) if depth in (8, 16) else float(max(int(rgb.max()), 1))
    return (rgb[..., :3].astype(np.float32) / top).clip(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# stored values -> display values in [0, 1]


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
            mapped = apply_voi(integers, view).astype(np.float32)
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


# --------------------------------------------------------------------------------------------------
# resizing and model input


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
    return values[rows[:, None], cols[None, :]]


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
    return cast(np.ndarray, display @ weights)


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


def validate_spec(spec: PreprocessSpec) -> None:
    if spec.channels not in (1, 3):
        raise ValueError(f"PreprocessSpec.channels must be 1 or 3, not {spec.channels}")
    if len(spec.size) != 2 or min(spec.size) < 1:
        raise ValueError(f"PreprocessSpec.size must be two positive integers, not {spec.size}")
    if spec.interpolation not in _PIL_FILTERS:
        raise ValueError(f"PreprocessSpec.interpolation {spec.interpolation!r} is not supported")


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
