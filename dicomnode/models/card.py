"""Model cards: the ``model.toml`` of a model package, parsed into a validated, frozen object.

A model card says what the network is (architecture, weights file, outputs), how its input must be
prepared (:class:`~dicomnode.imaging.PreprocessSpec`), what each output means (coded labels and
operating points) and where the model comes from (training data, intended use, limitations,
licence). It is read without torch so that listing models stays cheap. Every validation error is a
:class:`~dicomnode.errors.ConfigurationError` naming the offending key, e.g. ``labels[0].code``.
"""

from __future__ import annotations

import math
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args

from dicomnode.errors import ConfigurationError
from dicomnode.findings import CodedConcept, ModelIdentity
from dicomnode.fsio import durable_write
from dicomnode.imaging.spec import FrameSelection, Interpolation, PreprocessSpec

Task = Literal["image-classification", "series-classification"]
Architecture = Literal["xception", "densenet121", "torchscript"]
OutputActivation = Literal["softmax", "sigmoid"]

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
    """Informational: the images the model was made for (not enforced by the runner)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()


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


# --- parsing helpers ------------------------------------------------------------------------------


def _check_keys(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigurationError(
                _join(prefix, key), f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _str(table: Mapping[str, Any], key: str, prefix: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigurationError(_join(prefix, key), "is required")
    if not isinstance(value, str):
        raise ConfigurationError(_join(prefix, key), f"must be a string, not {type(value).__name__}")
    return value


def _nonempty(table: Mapping[str, Any], key: str, prefix: str) -> str:
    value = _str(table, key, prefix)
    if not value.strip():
        raise ConfigurationError(_join(prefix, key), "must not be empty")
    return value


def _choice(
    table: Mapping[str, Any], key: str, prefix: str, choices: tuple[str, ...], default: str | None = None
) -> str:
    value = _str(table, key, prefix, default)
    if value not in choices:
        raise ConfigurationError(_join(prefix, key), f"{value!r} is not one of {', '.join(choices)}")
    return value


def _float(table: Mapping[str, Any], key: str, prefix: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if value is None:
        raise ConfigurationError(_join(prefix, key), "is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(_join(prefix, key), "must be a finite number")
    return float(value)


def _int(
    table: Mapping[str, Any], key: str, prefix: str, default: int | None = None, minimum: int = 0
) -> int:
    value = table.get(key, default)
    if value is None:
        raise ConfigurationError(_join(prefix, key), "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(_join(prefix, key), "must be an integer")
    if value < minimum:
        raise ConfigurationError(_join(prefix, key), f"must be >= {minimum}")
    return value


def _bool(table: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(_join(prefix, key), "must be true or false")
    return value


def _table(table: Mapping[str, Any], key: str, prefix: str, required: bool = False) -> Mapping[str, Any]:
    value = table.get(key)
    if value is None:
        if required:
            raise ConfigurationError(_join(prefix, key), "is required")
        return {}
    if not isinstance(value, dict):
        raise ConfigurationError(_join(prefix, key), "must be a table")
    return cast(Mapping[str, Any], value)


def _str_tuple(table: Mapping[str, Any], key: str, prefix: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(_join(prefix, key), "must be a list of strings")
    return tuple(value)


def _float_tuple(table: Mapping[str, Any], key: str, prefix: str, length: int) -> tuple[float, ...] | None:
    value = table.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or len(value) not in (1, length)
    ):
        raise ConfigurationError(_join(prefix, key), f"must be a list of 1 or {length} numbers")
    return tuple(float(v) for v in value)


# --- the card -------------------------------------------------------------------------------------

_TOP_KEYS = {
    "name", "version", "display_name", "task", "architecture", "architecture_parameters", "weights",
    "output_activation", "labels", "preprocessing", "applies_to", "card", "manufacturer",
}  # fmt: skip
_CARD_KEYS = {
    "trained_by", "training_data", "intended_use", "limitations", "licence", "not_for_clinical_use",
    "performance",
}  # fmt: skip


def parse_card(data: Mapping[str, Any]) -> ModelCard:
    """Validate the decoded TOML of a model card; errors name the offending key."""
    _check_keys(data, _TOP_KEYS, "")
    name = _nonempty(data, "name", "")
    if any(c in name for c in "/\\\0") or name in (".", ".."):
        raise ConfigurationError("name", "must not contain path separators")
    version = _nonempty(data, "version", "")
    task = cast(Task, _choice(data, "task", "", get_args(Task), "image-classification"))
    architecture = cast(Architecture, _choice(data, "architecture", "", get_args(Architecture)))
    weights = _nonempty(data, "weights", "")
    if Path(weights).is_absolute() or ".." in Path(weights).parts:
        raise ConfigurationError("weights", "must be a file name inside the package folder")
    activation = cast(OutputActivation, _choice(data, "output_activation", "", get_args(OutputActivation)))

    parameters = _architecture_parameters(
        _table(data, "architecture_parameters", "", required=True), architecture
    )
    preprocessing = _preprocessing(_table(data, "preprocessing", "", required=True))
    if preprocessing.channels != parameters["in_channels"]:
        raise ConfigurationError("preprocessing.channels", "must equal architecture_parameters.in_channels")
    labels = _labels(data.get("labels"), int(parameters["num_classes"]))
    applies = _table(data, "applies_to", "")
    _check_keys(applies, {"modalities", "body_parts", "views"}, "applies_to")
    card = _table(data, "card", "")
    _check_keys(card, _CARD_KEYS, "card")

    return ModelCard(
        name=name,
        version=version,
        display_name=_str(data, "display_name", "", name),
        task=task,
        architecture=architecture,
        architecture_parameters=parameters,
        weights=weights,
        output_activation=activation,
        labels=labels,
        preprocessing=preprocessing,
        applies_to=AppliesTo(
            modalities=_str_tuple(applies, "modalities", "applies_to"),
            body_parts=_str_tuple(applies, "body_parts", "applies_to"),
            views=_str_tuple(applies, "views", "applies_to"),
        ),
        manufacturer=_str(data, "manufacturer", "", "dicomnode"),
        trained_by=_str(card, "trained_by", "card", ""),
        training_data=_str(card, "training_data", "card", ""),
        intended_use=_str(card, "intended_use", "card", ""),
        limitations=_str(card, "limitations", "card", ""),
        licence=_str(card, "licence", "card", ""),
        not_for_clinical_use=_bool(card, "not_for_clinical_use", "card", True),
        performance=_performance(_table(card, "performance", "card")),
    )


def _architecture_parameters(table: Mapping[str, Any], architecture: str) -> dict[str, int | float | str]:
    prefix = "architecture_parameters"
    allowed = _ARCHITECTURE_PARAMETERS[architecture]
    _check_keys(table, set(allowed), prefix)
    result: dict[str, int | float | str] = {
        "num_classes": _int(table, "num_classes", prefix, minimum=1),
        "in_channels": _int(table, "in_channels", prefix, minimum=1),
    }
    if architecture == "xception":
        result["hidden_units"] = _int(table, "hidden_units", prefix, default=0)
        result["dropout"] = _float(table, "dropout", prefix, default=0.0)
    elif architecture == "densenet121":
        result["dropout"] = _float(table, "dropout", prefix, default=0.0)
        result["key_layout"] = _choice(table, "key_layout", prefix, DENSENET_KEY_LAYOUTS, "monai")
    if "dropout" in result and not 0.0 <= float(result["dropout"]) < 1.0:
        raise ConfigurationError(f"{prefix}.dropout", "must be in [0, 1)")
    return result


_OPTIONAL_PREPROCESS_KEYS = {f.name for f in fields(PreprocessSpec)} & {
    "reduced_decode",
    "reduced_decode_margin",
}


def _preprocessing(table: Mapping[str, Any]) -> PreprocessSpec:
    prefix = "preprocessing"
    _check_keys(
        table,
        {"size", "channels", "interpolation", "scale", "offset", "mean", "std", "quantize_8bit", "frames"}
        | _OPTIONAL_PREPROCESS_KEYS,
        prefix,
    )
    size = table.get("size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ConfigurationError(f"{prefix}.size", "must be [rows, columns], two positive integers")
    channels = _int(table, "channels", prefix, default=3, minimum=1)
    if channels not in (1, 3):
        raise ConfigurationError(f"{prefix}.channels", "must be 1 or 3")
    mean = _float_tuple(table, "mean", prefix, channels)
    std = _float_tuple(table, "std", prefix, channels)
    if (mean is None) != (std is None):
        raise ConfigurationError(
            f"{prefix}.std" if std is None else f"{prefix}.mean", "mean and std go together"
        )
    if std is not None and any(s <= 0 for s in std):
        raise ConfigurationError(f"{prefix}.std", "must be positive")
    scale = _float(table, "scale", prefix, 1.0)
    if scale == 0:
        raise ConfigurationError(f"{prefix}.scale", "must not be zero")
    # Decoder tuning the imaging stage offers (reduced-resolution decode); passed only when given.
    extra: dict[str, Any] = {}
    if "reduced_decode" in table:
        extra["reduced_decode"] = _bool(table, "reduced_decode", prefix, True)
    if "reduced_decode_margin" in table:
        extra["reduced_decode_margin"] = _float(table, "reduced_decode_margin", prefix)
        if extra["reduced_decode_margin"] < 1.0:
            raise ConfigurationError(f"{prefix}.reduced_decode_margin", "must be >= 1")
    return PreprocessSpec(
        **extra,
        size=(size[0], size[1]),
        channels=channels,
        interpolation=cast(
            Interpolation, _choice(table, "interpolation", prefix, get_args(Interpolation), "bilinear")
        ),
        scale=scale,
        offset=_float(table, "offset", prefix, 0.0),
        mean=mean,
        std=std,
        quantize_8bit=_bool(table, "quantize_8bit", prefix, False),
        frames=cast(FrameSelection, _choice(table, "frames", prefix, get_args(FrameSelection), "first")),
    )


def _labels(value: Any, num_classes: int) -> tuple[LabelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigurationError("labels", "at least one [[labels]] table is required")
    labels: list[LabelSpec] = []
    for i, item in enumerate(value):
        prefix = f"labels[{i}]"
        if not isinstance(item, dict):
            raise ConfigurationError(prefix, "must be a table")
        _check_keys(
            item, {"name", "display_name", "code", "code_meaning", "threshold", "output_index"}, prefix
        )
        name = _nonempty(item, "name", prefix)
        try:
            concept = CodedConcept.parse(_str(item, "code", prefix), _nonempty(item, "code_meaning", prefix))
        except ValueError as exc:
            raise ConfigurationError(f"{prefix}.code", str(exc)) from exc
        threshold = _float(item, "threshold", prefix, 0.5)
        if not 0.0 <= threshold <= 1.0:
            raise ConfigurationError(f"{prefix}.threshold", "must be in [0, 1]")
        output_index = _int(item, "output_index", prefix)
        if output_index >= num_classes:
            raise ConfigurationError(
                f"{prefix}.output_index", f"{output_index} is outside the {num_classes} network outputs"
            )
        if any(existing.name == name for existing in labels):
            raise ConfigurationError(f"{prefix}.name", f"duplicate label {name!r}")
        labels.append(
            LabelSpec(
                name=name,
                display_name=_str(item, "display_name", prefix, name),
                concept=concept,
                threshold=threshold,
                output_index=output_index,
            )
        )
    return tuple(labels)


def _performance(table: Mapping[str, Any]) -> Performance:
    prefix = "card.performance"
    _check_keys(table, {"summary", "measurements"}, prefix)
    raw = table.get("measurements", [])
    if not isinstance(raw, list):
        raise ConfigurationError(f"{prefix}.measurements", "must be an array of tables")
    measurements: list[Measurement] = []
    for i, item in enumerate(raw):
        item_prefix = f"{prefix}.measurements[{i}]"
        if not isinstance(item, dict):
            raise ConfigurationError(item_prefix, "must be a table")
        _check_keys(item, {"metric", "value", "dataset", "source", "n"}, item_prefix)
        n = item.get("n")
        measurements.append(
            Measurement(
                metric=_nonempty(item, "metric", item_prefix),
                value=_float(item, "value", item_prefix),
                dataset=_str(item, "dataset", item_prefix, ""),
                source=_str(item, "source", item_prefix, ""),
                n=None if n is None else _int(item, "n", item_prefix, minimum=1),
            )
        )
    return Performance(summary=_str(table, "summary", prefix, ""), measurements=tuple(measurements))


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
