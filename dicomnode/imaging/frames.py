"""Reading a DICOM file and decoding the frames a model needs (at a reduced resolution when faithful)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import pydicom.uid
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, convert_color_space

from dicomnode.errors import DicomNodeError, InvalidDatasetError
from dicomnode.imaging.spec import FrameSelection

logger = logging.getLogger(__name__)

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
