"""Decode benchmark: ms per stage for a 2048x2048 16-bit radiograph, full vs reduced-resolution decode.

Builds its inputs from RG1_UNCR.dcm (pydicom-data; a real chest CR) upscaled to 2048x2048, stored
uncompressed and as JPEG 2000 lossless, then times read+decode, LUT/window and resize for a
224x224 bilinear model input. Ratios within one run are what to compare, never absolute times
across machines.

    python benchmarks/decode.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from dicomnode.imaging.frames import _decode_frames
from dicomnode.imaging.preprocess import _need_for, _resize
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.imaging.transforms import _display_transform
from dicomnode.sandbox import DecodePool


def _source() -> Path:
    import data_store  # from the pydicom-data package

    return Path(next(iter(data_store.__path__))) / "data" / "RG1_UNCR.dcm"


def _make_inputs(folder: Path) -> dict[str, Path]:
    ds = pydicom.dcmread(_source())
    values = np.asarray(Image.fromarray(ds.pixel_array.astype(np.float32)).resize((2048, 2048)))
    big = np.clip(values.round(), 0, 65535).astype(np.uint16)
    ds.Rows = ds.Columns = 2048
    ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelData = big.tobytes()
    paths = {"uncompressed": folder / "uncompressed.dcm", "jpeg2000": folder / "j2k.dcm"}
    ds.save_as(paths["uncompressed"], enforce_file_format=True)
    j2k = copy.deepcopy(ds)
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    j2k.save_as(paths["jpeg2000"], enforce_file_format=True)
    return paths


def _median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _stages(path: Path, spec: PreprocessSpec, repeat: int) -> dict[str, float]:
    need = _need_for(spec)
    frames = _decode_frames(path, spec.frames, need)
    frame = frames[0]
    transform = _display_transform(frame)
    display = transform(frame.values)
    return {
        "read+decode": _median_ms(lambda: _decode_frames(path, spec.frames, need), repeat),
        "lut/window": _median_ms(lambda: _display_transform(frame)(frame.values), repeat),
        "resize": _median_ms(lambda: _resize(display, spec.size, spec.interpolation), repeat),
        "decoded_rows": float(frame.values.shape[0]),
    }


def main() -> None:
    """Print the per-stage table and the reduced/full speed-up."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    full_spec = PreprocessSpec(size=(224, 224), channels=1, interpolation="bilinear", reduced_decode=False)
    reduced_spec = PreprocessSpec(size=(224, 224), channels=1, interpolation="bilinear")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _make_inputs(Path(tmp))
        rows = [
            ("uncompressed, full", paths["uncompressed"], full_spec),
            ("jpeg2000, full", paths["jpeg2000"], full_spec),
            ("jpeg2000, reduced", paths["jpeg2000"], reduced_spec),
        ]
        print(
            f"{'input':22s} {'decoded':>8s} {'read+decode':>12s} "
            f"{'lut/window':>11s} {'resize':>8s} {'total':>8s}"
        )
        totals: dict[str, float] = {}
        for label, path, spec in rows:
            stages = _stages(path, spec, args.repeat)
            total = stages["read+decode"] + stages["lut/window"] + stages["resize"]
            totals[label] = total
            print(
                f"{label:22s} {int(stages['decoded_rows']):>8d} {stages['read+decode']:>10.1f}ms "
                f"{stages['lut/window']:>9.1f}ms {stages['resize']:>6.1f}ms {total:>6.1f}ms"
            )
        print(
            "reduced-resolution speed-up (jpeg2000): "
            f"{totals['jpeg2000, full'] / totals['jpeg2000, reduced']:.1f}x"
        )
        with DecodePool(1) as pool:
            pool.read_model_input(paths["uncompressed"], full_spec)  # start the worker
            pooled = _median_ms(lambda: pool.read_model_input(paths["uncompressed"], full_spec), args.repeat)
            in_process = _median_ms(
                lambda: pool.read_model_input(paths["jpeg2000"], reduced_spec), args.repeat
            )
        print(
            f"through DecodePool (end to end): uncompressed {pooled:.1f} ms, "
            f"jpeg2000 reduced {in_process:.1f} ms"
        )


if __name__ == "__main__":
    main()
