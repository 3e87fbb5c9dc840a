"""The sections of a model card: their frozen dataclasses and the readers that validate them.

``[applies_to]``, ``[[labels]]``, ``[architecture_parameters]``, ``[preprocessing]``, ``[ood]`` and
``[card.performance]``; :func:`dicomnode.models.card.parse_card` reads the card's top level and calls
these. Every error names the offending key, e.g. ``labels[0].code``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args

from dicomnode._toml import Table
from dicomnode.errors import ConfigurationError
from dicomnode.findings import CodedConcept
from dicomnode.imaging.spec import FrameSelection, Interpolation, PreprocessSpec

OodKind = Literal["feature-distance", "autoencoder"]

# Architecture parameters each architecture accepts (name -> type); everything else is refused.
_ARCHITECTURE_PARAMETERS: dict[str, dict[str, type]] = {
    "xception": {"num_classes": int, "in_channels": int, "hidden_units": int, "dropout": float},
    "densenet121": {"num_classes": int, "in_channels": int, "dropout": float, "key_layout": str},
    "torchscript": {"num_classes": int, "in_channels": int},
}
DENSENET_KEY_LAYOUTS = ("monai", "torchvision", "torchxrayvision")


@dataclass(frozen=True)
class LabelSpec:
    """One output of the model that becomes a finding: its code, output index and operating point."""

    name: str  # machine name, e.g. "pneumonia"
    display_name: str  # e.g. "Pneumonia"
    concept: CodedConcept  # e.g. SCT 233604007 "Pneumonia"
    threshold: float  # probability >= threshold means "present"
    output_index: int  # column of the network output holding this label


@dataclass(frozen=True)
class AppliesTo:
    """The images the model was made for. Routes select by modality and body part; the worker
    enforces the intended population (``views``, ``patient_age_years``) from each image's header
    (:mod:`dicomnode.work.intended`): an image outside it gets no finding."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()  # ViewPosition values (e.g. "PA", "AP"); empty: any view
    patient_age_years: tuple[float, float] | None = None  # (min, max) inclusive; None: any age


@dataclass(frozen=True)
class Measurement:
    """One measured performance number, with where it was measured and by whom."""

    metric: str  # e.g. "accuracy", "auc", "sensitivity"
    value: float
    dataset: str  # what it was measured on
    source: str  # who measured it (e.g. "reported by pneumonia_model_package", "dicomnode")
    n: int | None = None  # number of cases, when known


@dataclass(frozen=True)
class Performance:
    """Free-text performance statement plus a table of measured numbers."""

    summary: str = ""
    measurements: tuple[Measurement, ...] = ()


@dataclass(frozen=True)
class OodSpec:
    """The card's ``[ood]``: the out-of-distribution gate (see :mod:`dicomnode.models.ood`)."""

    kind: OodKind
    threshold: float  # a score above it refuses the image (no finding)
    file: str  # the gate's parameters, relative to the package folder
    fitted_on: str  # what the reference images were, in words
    reference_images: int  # how many distinct images the gate was fitted on (before augmentation)
    augmentation: str = ""  # how the reference images were augmented, if at all
    evidence: str = ""  # what the gate was measured to accept and refuse (AUROC, set size)


def read_applies_to(table: Table) -> AppliesTo:
    """``[applies_to]``; ``patient_age_years = [min, max]`` in (fractional) years, min <= max."""
    table.check_keys({"modalities", "body_parts", "views", "patient_age_years"})
    ages = table.numbers("patient_age_years", (2,))
    if ages is not None and not 0.0 <= ages[0] <= ages[1] <= 150.0:
        raise table.error(
            "patient_age_years", f"must be [min, max] with 0 <= min <= max <= 150; got {list(ages)}"
        )
    return AppliesTo(
        modalities=table.strings("modalities"),
        body_parts=table.strings("body_parts"),
        views=tuple(v.strip().upper() for v in table.strings("views")),
        patient_age_years=None if ages is None else (ages[0], ages[1]),
    )


def read_ood(table: Table) -> OodSpec:
    table.check_keys(
        {"kind", "threshold", "file", "fitted_on", "reference_images", "augmentation", "evidence"}
    )
    file = table.string("file", nonempty=True)
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise table.error("file", "must be a file name inside the package folder")
    return OodSpec(
        kind=cast(OodKind, table.choice("kind", get_args(OodKind))),
        threshold=table.number("threshold", low=0.0),
        file=file,
        fitted_on=table.string("fitted_on", nonempty=True),
        reference_images=table.integer("reference_images", low=1),
        augmentation=table.string("augmentation", ""),
        evidence=table.string("evidence", ""),
    )


def read_architecture_parameters(table: Table, architecture: str) -> dict[str, int | float | str]:
    table.check_keys(set(_ARCHITECTURE_PARAMETERS[architecture]))
    result: dict[str, int | float | str] = {
        "num_classes": table.integer("num_classes", low=1),
        "in_channels": table.integer("in_channels", low=1),
    }
    if architecture == "xception":
        result["hidden_units"] = table.integer("hidden_units", 0, low=0)
        result["dropout"] = table.number("dropout", 0.0)
    elif architecture == "densenet121":
        result["dropout"] = table.number("dropout", 0.0)
        result["key_layout"] = table.choice("key_layout", DENSENET_KEY_LAYOUTS, "monai")
    if "dropout" in result and not 0.0 <= float(result["dropout"]) < 1.0:
        raise table.error("dropout", "must be in [0, 1)")
    return result


_OPTIONAL_PREPROCESS_KEYS = {f.name for f in fields(PreprocessSpec)} & {
    "reduced_decode",
    "reduced_decode_margin",
}


def read_preprocessing(table: Table) -> PreprocessSpec:
    table.check_keys(
        {"size", "channels", "interpolation", "scale", "offset", "mean", "std", "quantize_8bit", "frames"}
        | _OPTIONAL_PREPROCESS_KEYS
    )
    size = table.data.get("size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise table.error("size", "must be [rows, columns], two positive integers")
    channels = table.integer("channels", 3, low=1)
    if channels not in (1, 3):
        raise table.error("channels", "must be 1 or 3")
    mean = table.numbers("mean", (1, channels))
    std = table.numbers("std", (1, channels))
    if (mean is None) != (std is None):
        raise table.error("std" if std is None else "mean", "mean and std go together")
    if std is not None and any(s <= 0 for s in std):
        raise table.error("std", "must be positive")
    scale = table.number("scale", 1.0)
    if scale == 0:
        raise table.error("scale", "must not be zero")
    # Decoder tuning the imaging stage offers (reduced-resolution decode); passed only when given.
    extra: dict[str, Any] = {}
    if "reduced_decode" in table:
        extra["reduced_decode"] = table.boolean("reduced_decode", True)
    if "reduced_decode_margin" in table:
        extra["reduced_decode_margin"] = table.number("reduced_decode_margin", low=1.0)
    return PreprocessSpec(
        **extra,
        size=(size[0], size[1]),
        channels=channels,
        interpolation=cast(Interpolation, table.choice("interpolation", get_args(Interpolation), "bilinear")),
        scale=scale,
        offset=table.number("offset", 0.0),
        mean=mean,
        std=std,
        quantize_8bit=table.boolean("quantize_8bit", False),
        frames=cast(FrameSelection, table.choice("frames", get_args(FrameSelection), "first")),
    )


def read_labels(value: Any, num_classes: int) -> tuple[LabelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigurationError("labels", "at least one [[labels]] table is required")
    labels: list[LabelSpec] = []
    for i, raw in enumerate(value):
        item = Table.of(raw, f"labels[{i}]")
        item.check_keys({"name", "display_name", "code", "code_meaning", "threshold", "output_index"})
        name = item.string("name", nonempty=True)
        try:
            concept = CodedConcept.parse(item.string("code"), item.string("code_meaning", nonempty=True))
        except ValueError as exc:
            raise item.error("code", str(exc)) from exc
        threshold = item.number("threshold", 0.5, low=0.0, high=1.0)
        output_index = item.integer("output_index", low=0)
        if output_index >= num_classes:
            raise item.error("output_index", f"{output_index} is outside the {num_classes} network outputs")
        if any(existing.name == name for existing in labels):
            raise item.error("name", f"duplicate label {name!r}")
        labels.append(
            LabelSpec(
                name=name,
                display_name=item.string("display_name", name),
                concept=concept,
                threshold=threshold,
                output_index=output_index,
            )
        )
    return tuple(labels)


def read_performance(table: Table) -> Performance:
    table.check_keys({"summary", "measurements"})
    raw = table.data.get("measurements", [])
    if not isinstance(raw, list):
        raise table.error("measurements", "must be an array of tables")
    measurements: list[Measurement] = []
    for i, value in enumerate(raw):
        item = Table.of(value, table.key(f"measurements[{i}]"))
        item.check_keys({"metric", "value", "dataset", "source", "n"})
        measurements.append(
            Measurement(
                metric=item.string("metric", nonempty=True),
                value=item.number("value"),
                dataset=item.string("dataset", ""),
                source=item.string("source", ""),
                n=None if item.data.get("n") is None else item.integer("n", low=1),
            )
        )
    return Performance(summary=table.string("summary", ""), measurements=tuple(measurements))
