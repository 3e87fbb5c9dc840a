"""Tests of dicomnode.imaging: decoding, value transformations, resizing, the time-limited pool."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corpus import find
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicomnode.errors import DecodeTimeoutError, InvalidDatasetError
from dicomnode.imaging.frames import read_header
from dicomnode.imaging.preprocess import (
    _resize_nearest,
    decode_display_image,
    decode_model_input,
    decode_model_input_and_display,
)
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.sandbox import DecodePool, read_model_input

PNEUMONIA_DIR = (
    Path(pydicom.__file__).parent.parent / "pneumonia_model_package" / "datasets" / "pneumonia-data" / "val"
)
KERAS_SPEC = PreprocessSpec(
    size=(150, 150), channels=3, interpolation="nearest", scale=2.0, offset=-1.0, quantize_8bit=True
)
DISPLAY_SPEC = PreprocessSpec(size=(224, 224), channels=1, interpolation="area")


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    """One long-lived pool for the module (starting a spawned worker costs about a second)."""
    with DecodePool(1) as decode_pool:
        yield decode_pool


def _jpeg_to_dicom(jpeg: bytes, rows: int, cols: int, path: Path) -> Path:
    """Wrap an 8-bit greyscale JPEG unchanged into a Secondary Capture with JPEG Baseline syntax."""
    ds = _base_dataset(rows, cols, bits=8)
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)
    return path


def _base_dataset(rows: int, cols: int, bits: int, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(ds.SOPInstanceUID)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _native(ds: Dataset, array: np.ndarray, path: Path) -> Path:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = array.astype(np.uint16 if ds.BitsAllocated == 16 else np.uint8).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------
# reproducing the Keras training pipeline


def test_keras_imagedatagenerator_pipeline_is_reproduced_exactly(tmp_path: Path, pool: DecodePool) -> None:
    """An 8-bit JPEG in DICOM gives exactly PIL convert('RGB') + NEAREST 150x150, /127.5 - 1."""
    for jpeg_path in sorted(PNEUMONIA_DIR.glob("*.jpeg"))[::5]:
        with Image.open(jpeg_path) as image:
            cols, rows = image.size
            expected = (
                np.asarray(image.convert("RGB").resize((150, 150), Image.Resampling.NEAREST)) / 127.5 - 1
            )
        path = _jpeg_to_dicom(jpeg_path.read_bytes(), rows, cols, tmp_path / f"{jpeg_path.stem}.dcm")
        got = pool.read_model_input(path, KERAS_SPEC)
        assert got.shape == (1, 3, 150, 150) and got.dtype == np.float32
        np.testing.assert_array_equal(got[0], np.moveaxis(expected, -1, 0).astype(np.float32))


def test_nearest_resize_samples_the_pixels_pillow_samples() -> None:
    """The numpy nearest-neighbour resize picks exactly the source pixels Pillow's NEAREST picks."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        rows, cols = rng.integers(1, 2500, 2)
        size = (int(rng.integers(1, 400)), int(rng.integers(1, 400)))
        image = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.NEAREST))
        np.testing.assert_array_equal(_resize_nearest(image, size), expected)


# ------------------------------------------------------------------------------------------------
# one radiograph, many encodings


@pytest.fixture(scope="module")
def radiograph_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RG1_UNCR (real chest CR, MONOCHROME1, 15-bit) shrunk to 1024x1024 and re-encoded many ways."""
    folder = tmp_path_factory.mktemp("variants")
    source = pydicom.dcmread(find("RG1_UNCR.dcm"))
    full = source.pixel_array.astype(np.float32)
    values = (
        np.asarray(Image.fromarray(full).resize((1024, 1024), Image.Resampling.BILINEAR))
        .round()
        .astype(np.uint16)
    )
    base = _base_dataset(1024, 1024, bits=15, photometric="MONOCHROME1")
    base.Modality = "CR"
    base.WindowCenter, base.WindowWidth = 15000, 30000
    variants: dict[str, Path] = {"mono1_window": _native(base, values, folder / "mono1.dcm")}

    mono2 = copy.deepcopy(base)
    mono2.PhotometricInterpretation = "MONOCHROME2"
    mono2.WindowCenter = 32767 - 15000 + 1
    variants["mono2_window"] = _native(mono2, 32767 - values, folder / "mono2.dcm")

    rescaled = copy.deepcopy(base)
    rescaled.BitsStored, rescaled.HighBit = 16, 15
    rescaled.RescaleSlope, rescaled.RescaleIntercept, rescaled.RescaleType = 0.5, -100, "US"
    variants["rescale_16bit"] = _native(rescaled, (values.astype(np.int32) + 100) * 2, folder / "rescale.dcm")

    no_window = copy.deepcopy(base)
    del no_window.WindowCenter, no_window.WindowWidth
    # Without a window the actual range is used: store the windowed values over 0..32767
    window = np.clip((values.astype(np.float64) - 14999.5) / 29999 + 0.5, 0, 1)
    full_range = np.round(window * 32767).astype(np.uint16)
    full_range[0, 0], full_range[0, 1] = 0, 32767
    variants["full_range"] = _native(no_window, full_range, folder / "no_window.dcm")

    display8 = np.round((1 - window) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(display8).save(buffer, format="JPEG", quality=95)
    variants["jpeg_baseline_8bit"] = _jpeg_to_dicom(buffer.getvalue(), 1024, 1024, folder / "jpeg.dcm")

    native = pydicom.dcmread(variants["mono1_window"])
    for name, syntax, plugin in (
        ("jpeg2000_lossless", JPEG2000Lossless, "pylibjpeg"),
        ("jpegls_lossless", JPEGLSLossless, "pyjpegls"),
        ("rle", RLELossless, ""),
    ):
        encoded = copy.deepcopy(native)
        encoded.compress(syntax, encoding_plugin=plugin)
        encoded.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        variants[name] = folder / f"{name}.dcm"
    if shutil.which("dcmconv"):
        for name, flag in (("big_endian", "+tb"), ("deflated", "+td")):
            target = folder / f"{name}.dcm"
            subprocess.run(["dcmconv", flag, str(variants["mono1_window"]), str(target)], check=True)
            variants[name] = target
    return variants


def test_radiograph_encodings_give_the_same_model_input(
    radiograph_variants: dict[str, Path], pool: DecodePool
) -> None:
    """Every encoding of one radiograph yields (almost) the same display-unit model input."""
    reference = pool.read_model_input(radiograph_variants["mono1_window"], DISPLAY_SPEC)
    assert 0.2 < float(reference.mean()) < 0.8
    expected_syntaxes = {"jpeg2000_lossless", "jpegls_lossless", "rle", "jpeg_baseline_8bit"}
    assert expected_syntaxes <= radiograph_variants.keys()
    for name, path in radiograph_variants.items():
        got = pool.read_model_input(path, DISPLAY_SPEC)
        difference = float(np.abs(got - reference).mean())
        assert difference < 0.02, f"{name}: mean abs difference {difference:.4f}"
        if name in {"jpeg2000_lossless", "jpegls_lossless", "rle", "big_endian", "deflated"}:
            assert difference < 0.005, f"{name} is lossless: {difference:.4f}"


def test_display_image_inverts_monochrome1(radiograph_variants: dict[str, Path], pool: DecodePool) -> None:
    """MONOCHROME1 and its MONOCHROME2 twin render alike; lungs (dark) are below the body's mean."""
    mono1 = pool.read_display_image(radiograph_variants["mono1_window"], max_size=512)
    mono2 = pool.read_display_image(radiograph_variants["mono2_window"], max_size=512)
    assert mono1.dtype == np.uint8 and mono1.shape == (512, 512)
    assert float(np.abs(mono1.astype(int) - mono2.astype(int)).mean()) < 1.0
    # MONOCHROME1: high stored values are dark; the brightest stored pixel must render dark
    raw = pydicom.dcmread(radiograph_variants["mono1_window"]).pixel_array
    full = pool.read_display_image(radiograph_variants["mono1_window"])
    assert full[np.unravel_index(raw.argmax(), raw.shape)] < full[np.unravel_index(raw.argmin(), raw.shape)]


@pytest.mark.parametrize("name", ["mono1_window", "jpeg2000_lossless"])
def test_model_input_and_display_from_one_decode(
    radiograph_variants: dict[str, Path], pool: DecodePool, name: str
) -> None:
    """One decode gives exactly the model input and the display image that two separate ones give
    (a "nearest" model needs the full resolution, from which the display image is rendered)."""
    path = radiograph_variants[name]
    model_input, display = pool.read_model_input_and_display(path, KERAS_SPEC, max_size=512)
    assert np.array_equal(model_input, decode_model_input(path, KERAS_SPEC))
    assert display is not None and display.shape == (512, 512)
    if name == "mono1_window":  # a J2K display image alone is decoded at a reduced level
        assert np.array_equal(display, decode_display_image(path, max_size=512))
    else:
        separate = decode_display_image(path, max_size=512).astype(int)
        assert float(np.abs(display.astype(int) - separate).mean()) < 1.0
    # a model input decoded at a reduced level: the display image gets its own decode
    reduced_spec = PreprocessSpec(size=(224, 224), channels=1, interpolation="bilinear")
    model_input, display = decode_model_input_and_display(path, reduced_spec, max_size=512)
    assert np.array_equal(model_input, decode_model_input(path, reduced_spec))
    assert display is not None and np.array_equal(display, decode_display_image(path, max_size=512))


def test_reduced_resolution_jpeg2000_is_faithful_and_used(
    radiograph_variants: dict[str, Path], pool: DecodePool
) -> None:
    """J2K decoded at a lower resolution level matches the full decode within a small tolerance."""
    path = radiograph_variants["jpeg2000_lossless"]
    spec = PreprocessSpec(size=(224, 224), channels=1, interpolation="bilinear")
    reduced = decode_model_input(path, spec)
    full = decode_model_input(path, PreprocessSpec(size=(224, 224), channels=1, reduced_decode=False))
    assert float(np.abs(reduced - full).mean()) < 0.01
    assert float(np.abs(reduced - full).max()) < 0.15
    assert np.array_equal(pool.read_model_input(path, spec), reduced)


def test_reduced_resolution_jpeg_baseline_is_faithful(radiograph_variants: dict[str, Path]) -> None:
    """Baseline JPEG decoded with DCT scaling matches the full decode within a small tolerance."""
    path = radiograph_variants["jpeg_baseline_8bit"]
    spec = PreprocessSpec(size=(128, 128), channels=1, interpolation="area")
    reduced = decode_model_input(path, spec)
    full = decode_model_input(
        path, PreprocessSpec(size=(128, 128), channels=1, interpolation="area", reduced_decode=False)
    )
    assert float(np.abs(reduced - full).mean()) < 0.01


# ------------------------------------------------------------------------------------------------
# value transformations against pydicom's reference implementations


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "vlut_04.dcm", "mlut_18.dcm", "RG1_UNCR.dcm"]
)
def test_luts_match_pydicom(name: str) -> None:
    """Modality LUT + VOI (LUT sequence or first window) equals pydicom's, scaled to [0, 1]."""
    ds = pydicom.dcmread(find(name))
    stored = ds.pixel_array
    values = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        expected = values / ((1 << depth) - 1)
    elif "WindowCenter" in ds:
        signed = ds.PixelRepresentation == 1
        low = -(2 ** (ds.BitsStored - 1)) if signed else 0
        high = 2 ** (ds.BitsStored - 1) - 1 if signed else 2**ds.BitsStored - 1
        if ds.get("ModalityLUTSequence"):
            low, high = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        elif "RescaleSlope" in ds:
            low, high = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (low, high))
        expected = (values - low) / (high - low)
    else:
        expected = (values - values.min()) / (values.max() - values.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1 - expected
    spec = PreprocessSpec(size=(int(ds.Rows), int(ds.Columns)), channels=1)
    got = decode_model_input(find(name), spec)[0, 0]
    np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize(
    ("function", "center", "width"),
    [
        ("LINEAR", 600.0, 800.0),
        ("LINEAR_EXACT", 600.0, 800.0),
        ("SIGMOID", 600.0, 800.0),
        ("LINEAR", 300.5, 1.0),
    ],
)
def test_voi_lut_functions(tmp_path: Path, function: str, center: float, width: float) -> None:
    """LINEAR, LINEAR_EXACT and SIGMOID follow PS3.3 C.11.2.1.2/C.11.2.1.3; only the first window counts."""
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    ds = _base_dataset(64, 64, bits=12)
    ds.WindowCenter = [center, 2000.0]
    ds.WindowWidth = [width, 100.0]
    ds.VOILUTFunction = function
    path = _native(ds, stored, tmp_path / "window.dcm")
    got = decode_model_input(path, PreprocessSpec(size=(64, 64), channels=1))[0, 0].astype(np.float64)
    x = stored.astype(np.float64)
    if function == "LINEAR":
        if width == 1:
            expected = (x > center - 0.5).astype(np.float64)
        else:
            expected = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    elif function == "LINEAR_EXACT":
        expected = np.clip((x - center) / width + 0.5, 0, 1)
    else:
        expected = 1 / (1 + np.exp(-4 * (x - center) / width))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_enhanced_multiframe_uses_per_frame_functional_groups(tmp_path: Path) -> None:
    """Per-frame Pixel Value Transformation and Frame VOI LUT override the top level, frame by frame."""
    frames = np.stack([np.full((8, 8), 100 * (i + 1), dtype=np.uint16) for i in range(3)])
    frames[:, 0, 0] = 0
    ds = _base_dataset(8, 8, bits=12)
    ds.NumberOfFrames = 3
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # to be overridden
    shared = Dataset()
    transformation = Dataset()
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 2, -10, "US"
    shared.PixelValueTransformationSequence = Sequence([transformation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i in range(3):
        item = Dataset()
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = 200.0 * (i + 1), 400.0, "LINEAR_EXACT"
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    path = _native(ds, frames, tmp_path / "enhanced.dcm")

    got = decode_model_input(path, PreprocessSpec(size=(8, 8), channels=1, frames="all"))
    assert got.shape == (3, 1, 8, 8)
    for i in range(3):
        value = 100 * (i + 1) * 2 - 10
        expected = np.clip((value - 200.0 * (i + 1)) / 400.0 + 0.5, 0, 1)
        assert got[i, 0, 4, 4] == pytest.approx(expected, abs=1e-6)
    middle = decode_model_input(path, PreprocessSpec(size=(8, 8), channels=1, frames="middle"))
    np.testing.assert_array_equal(middle[0], got[1])


# ------------------------------------------------------------------------------------------------
# colour


def test_palette_color_becomes_rgb() -> None:
    """PALETTE COLOR renders through its lookup tables to RGB."""
    path = find("OT-PAL-8-face.dcm")
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # the file has no meta information
    expected = np.rint(apply_color_lut(ds.pixel_array, ds).astype(np.float64) / 65535 * 255)
    got = decode_display_image(path)
    assert got.shape == (*ds.pixel_array.shape, 3)
    assert float(np.abs(got - expected).max()) <= 1


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_dcmtk_ebcyn2_dcmd.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_expb.dcm"],
)
def test_colour_encodings_match_the_rgb_original(name: str) -> None:
    """YBR_FULL, YBR_FULL_422 (JPEG), RLE and big-endian colour images all render as SC_rgb.dcm."""
    reference = decode_display_image(find("SC_rgb.dcm")).astype(int)
    got = decode_display_image(find(name)).astype(int)
    assert got.shape == reference.shape == (100, 100, 3)
    assert float(np.abs(got - reference).mean()) < 3


def test_rgb_to_one_channel_uses_luminance() -> None:
    """An RGB image for a one-channel model becomes ITU-R 601 luminance (Pillow's convert('L'))."""
    rgb = decode_display_image(find("SC_rgb.dcm"))
    expected = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    spec = PreprocessSpec(size=(100, 100), channels=1, quantize_8bit=True)
    got = decode_model_input(find("SC_rgb.dcm"), spec)[0, 0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# untrusted input


def _crafted_j2k(path: Path) -> Path:
    """A 36-byte JPEG 2000 'JP2' stream whose second box has length 0: pydicom 3.0.2 spins on it."""
    codestream = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00ftyp" + b"\x00" * 16
    assert len(codestream) == 36
    ds = _base_dataset(16, 16, bits=8)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    return path


def test_crafted_jpeg2000_times_out_and_the_pool_recovers(tmp_path: Path, pool: DecodePool) -> None:
    """A decoder that never returns is killed at the deadline; the next image decodes normally."""
    path = _crafted_j2k(tmp_path / "crafted.dcm")
    spec = PreprocessSpec(size=(16, 16), channels=1, interpolation="nearest")
    pool.read_model_input(find("CT_small.dcm"), spec)  # the worker is up: time only the decode
    started = time.monotonic()
    with pytest.raises(DecodeTimeoutError) as caught:
        pool.read_model_input(path, spec, timeout_s=2.0)
    assert time.monotonic() - started < 10
    assert "Doe" not in str(caught.value)
    again = pool.read_model_input(find("CT_small.dcm"), spec, timeout_s=30.0)
    assert again.shape == (1, 1, 16, 16)


def test_malformed_files_raise_invalid_dataset_without_patient_data(tmp_path: Path, pool: DecodePool) -> None:
    """Truncated pixel data, non-DICOM bytes and files without pixels raise InvalidDatasetError."""
    ds = _base_dataset(64, 64, bits=16)
    truncated = tmp_path / "truncated.dcm"
    ds.PixelData = b"\x00" * 1000
    ds["PixelData"].VR = "OW"
    ds.save_as(truncated, enforce_file_format=True)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    spec = PreprocessSpec(size=(32, 32), channels=1)
    for path in (truncated, junk, find("rtplan.dcm"), find("JPEG2000-embedded-sequence-delimiter.dcm")):
        with pytest.raises(InvalidDatasetError) as caught:
            pool.read_model_input(path, spec)
        message = str(caught.value)
        assert "Doe" not in message and "PID-SECRET" not in message
    with pytest.raises(InvalidDatasetError):
        decode_model_input(truncated, spec)


def test_read_header_and_one_shot_read(tmp_path: Path) -> None:
    """read_header skips pixel data; read_model_input without a pool uses a one-shot child process."""
    header = read_header(find("CT_small.dcm"))
    assert "PixelData" not in header and header.Rows == 128
    got = read_model_input(
        find("CT_small.dcm"), PreprocessSpec(size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    )
    direct = decode_model_input(find("CT_small.dcm"), PreprocessSpec(size=(32, 32), channels=3))
    np.testing.assert_allclose(got, (direct - 0.5) / 0.25, atol=1e-5)
