"""train.toml: the training run's settings, validated with messages that name the key."""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dicomnode._toml import Table
from dicomnode.errors import ConfigurationError
from dicomnode.models.card import parse_card

logger = logging.getLogger(__name__)

WEIGHTS_FILE_NAME = "weights.pt"
SUMMARY_FILE_NAME = "training.json"
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"
TO_BE_COMPLETED = "TO BE COMPLETED BY THE SITE"
TRAINED_BY = "dicomnode train"
SCRATCH_ARCHITECTURES = ("densenet121", "xception")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the labelled CSV and how it is split by patient."""

    csv: Path
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, validation, test


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the base package to fine-tune, or the card of a network trained from scratch.

    ``scratch_card`` holds the card entries (architecture, labels, preprocessing, ...) given in the
    train.toml when ``base`` is None; it is validated by the model card parser.
    """

    name: str
    version: str
    base: Path | None = None
    display_name: str | None = None
    scratch_card: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """``[training]``: optimisation, augmentation, checkpoints and device."""

    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    early_stopping_patience: int = 5  # epochs without a better validation AUROC; 0 = never stop early
    augment: bool = True
    horizontal_flip: bool = False
    class_weighting: bool = True
    checkpoint_dir: Path = Path("checkpoints")
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class ThresholdConfig:
    """``[thresholds]``: keep the card's thresholds, or choose them on the validation split."""

    target_sensitivity: float | None = None  # None keeps the base's (or configured) thresholds


@dataclass(frozen=True)
class CardConfig:
    """``[card]``: what the site states about the new model; empty fields become a TODO marker."""

    trained_by: str = ""
    training_data: str = ""
    intended_use: str = ""
    limitations: str = ""
    licence: str = ""
    not_for_clinical_use: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where the model package is written."""

    path: Path
    overwrite: bool = False  # replace a folder that is not an earlier output of this training


@dataclass(frozen=True)
class TrainConfig:
    """A validated ``train.toml``; relative paths are resolved against the file's folder."""

    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    output: OutputConfig
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    card: CardConfig = field(default_factory=CardConfig)
    source: Path | None = None  # the train.toml it was read from

    @classmethod
    def from_file(cls, path: Path | str) -> TrainConfig:
        """Read and validate a ``train.toml``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError("train.toml", f"cannot read {path}: {exc.strerror}") from exc
        return cls.from_toml(text, base_dir=path.parent.resolve(), source=path.resolve())

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path, source: Path | None = None) -> TrainConfig:
        """Parse and validate train.toml text; relative paths start at ``base_dir``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError("train.toml", f"not valid TOML: {exc}") from exc
        return parse_train_config(data, base_dir=base_dir, source=source)


_DATA_KEYS = {"csv", "split_seed", "fractions"}
_BASE_MODEL_KEYS = {"base", "name", "version", "display_name"}
_SCRATCH_MODEL_KEYS = _BASE_MODEL_KEYS | {
    "architecture",
    "architecture_parameters",
    "output_activation",
    "labels",
    "preprocessing",
    "applies_to",
    "manufacturer",
    "task",
}
_TRAINING_KEYS = {
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "early_stopping_patience",
    "augment",
    "horizontal_flip",
    "class_weighting",
    "checkpoint_dir",
    "device",
    "seed",
}
_CARD_KEYS = {"trained_by", "training_data", "intended_use", "limitations", "licence", "not_for_clinical_use"}


def parse_train_config(data: Mapping[str, Any], *, base_dir: Path, source: Path | None = None) -> TrainConfig:
    """Validate the decoded TOML of a train.toml; errors name the offending key."""
    top = Table(data)
    top.check_keys({"data", "model", "training", "thresholds", "card", "output"})

    raw_data = top.table("data", required=True)
    raw_data.check_keys(_DATA_KEYS)
    fractions_raw = raw_data.data.get("fractions", [0.7, 0.15, 0.15])
    if (
        not isinstance(fractions_raw, list)
        or len(fractions_raw) != 3
        or not all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 for f in fractions_raw)
    ):
        raise ConfigurationError("data.fractions", "must be three non-negative numbers [train, val, test]")
    fractions = (float(fractions_raw[0]), float(fractions_raw[1]), float(fractions_raw[2]))
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ConfigurationError("data.fractions", f"must sum to 1, not {sum(fractions):g}")
    if fractions[0] <= 0 or fractions[1] <= 0:
        raise ConfigurationError("data.fractions", "the train and validation fractions must be > 0")
    data_config = DataConfig(
        csv=raw_data.path("csv", base_dir),
        split_seed=raw_data.integer("split_seed", 0),
        fractions=fractions,
    )

    raw_model = top.table("model", required=True)
    has_base, has_arch = "base" in raw_model, "architecture" in raw_model
    if has_base == has_arch:
        raise ConfigurationError("model.base", "give either base (a package to fine-tune) or architecture")
    raw_model.check_keys(_BASE_MODEL_KEYS if has_base else _SCRATCH_MODEL_KEYS)
    name = raw_model.string("name").strip()
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise ConfigurationError("model.name", "must be a non-empty name without path separators")
    version = raw_model.string("version", nonempty=True).strip()
    display_name = raw_model.string("display_name") if "display_name" in raw_model else None
    scratch: dict[str, Any] = {}
    if has_arch:
        raw_model.choice("architecture", SCRATCH_ARCHITECTURES)
        scratch = {k: v for k, v in raw_model.data.items() if k not in _BASE_MODEL_KEYS}
        _scratch_card_dict(name, version, display_name, scratch)  # validate now, not after decoding
    model_config = ModelConfig(
        name=name,
        version=version,
        base=raw_model.path("base", base_dir) if has_base else None,
        display_name=display_name,
        scratch_card=scratch,
    )

    raw_training = top.table("training")
    raw_training.check_keys(_TRAINING_KEYS)
    learning_rate = raw_training.number("learning_rate", 1e-4)
    if not 0 < learning_rate < 1:
        raise ConfigurationError("training.learning_rate", "must be in (0, 1)")
    device = raw_training.string("device", "auto")
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigurationError(
                "training.device", f"{device!r} is not a torch device or 'auto'"
            ) from exc
    training_config = TrainingConfig(
        epochs=raw_training.integer("epochs", 20, low=1),
        batch_size=raw_training.integer("batch_size", 16, low=2),
        learning_rate=learning_rate,
        weight_decay=raw_training.number("weight_decay", 1e-2, low=0.0),
        early_stopping_patience=raw_training.integer("early_stopping_patience", 5, low=0),
        augment=raw_training.boolean("augment", True),
        horizontal_flip=raw_training.boolean("horizontal_flip", False),
        class_weighting=raw_training.boolean("class_weighting", True),
        checkpoint_dir=raw_training.path("checkpoint_dir", base_dir, "checkpoints"),
        device=device,
        seed=raw_training.integer("seed", 0),
    )

    raw_thresholds = top.table("thresholds")
    raw_thresholds.check_keys({"target_sensitivity"})
    target = None
    if raw_thresholds.data.get("target_sensitivity") is not None:
        target = raw_thresholds.number("target_sensitivity")
        if not 0 < target <= 1:
            raise ConfigurationError("thresholds.target_sensitivity", "must be in (0, 1]")

    raw_card = top.table("card")
    raw_card.check_keys(_CARD_KEYS)
    card_config = CardConfig(
        **{k: raw_card.string(k, "") for k in sorted(_CARD_KEYS - {"not_for_clinical_use"})},
        not_for_clinical_use=raw_card.boolean("not_for_clinical_use", True),
    )

    raw_output = top.table("output", required=True)
    raw_output.check_keys({"path", "overwrite"})
    output_config = OutputConfig(
        path=raw_output.path("path", base_dir),
        overwrite=raw_output.boolean("overwrite", False),
    )
    if model_config.base is not None and output_config.path.resolve() == model_config.base.resolve():
        raise ConfigurationError("output.path", "must not be the base model's folder")
    return TrainConfig(
        data=data_config,
        model=model_config,
        training=training_config,
        output=output_config,
        thresholds=ThresholdConfig(target_sensitivity=target),
        card=card_config,
        source=source,
    )


def _scratch_card_dict(
    name: str, version: str, display_name: str | None, scratch: Mapping[str, Any]
) -> dict[str, Any]:
    """The card (as TOML data) of a network trained from scratch, validated by the card parser.

    Output indices are assigned in label order: sigmoid has one output per label; softmax has a first
    "none of the labels" output followed by one per label (mutually exclusive classes).
    """
    activation = scratch.get("output_activation", "sigmoid")
    if activation not in ("sigmoid", "softmax"):
        raise ConfigurationError("model.output_activation", "must be 'sigmoid' or 'softmax'")
    labels = scratch.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, dict) for x in labels):
        raise ConfigurationError("model.labels", "at least one [[model.labels]] table is required")
    preprocessing = scratch.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise ConfigurationError("model.preprocessing", "a [model.preprocessing] table is required")
    parameters = dict(Table(scratch, "model").table("architecture_parameters").data)
    for key in ("num_classes", "in_channels"):
        if key in parameters:
            raise ConfigurationError(f"model.architecture_parameters.{key}", "is derived; leave it out")
    offset = 1 if activation == "softmax" else 0
    card_labels = []
    for i, label in enumerate(labels):
        if "output_index" in label:
            raise ConfigurationError(f"model.labels[{i}].output_index", "is assigned in label order")
        card_labels.append({**label, "output_index": i + offset})
    parameters["num_classes"] = len(labels) + offset
    channels = preprocessing.get("channels", 3)
    parameters["in_channels"] = (
        channels if isinstance(channels, int) and not isinstance(channels, bool) else 3
    )
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "display_name": display_name or name,
        "task": scratch.get("task", "image-classification"),
        "architecture": scratch["architecture"],
        "weights": WEIGHTS_FILE_NAME,
        "output_activation": activation,
        "architecture_parameters": parameters,
        "labels": card_labels,
        "preprocessing": dict(preprocessing),
    }
    for key in ("applies_to", "manufacturer"):
        if key in scratch:
            card[key] = scratch[key]
    try:
        parse_card(card)
    except ConfigurationError as exc:
        raise ConfigurationError(f"model.{exc.key}", str(exc).split(": ", 1)[-1]) from exc
    return card
