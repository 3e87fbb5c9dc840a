"""What a model card says about its input: size, channels, interpolation, scaling, frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

Interpolation = Literal["nearest", "bilinear", "bicubic", "area"]
FrameSelection = Literal["first", "middle", "all"]
_PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


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


def validate_spec(spec: PreprocessSpec) -> None:
    if spec.channels not in (1, 3):
        raise ValueError(f"PreprocessSpec.channels must be 1 or 3, not {spec.channels}")
    if len(spec.size) != 2 or min(spec.size) < 1:
        raise ValueError(f"PreprocessSpec.size must be two positive integers, not {spec.size}")
    if spec.interpolation not in _PIL_FILTERS:
        raise ValueError(f"PreprocessSpec.interpolation {spec.interpolation!r} is not supported")
