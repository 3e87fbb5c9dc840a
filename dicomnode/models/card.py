"""Model cards: the ``model.toml`` of a model package, parsed into a validated, frozen object.

A model card says what the network is (architecture, weights file, outputs), how its input must be
prepared (:class:`~dicomnode.imaging.PreprocessSpec`), what each output means (coded labels and
operating points) and where the model comes from (training data, intended use, limitations,
licence). It is read without torch so that listing models stays cheap. Every validation error is a
:class:`~dicomnode.errors.ConfigurationError` naming the offending key, e.g. ``labels[0].code``.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args

from dicomnode._toml import Table
from dicomnode.errors import ConfigurationError
from dicomnode.findings import CodedConcept, ModelIdentity
from dicomnode.fsio import durable_write
from dicomnode.imaging.spec import FrameSelection, Interpolation, PreprocessSpec

Task = Literal["image-classification", "series-classification"]
Architecture = Literal["xception", "densenet121", "torchscript"]
OutputActivation = Literal["softmax", "sigmoid"]
OodKind = Literal["feature-distance", "autoencoder"]

CARD_FILE_NAME = "model.toml"
# Namespace of the Device Observer UIDs: uuid5(NAMESPACE_URL, "https://github.com/dicomnode/model").
DEVICE_OBSERVER_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/dicomnode/model")

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


@dataclass(frozen=True)
class ModelCard:
    """A validated model card (``model.toml``)."""

    name: str
    version: str
    display_name: str
    task: Task
    architecture: Architecture
    architecture_parameters: Mapping[str, int | float | str]
    weights: str  # file name relative to the package folder
    output_activation: OutputActivation
    labels: tuple[LabelSpec, ...]
    preprocessing: PreprocessSpec
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    manufacturer: str = "dicomnode"
    trained_by: str = ""
    training_data: str = ""
    intended_use: str = ""
    limitations: str = ""
    licence: str = ""
    not_for_clinical_use: bool = True
    performance: Performance = field(default_factory=Performance)
    ood: OodSpec | None = None

    @property
    def num_classes(self) -> int:
        """Width of the network output."""
        return int(self.architecture_parameters["num_classes"])

    @property
    def in_channels(self) -> int:
        """Channels of the network input (equals ``preprocessing.channels``)."""
        return self.preprocessing.channels

    @property
    def device_observer_uid(self) -> str:
        """Stable DICOM Device Observer UID of this (name, version): a 2.25 UID from uuid5."""
        return device_observer_uid(self.name, self.version)

    @property
    def identity(self) -> ModelIdentity:
        """What the SR's algorithm identification needs."""
        return ModelIdentity(
            name=self.name,
            version=self.version,
            display_name=self.display_name,
            manufacturer=self.manufacturer,
            device_observer_uid=self.device_observer_uid,
            not_for_clinical_use=self.not_for_clinical_use,
        )

    @classmethod
    def from_toml(cls, text: str) -> ModelCard:
        """Parse and validate the text of a ``model.toml``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError("model.toml", f"not valid TOML: {exc}") from exc
        return parse_card(data)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Read, parse and validate a ``model.toml`` file."""
        return cls.from_toml(Path(path).read_text(encoding="utf-8"))


def device_observer_uid(name: str, version: str) -> str:
    """The 2.25 UID of uuid5(namespace, "name/version"): the same on every node, new per version.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy (it returns a
    random UUID), so the 2.25 form is computed here.
    """
    return f"2.25.{uuid.uuid5(DEVICE_OBSERVER_NAMESPACE, f'{name}/{version}').int}"


# --- the card -------------------------------------------------------------------------------------

_TOP_KEYS = {
    "name", "version", "display_name", "task", "architecture", "architecture_parameters", "weights",
    "output_activation", "labels", "preprocessing", "applies_to", "card", "manufacturer", "ood",
}  # fmt: skip
_CARD_KEYS = {
    "trained_by", "training_data", "intended_use", "limitations", "licence", "not_for_clinical_use",
    "performance",
}  # fmt: skip


def parse_card(data: Mapping[str, Any]) -> ModelCard:
    """Validate the decoded TOML of a model card; errors name the offending key."""
    top = Table(data)
    top.check_keys(_TOP_KEYS)
    name = top.string("name", nonempty=True)
    if any(c in name for c in "/\\\0") or name in (".", ".."):
        raise top.error("name", "must not contain path separators")
    version = top.string("version", nonempty=True)
    task = cast(Task, top.choice("task", get_args(Task), "image-classification"))
    architecture = cast(Architecture, top.choice("architecture", get_args(Architecture)))
    weights = top.string("weights", nonempty=True)
    if Path(weights).is_absolute() or ".." in Path(weights).parts:
        raise top.error("weights", "must be a file name inside the package folder")
    activation = cast(OutputActivation, top.choice("output_activation", get_args(OutputActivation)))

    parameters = _architecture_parameters(top.table("architecture_parameters", required=True), architecture)
    preprocessing = _preprocessing(top.table("preprocessing", required=True))
    if preprocessing.channels != parameters["in_channels"]:
        raise ConfigurationError("preprocessing.channels", "must equal architecture_parameters.in_channels")
    labels = _labels(data.get("labels"), int(parameters["num_classes"]))
    applies = _applies_to(top.table("applies_to"))
    card = top.table("card")
    card.check_keys(_CARD_KEYS)

    return ModelCard(
        name=name,
        version=version,
        display_name=top.string("display_name", name),
        task=task,
        architecture=architecture,
        architecture_parameters=parameters,
        weights=weights,
        output_activation=activation,
        labels=labels,
        preprocessing=preprocessing,
        applies_to=applies,
        manufacturer=top.string("manufacturer", "dicomnode"),
        trained_by=card.string("trained_by", ""),
        training_data=card.string("training_data", ""),
        intended_use=card.string("intended_use", ""),
        limitations=card.string("limitations", ""),
        licence=card.string("licence", ""),
        not_for_clinical_use=card.boolean("not_for_clinical_use", True),
        performance=_performance(card.table("performance")),
        ood=_ood(top.table("ood")) if "ood" in top else None,
    )


def _applies_to(table: Table) -> AppliesTo:
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


def _ood(table: Table) -> OodSpec:
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


def _architecture_parameters(table: Table, architecture: str) -> dict[str, int | float | str]:
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


def _preprocessing(table: Table) -> PreprocessSpec:
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


def _labels(value: Any, num_classes: int) -> tuple[LabelSpec, ...]:
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


def _performance(table: Table) -> Performance:
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


def set_label_threshold(card_path: Path, label: str, threshold: float, note: str) -> ModelCard:
    """Rewrite one label's ``threshold`` in a model.toml in place, keeping everything else as written.

    The change is validated by parsing the new text before it replaces the file; ``note`` becomes a
    comment above the line so the card says where the operating point came from.
    """
    lines = card_path.read_text(encoding="utf-8").splitlines()
    in_label = False
    block_start = -1
    target: int | None = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            if in_label and target is not None:
                break
            in_label = stripped == "[[labels]]"
            block_start = index
            target = None
            continue
        if in_label and stripped.replace(" ", "") == f'name="{label}"':
            target = block_start
    if target is None:
        raise ConfigurationError("labels", f"model card {card_path} has no label named {label!r}")
    end = next((i for i in range(target + 1, len(lines)) if lines[i].strip().startswith("[")), len(lines))
    block = [
        line
        for line in lines[target + 1 : end]
        if not line.strip().startswith("threshold") and not line.strip().startswith("# threshold:")
    ]
    block.insert(0, f"# threshold: {note}")
    block.insert(1, f"threshold = {threshold:.6g}")
    new_text = "\n".join([*lines[: target + 1], *block, *lines[end:]]) + "\n"
    card = ModelCard.from_toml(new_text)
    durable_write(card_path, new_text.encode("utf-8"))
    return card


def set_ood_section(card_path: Path, spec: OodSpec) -> ModelCard:
    """Replace (or add) the ``[ood]`` table of a model.toml, keeping everything else as written.

    The table goes at the end of the file (a top-level table may follow any other); the new text is
    validated by parsing it before it replaces the file.
    """
    lines = card_path.read_text(encoding="utf-8").rstrip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "[ood]"), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("[")), len(lines))
        while start > 0 and lines[start - 1].startswith("# ood:"):
            start -= 1
        lines = lines[:start] + lines[end:]
    while lines and not lines[-1].strip():
        lines.pop()
    fields_ = [
        ("kind", spec.kind),
        ("threshold", spec.threshold),
        ("file", spec.file),
        ("fitted_on", spec.fitted_on),
        ("reference_images", spec.reference_images),
        ("augmentation", spec.augmentation),
        ("evidence", spec.evidence),
    ]
    block = ["", "# ood: written by `dicomnode ood fit` (docs/models.md, out-of-distribution gate)", "[ood]"]
    for key, value in fields_:
        if isinstance(value, str):
            block.append(f"{key} = {_toml_string(value)}")
        elif isinstance(value, float):
            block.append(f"{key} = {value!r}")  # the shortest text that reads back as the same float
        else:
            block.append(f"{key} = {value}")
    new_text = "\n".join([*lines, *block]) + "\n"
    card = ModelCard.from_toml(new_text)
    durable_write(card_path, new_text.encode("utf-8"))
    return card


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    import json

    return json.dumps(value, ensure_ascii=False)
