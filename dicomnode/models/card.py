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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from dicomnode._toml import Table
from dicomnode.errors import ConfigurationError
from dicomnode.findings import ModelIdentity
from dicomnode.fsio import durable_write
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.models.card_sections import (
    DENSENET_KEY_LAYOUTS,
    AppliesTo,
    LabelSpec,
    Measurement,
    OodKind,
    OodSpec,
    Performance,
    read_applies_to,
    read_architecture_parameters,
    read_labels,
    read_ood,
    read_performance,
    read_preprocessing,
)

Task = Literal["image-classification", "series-classification"]
Architecture = Literal["xception", "densenet121", "torchscript"]
OutputActivation = Literal["softmax", "sigmoid"]

CARD_FILE_NAME = "model.toml"
# Namespace of the Device Observer UIDs: uuid5(NAMESPACE_URL, "https://github.com/dicomnode/model").
DEVICE_OBSERVER_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/dicomnode/model")


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

    parameters = read_architecture_parameters(
        top.table("architecture_parameters", required=True), architecture
    )
    preprocessing = read_preprocessing(top.table("preprocessing", required=True))
    if preprocessing.channels != parameters["in_channels"]:
        raise ConfigurationError("preprocessing.channels", "must equal architecture_parameters.in_channels")
    labels = read_labels(data.get("labels"), int(parameters["num_classes"]))
    applies = read_applies_to(top.table("applies_to"))
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
        performance=read_performance(card.table("performance")),
        ood=read_ood(top.table("ood")) if "ood" in top else None,
    )


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


# the sections' names, re-exported: importers keep ``from dicomnode.models.card import AppliesTo``
__all__ = [
    "CARD_FILE_NAME",
    "DENSENET_KEY_LAYOUTS",
    "DEVICE_OBSERVER_NAMESPACE",
    "AppliesTo",
    "Architecture",
    "LabelSpec",
    "Measurement",
    "ModelCard",
    "OodKind",
    "OodSpec",
    "OutputActivation",
    "Performance",
    "Task",
    "device_observer_uid",
    "parse_card",
    "set_label_threshold",
    "set_ood_section",
]
