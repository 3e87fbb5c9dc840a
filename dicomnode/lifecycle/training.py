"""``dicomnode train``: fine-tune a model package (or train one from scratch) on a labelled DICOM dataset.

The inputs are made by :func:`dicomnode.imaging.decode_model_input`, the production preprocessing, with
the card's :class:`~dicomnode.imaging.PreprocessSpec`, so what the network learns from is what the node
will feed it. Decoded tensors are cached in memory for the run; augmentation (small affine, brightness,
contrast; no left-right flip unless asked) runs on those tensors with torch. Training uses AdamW, class
weighting, early stopping on the validation AUROC and a checkpoint after every epoch (a re-run resumes
from it). The result is a complete model package (``weights.pt`` + ``model.toml`` + ``training.json``)
that :func:`dicomnode.models.load_model_package` loads unchanged, with test-split metrics from
:func:`dicomnode.lifecycle.evaluation.evaluate` in its card. Patient IDs are used only to split by
patient; they never reach logs, checkpoints or the package.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from dicomnode.errors import ConfigurationError, InvalidDatasetError, ModelUnavailableError
from dicomnode.imaging.preprocess import decode_model_input
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.lifecycle.datasets import Case, load_labelled_dataset, split_by_patient
from dicomnode.lifecycle.evaluation import CaseResult, choose_threshold, evaluate
from dicomnode.lifecycle.install import atomic_torch_save
from dicomnode.models import load_model_package
from dicomnode.models.card import CARD_FILE_NAME, ModelCard, parse_card
from dicomnode.models.runner import build_network, probabilities_from_logits

logger = logging.getLogger(__name__)

WEIGHTS_FILE_NAME = "weights.pt"
SUMMARY_FILE_NAME = "training.json"
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"
TO_BE_COMPLETED = "TO BE COMPLETED BY THE SITE"
TRAINED_BY = "dicomnode train"
SCRATCH_ARCHITECTURES = ("densenet121", "xception")

# augmentation ranges (the brief of the training issue): rotation ±7°, scale ±10 %, shift ±5 % of the
# image size, brightness ±0.1 and contrast ×(1 ± 0.1) in display units
ROTATION_DEGREES = 7.0
SCALE_RANGE = 0.10
SHIFT_RANGE = 0.05
BRIGHTNESS_RANGE = 0.10
CONTRAST_RANGE = 0.10


# --- configuration --------------------------------------------------------------------------------


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


def _check_keys(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigurationError(
                f"{prefix}.{key}" if prefix else key, f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )


def _table(data: Mapping[str, Any], key: str, required: bool = False) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigurationError(key, "is required")
        return {}
    if not isinstance(value, dict):
        raise ConfigurationError(key, "must be a table")
    return cast(Mapping[str, Any], value)


def _get(table: Mapping[str, Any], key: str, prefix: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """The value of ``key`` checked against ``kind`` (bool is never accepted as a number)."""
    value = table.get(key, default)
    name = f"{prefix}.{key}"
    if value is None:
        raise ConfigurationError(name, "is required")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds).replace("str", "string")
        raise ConfigurationError(name, f"must be a {expected}, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(name, "must be finite")
    return value


def _positive_int(table: Mapping[str, Any], key: str, prefix: str, default: int, minimum: int = 1) -> int:
    value = int(_get(table, key, prefix, int, default))
    if value < minimum:
        raise ConfigurationError(f"{prefix}.{key}", f"must be >= {minimum}")
    return value


def _path(
    table: Mapping[str, Any], key: str, prefix: str, base_dir: Path, default: str | None = None
) -> Path:
    value = str(_get(table, key, prefix, str, default))
    if not value.strip():
        raise ConfigurationError(f"{prefix}.{key}", "must not be empty")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)


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
    _check_keys(data, {"data", "model", "training", "thresholds", "card", "output"}, "")

    raw_data = _table(data, "data", required=True)
    _check_keys(raw_data, _DATA_KEYS, "data")
    fractions_raw = raw_data.get("fractions", [0.7, 0.15, 0.15])
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
        csv=_path(raw_data, "csv", "data", base_dir),
        split_seed=int(_get(raw_data, "split_seed", "data", int, 0)),
        fractions=fractions,
    )

    raw_model = _table(data, "model", required=True)
    has_base, has_arch = "base" in raw_model, "architecture" in raw_model
    if has_base == has_arch:
        raise ConfigurationError("model.base", "give either base (a package to fine-tune) or architecture")
    _check_keys(raw_model, _BASE_MODEL_KEYS if has_base else _SCRATCH_MODEL_KEYS, "model")
    name = str(_get(raw_model, "name", "model", str, None)).strip()
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise ConfigurationError("model.name", "must be a non-empty name without path separators")
    version = str(_get(raw_model, "version", "model", str, None)).strip()
    if not version:
        raise ConfigurationError("model.version", "must not be empty")
    display_name = raw_model.get("display_name")
    if display_name is not None:
        display_name = str(_get(raw_model, "display_name", "model", str, None))
    scratch: dict[str, Any] = {}
    if has_arch:
        architecture = _get(raw_model, "architecture", "model", str, None)
        if architecture not in SCRATCH_ARCHITECTURES:
            raise ConfigurationError(
                "model.architecture", f"{architecture!r} is not one of {', '.join(SCRATCH_ARCHITECTURES)}"
            )
        scratch = {k: v for k, v in raw_model.items() if k not in _BASE_MODEL_KEYS}
        _scratch_card_dict(name, version, display_name, scratch)  # validate now, not after decoding
    model_config = ModelConfig(
        name=name,
        version=version,
        base=_path(raw_model, "base", "model", base_dir) if has_base else None,
        display_name=display_name,
        scratch_card=scratch,
    )

    raw_training = _table(data, "training")
    _check_keys(raw_training, _TRAINING_KEYS, "training")
    learning_rate = float(_get(raw_training, "learning_rate", "training", (int, float), 1e-4))
    if not 0 < learning_rate < 1:
        raise ConfigurationError("training.learning_rate", "must be in (0, 1)")
    weight_decay = float(_get(raw_training, "weight_decay", "training", (int, float), 1e-2))
    if weight_decay < 0:
        raise ConfigurationError("training.weight_decay", "must be >= 0")
    device = str(_get(raw_training, "device", "training", str, "auto"))
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigurationError(
                "training.device", f"{device!r} is not a torch device or 'auto'"
            ) from exc
    training_config = TrainingConfig(
        epochs=_positive_int(raw_training, "epochs", "training", 20),
        batch_size=_positive_int(raw_training, "batch_size", "training", 16, minimum=2),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        early_stopping_patience=_positive_int(raw_training, "early_stopping_patience", "training", 5, 0),
        augment=bool(_get(raw_training, "augment", "training", bool, True)),
        horizontal_flip=bool(_get(raw_training, "horizontal_flip", "training", bool, False)),
        class_weighting=bool(_get(raw_training, "class_weighting", "training", bool, True)),
        checkpoint_dir=_path(raw_training, "checkpoint_dir", "training", base_dir, "checkpoints"),
        device=device,
        seed=int(_get(raw_training, "seed", "training", int, 0)),
    )

    raw_thresholds = _table(data, "thresholds")
    _check_keys(raw_thresholds, {"target_sensitivity"}, "thresholds")
    target = raw_thresholds.get("target_sensitivity")
    if target is not None:
        target = float(_get(raw_thresholds, "target_sensitivity", "thresholds", (int, float), None))
        if not 0 < target <= 1:
            raise ConfigurationError("thresholds.target_sensitivity", "must be in (0, 1]")

    raw_card = _table(data, "card")
    _check_keys(raw_card, _CARD_KEYS, "card")
    card_config = CardConfig(
        **{k: str(_get(raw_card, k, "card", str, "")) for k in sorted(_CARD_KEYS - {"not_for_clinical_use"})},
        not_for_clinical_use=bool(_get(raw_card, "not_for_clinical_use", "card", bool, True)),
    )

    raw_output = _table(data, "output", required=True)
    _check_keys(raw_output, {"path", "overwrite"}, "output")
    output_config = OutputConfig(
        path=_path(raw_output, "path", "output", base_dir),
        overwrite=bool(_get(raw_output, "overwrite", "output", bool, False)),
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
    parameters = dict(_table(scratch, "architecture_parameters"))
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


# --- data -----------------------------------------------------------------------------------------


@dataclass
class TensorSplit:
    """One split's decoded inputs (N, C, H, W), targets and the cases they came from."""

    name: str
    cases: list[Case]
    inputs: torch.Tensor
    targets: torch.Tensor  # sigmoid: (N, labels) float with NaN = unknown; softmax: (N,) long class index
    truths: np.ndarray  # (N, labels) float, NaN = unknown (for metrics)


def decode_cases(
    cases: Sequence[Case], spec: PreprocessSpec, *, progress: bool, desc: str
) -> tuple[list[Case], list[np.ndarray], int]:
    """Decode each case's first selected frame with the production path; unreadable ones are skipped."""
    kept: list[Case] = []
    arrays: list[np.ndarray] = []
    skipped = 0
    for case in tqdm(cases, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            arrays.append(decode_model_input(case.path, spec)[0])
        except InvalidDatasetError as exc:
            logger.warning("skipping %s: %s", case.sop_instance_uid, exc)
            skipped += 1
            continue
        kept.append(case)
    return kept, arrays, skipped


def _targets(cases: Sequence[Case], card: ModelCard, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Training targets in the card's output layout and the truth matrix (card label order)."""
    truths = np.array(
        [
            [np.nan if c.labels.get(lb.name) is None else float(c.labels[lb.name] or 0) for lb in card.labels]
            for c in cases
        ],
        dtype=np.float64,
    ).reshape(len(cases), len(card.labels))
    if card.output_activation == "sigmoid":
        target = torch.full((len(cases), card.num_classes), float("nan"))
        for j, label in enumerate(card.labels):
            target[:, label.output_index] = torch.from_numpy(truths[:, j]).float()
        return target, truths
    used = {label.output_index for label in card.labels}
    free = [i for i in range(card.num_classes) if i not in used]
    if len(free) != 1:
        raise ConfigurationError(
            "model", "a softmax model needs exactly one output that no label uses (the 'none' class)"
        )
    classes = []
    for i, row in enumerate(truths):
        if np.isnan(row).any() or row.sum() > 1:
            raise ConfigurationError(
                "data.csv",
                f"{split} image {cases[i].sop_instance_uid}: a softmax model needs every label annotated "
                "and at most one positive",
            )
        positive = np.flatnonzero(row == 1)
        classes.append(card.labels[int(positive[0])].output_index if positive.size else free[0])
    return torch.tensor(classes, dtype=torch.long), truths


# --- augmentation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputScaling:
    """Maps model inputs to display values in [0, 1] and back (to augment like the image was shown)."""

    scale: torch.Tensor  # (1, C, 1, 1): input = display * scale + shift
    shift: torch.Tensor

    @classmethod
    def from_spec(cls, spec: PreprocessSpec) -> InputScaling:
        """input = ((display * spec.scale + spec.offset) - mean) / std, per channel."""
        channels = spec.channels
        mean = torch.tensor(spec.mean if spec.mean is not None else (0.0,), dtype=torch.float32)
        std = torch.tensor(spec.std if spec.std is not None else (1.0,), dtype=torch.float32)
        mean, std = mean.expand(channels), std.expand(channels)
        scale = (spec.scale / std).reshape(1, channels, 1, 1)
        shift = ((spec.offset - mean) / std).reshape(1, channels, 1, 1)
        return cls(scale=scale, shift=shift)


def augment_batch(
    batch: torch.Tensor, scaling: InputScaling, generator: torch.Generator, *, horizontal_flip: bool = False
) -> torch.Tensor:
    """Random affine (rotation ±7°, scale ±10 %, shift ±5 %), brightness and contrast ±10 %, per image.

    Works in display units so that the area uncovered by rotation is black and brightness means what
    it says; left-right flips only with ``horizontal_flip`` (a flipped chest film shows dextrocardia).
    """
    n = batch.shape[0]
    device = batch.device
    scale = scaling.scale.to(device)
    shift = scaling.shift.to(device)
    display = (batch - shift) / scale

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(device)

    angle = uniform(-ROTATION_DEGREES, ROTATION_DEGREES) * math.pi / 180.0
    zoom = uniform(1.0 - SCALE_RANGE, 1.0 + SCALE_RANGE)
    tx, ty = uniform(-SHIFT_RANGE, SHIFT_RANGE) * 2, uniform(-SHIFT_RANGE, SHIFT_RANGE) * 2  # grid is [-1, 1]
    flip = (torch.rand(n, generator=generator) < 0.5).to(device) if horizontal_flip else None
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if flip is not None:
        theta[:, :, 0] = torch.where(flip[:, None], -theta[:, :, 0], theta[:, :, 0])
    grid = F.affine_grid(theta, list(display.shape), align_corners=False)
    display = F.grid_sample(display, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(1.0 - CONTRAST_RANGE, 1.0 + CONTRAST_RANGE).reshape(n, 1, 1, 1)
    brightness = uniform(-BRIGHTNESS_RANGE, BRIGHTNESS_RANGE).reshape(n, 1, 1, 1)
    display = ((display - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0)
    return display * scale + shift


# --- network, loss, metrics -----------------------------------------------------------------------


def new_network(card: ModelCard) -> nn.Module:
    """An untrained network of the card's architecture (for training from scratch)."""
    params = card.architecture_parameters
    if card.architecture == "xception":
        from dicomnode.models.xception import Xception

        return Xception(
            num_classes=card.num_classes,
            in_channels=card.in_channels,
            hidden_units=int(params.get("hidden_units", 0)),
            dropout=float(params.get("dropout", 0.0)),
        )
    if card.architecture == "densenet121":
        from dicomnode.models.densenet import build_densenet121

        return build_densenet121(card.num_classes, card.in_channels, float(params.get("dropout", 0.0)))
    raise ConfigurationError("model.architecture", f"cannot train a {card.architecture} network")


class Loss(nn.Module):
    """BCE with logits (masked for unknown labels, ``pos_weight``) or cross-entropy with class weights."""

    def __init__(self, card: ModelCard, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.sigmoid = card.output_activation == "sigmoid"
        self.weights: torch.Tensor | None
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of the batch; unknown sigmoid targets (NaN) contribute nothing."""
        logits = logits.float()
        if not self.sigmoid:
            return F.cross_entropy(logits, target, weight=self.weights)
        known = ~torch.isnan(target)
        losses = F.binary_cross_entropy_with_logits(
            logits, torch.nan_to_num(target), pos_weight=self.weights, reduction="none"
        )
        return (losses * known).sum() / known.sum().clamp(min=1)


def class_weights(card: ModelCard, targets: torch.Tensor) -> torch.Tensor:
    """pos_weight = negatives / positives per output (sigmoid) or n / (classes × count) (softmax)."""
    if card.output_activation == "sigmoid":
        known = ~torch.isnan(targets)
        positives = (torch.nan_to_num(targets) * known).sum(0)
        negatives = known.sum(0) - positives
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    counts = torch.bincount(targets, minlength=card.num_classes).float()
    return torch.where(counts > 0, targets.numel() / (card.num_classes * counts.clamp(min=1)), 0.0)


def label_aurocs(probabilities: np.ndarray, truths: np.ndarray, card: ModelCard) -> dict[str, float | None]:
    """AUROC per label (scikit-learn); None where the split holds one class only."""
    result: dict[str, float | None] = {}
    for j, label in enumerate(card.labels):
        known = ~np.isnan(truths[:, j])
        y = truths[known, j]
        result[label.name] = (
            float(roc_auc_score(y, probabilities[known, j])) if len(np.unique(y)) == 2 else None
        )
    return result


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- checkpoints ----------------------------------------------------------------------------------


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def config_fingerprint(config: TrainConfig, csv_bytes: bytes) -> str:
    """What a checkpoint must match to be resumed: the data, the split and the model (not epochs)."""
    model = config.model
    payload = {
        "csv_sha256": hashlib.sha256(csv_bytes).hexdigest(),
        "split_seed": config.data.split_seed,
        "fractions": list(config.data.fractions),
        "base": str(model.base.resolve()) if model.base else None,
        "scratch": json.dumps(model.scratch_card, sort_keys=True, default=str),
        "seed": config.training.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- the model card of the result -----------------------------------------------------------------


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: TOML cannot hold {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise ValueError(f"{key}: cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text of nested dicts/lists of scalars (arrays of tables for lists of dicts).

    Enough for model cards; no third-party writer needed.
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            tables.append((full, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((full, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value, full)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for full, table in tables:
        out += f"\n[{full}]\n" + to_toml(table, full)
    for full, items in arrays:
        for item in items:
            out += f"\n[[{full}]]\n" + to_toml(item, full)
    return out


def _dicomnode_version() -> str:
    """The installed dicomnode distribution's version (the package may be imported as a namespace)."""
    try:
        return importlib.metadata.version("dicomnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _placeholder(value: str) -> str:
    return value.strip() or TO_BE_COMPLETED


def build_card_dict(
    config: TrainConfig,
    start: Mapping[str, Any],
    base_card: ModelCard | None,
    thresholds: Mapping[str, float],
    summary: Mapping[str, Any],
    test_metrics: Mapping[str, Any] | None,
    today: dt.date,
) -> dict[str, Any]:
    """The new card: the base's (or scratch) network and preprocessing with the new provenance."""
    card = {k: v for k, v in start.items() if k != "card"}
    card["name"] = config.model.name
    card["version"] = config.model.version
    card["display_name"] = config.model.display_name or config.model.name
    card["weights"] = WEIGHTS_FILE_NAME
    card["labels"] = [{**label, "threshold": float(thresholds[label["name"]])} for label in start["labels"]]
    site = config.card
    origin = (
        f"fine-tuned from {base_card.name} {base_card.version}"
        if base_card is not None
        else "trained from scratch"
    )
    trained_by = f"{TRAINED_BY} (dicomnode {_dicomnode_version()}) on {today.isoformat()}, {origin}"
    if site.trained_by.strip():
        trained_by = f"{site.trained_by.strip()}; {trained_by}"
    splits = summary["splits"]
    counts = "; ".join(
        f"{name}: {s['images']} images of {s['patients']} patients ("
        + ", ".join(f"{lb} {c['positives']}+/{c['negatives']}-" for lb, c in s["labels"].items())
        + ")"
        for name, s in splits.items()
    )
    training_data = (
        f"{_placeholder(site.training_data)}. Split by patient (seed {summary['split_seed']}): {counts}."
    )
    if base_card is not None:
        training_data += f" The base model was trained on: {base_card.training_data or 'not stated'}"
    limitations = _placeholder(site.limitations)
    if base_card is not None and base_card.limitations:
        limitations += f" Base model's limitations: {base_card.limitations}"
    measurements: list[dict[str, Any]] = []
    if test_metrics:
        test = splits["test"]
        dataset = (
            f"held-out test split of the training CSV ({test['images']} images, {test['patients']} patients)"
        )
        for label, m in test_metrics.items():
            for metric in ("auroc", "auroc_ci_low", "auroc_ci_high", "sensitivity", "specificity"):
                if m.get(metric) is not None:
                    measurements.append(
                        {
                            "metric": f"{label} {metric}",
                            "value": float(m[metric]),
                            "dataset": dataset,
                            "source": f"measured by {TRAINED_BY} with dicomnode.lifecycle.evaluation",
                            "n": int(m["n"]),
                        }
                    )
        summary_text = "Held-out test split: " + "; ".join(
            f"{label} AUROC {_fmt(m.get('auroc'))} (95% CI {_fmt(m.get('auroc_ci_low'))}–"
            f"{_fmt(m.get('auroc_ci_high'))}), sensitivity {_fmt(m.get('sensitivity'))}, specificity "
            f"{_fmt(m.get('specificity'))} at threshold {thresholds[label]:.4g}, n={m['n']}"
            for label, m in test_metrics.items()
        )
        summary_text += ". One site, one split, small numbers: validate on your own data before use."
    else:
        summary_text = "No test split (data.fractions gives it 0): performance NOT MEASURED."
    performance: dict[str, Any] = {"summary": summary_text}
    if measurements:
        performance["measurements"] = measurements
    card["card"] = {
        "trained_by": trained_by,
        "training_data": training_data,
        "intended_use": _placeholder(site.intended_use),
        "limitations": limitations,
        "licence": _placeholder(site.licence),
        "not_for_clinical_use": site.not_for_clinical_use,
        "performance": performance,
    }
    return card


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


# --- the training run -----------------------------------------------------------------------------


def _split_summary(name: str, cases: Sequence[Case], card: ModelCard) -> dict[str, Any]:
    """Counts only (images, patients, per-label positives/negatives/missing); no identifiers."""
    return {
        "images": len(cases),
        "patients": len({c.patient_key for c in cases}),
        "labels": {
            lb.name: {
                "positives": sum(1 for c in cases if c.labels.get(lb.name) == 1),
                "negatives": sum(1 for c in cases if c.labels.get(lb.name) == 0),
                "missing": sum(1 for c in cases if c.labels.get(lb.name) is None),
            }
            for lb in card.labels
        },
    }


def _predict(
    network: nn.Module,
    inputs: torch.Tensor,
    card: ModelCard,
    device: torch.device,
    batch_size: int,
    autocast: torch.dtype | None,
) -> tuple[np.ndarray, torch.Tensor]:
    """(probabilities in card label order, raw logits on CPU) in eval mode."""
    network.eval()
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits.append(network(x).float().cpu())
    out = torch.cat(logits) if logits else torch.zeros((0, card.num_classes))
    return probabilities_from_logits(out, card).numpy().astype(np.float64), out


def _prepare_output(config: TrainConfig) -> None:
    """Refuse to replace a folder that is not an earlier output of this training, unless told to."""
    target = config.output.path
    if not target.exists() or config.output.overwrite:
        return
    summary = target / SUMMARY_FILE_NAME
    try:
        previous = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("model", {}).get("name") != config.model.name:
        raise ConfigurationError(
            "output.path",
            f"{target} exists and was not written by a training of this model; "
            "set output.overwrite = true to replace it",
        )


def _write_package(
    target: Path, weights: dict[str, torch.Tensor], card_text: str, summary: dict[str, Any]
) -> None:
    """Write the package into a temporary sibling folder, validate it, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        atomic_torch_save(weights, staging / WEIGHTS_FILE_NAME)
        (staging / CARD_FILE_NAME).write_text(card_text, encoding="utf-8")
        (staging / SUMMARY_FILE_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        build_network(load_model_package(staging))  # the card validates and the weights fit
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def train(config: TrainConfig | Path | str, *, progress: bool = True) -> Path:
    """Train as ``config`` (a TrainConfig or a train.toml path) says; return the written package folder.

    Resumes from ``training.checkpoint_dir/last.pt`` when it holds a checkpoint of the same data and
    model. Raises :class:`ConfigurationError` (naming the key) for unusable settings or data and
    :class:`ModelUnavailableError` when the base package cannot be loaded.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_file(config)
    tc = config.training
    _prepare_output(config)

    # the card to train: the base's, or the scratch card from train.toml
    base_card: ModelCard | None = None
    if config.model.base is not None:
        try:
            base_package = load_model_package(config.model.base)
        except ModelUnavailableError as exc:
            raise ConfigurationError("model.base", str(exc)) from exc
        base_card = base_package.card
        if base_card.architecture not in SCRATCH_ARCHITECTURES or base_card.task != "image-classification":
            raise ConfigurationError(
                "model.base", f"{base_card.architecture} {base_card.task} packages cannot be fine-tuned"
            )
        start_dict = tomllib.loads((base_package.path / CARD_FILE_NAME).read_text(encoding="utf-8"))
        network = build_network(base_package)
    else:
        start_dict = _scratch_card_dict(
            config.model.name, config.model.version, config.model.display_name, config.model.scratch_card
        )
        if start_dict.get("task", "image-classification") != "image-classification":
            raise ConfigurationError("model.task", "only image-classification models can be trained")
        network = None
    card = parse_card(start_dict)
    torch.manual_seed(tc.seed)  # initialisation (scratch) and dropout
    if network is None:
        network = new_network(card)
    for parameter in network.parameters():
        parameter.requires_grad_(True)

    # data: load, check, split by patient, decode once
    try:
        csv_bytes = config.data.csv.read_bytes()
        dataset = load_labelled_dataset(config.data.csv)
    except (OSError, ValueError) as exc:
        raise ConfigurationError("data.csv", str(exc)) from exc
    missing = [lb.name for lb in card.labels if lb.name not in dataset.labels]
    if missing:
        raise ConfigurationError("data.csv", f"no 0/1 column for label(s) {', '.join(missing)}")
    parts = split_by_patient(dataset, config.data.fractions, seed=config.data.split_seed)
    splits: dict[str, TensorSplit] = {}
    skipped = len(dataset.unreadable)
    for name, part in zip(("train", "validation", "test"), parts, strict=True):
        cases, arrays, n_skipped = decode_cases(part.cases, card.preprocessing, progress=progress, desc=name)
        skipped += n_skipped
        if not cases:
            if name == "test":
                splits[name] = TensorSplit(name, [], torch.zeros((0,)), torch.zeros((0,)), np.zeros((0, 0)))
                continue
            raise ConfigurationError("data.fractions", f"the {name} split holds no readable image")
        targets, truths = _targets(cases, card, name)
        splits[name] = TensorSplit(name, cases, torch.from_numpy(np.stack(arrays)), targets, truths)
    for name in ("train", "validation"):
        for j, label in enumerate(card.labels):
            values = splits[name].truths[:, j]
            if len(np.unique(values[~np.isnan(values)])) < 2:
                raise ConfigurationError(
                    "data.fractions", f"the {name} split has only one class of label {label.name!r}"
                )
    train_split, val_split, test_split = splits["train"], splits["validation"], splits["test"]
    logger.info(
        "training %s %s on %d/%d/%d images (train/validation/test), %d unreadable",
        config.model.name,
        config.model.version,
        len(train_split.cases),
        len(val_split.cases),
        len(test_split.cases),
        skipped,
    )

    # optimisation state
    device = resolve_device(tc.device)
    autocast: torch.dtype | None = None
    if device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    network = network.to(device)
    weights = class_weights(card, train_split.targets).to(device) if tc.class_weighting else None
    loss_fn = Loss(card, weights).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    generator = torch.Generator().manual_seed(tc.seed)
    scaling = InputScaling.from_spec(card.preprocessing)
    fingerprint = config_fingerprint(config, csv_bytes)
    checkpoint_path = tc.checkpoint_dir / LAST_CHECKPOINT
    best_path = tc.checkpoint_dir / BEST_WEIGHTS
    epoch, best_metric, best_epoch, stale = 0, -math.inf, 0, 0
    history: list[dict[str, Any]] = []
    resumed_from: int | None = None
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise ConfigurationError(
                "training.checkpoint_dir",
                f"{tc.checkpoint_dir} holds a checkpoint of other data or another model; "
                "delete it or choose another folder",
            )
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a changed learning rate in train.toml applies on resume
            group["lr"], group["weight_decay"] = tc.learning_rate, tc.weight_decay
        epoch, best_metric, best_epoch = state["epoch"], state["best_metric"], state["best_epoch"]
        stale, history = state["epochs_without_improvement"], state["history"]
        generator.set_state(state["rng"]["augment"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        resumed_from = epoch
        logger.info(
            "resuming from the checkpoint of epoch %d (best validation AUROC %.4f)", epoch, best_metric
        )

    stopped_early = tc.early_stopping_patience > 0 and stale >= tc.early_stopping_patience
    while epoch < tc.epochs and not stopped_early:
        epoch += 1
        network.train()
        order = torch.randperm(len(train_split.cases), generator=generator)
        batches = [order[i : i + tc.batch_size] for i in range(0, len(order), tc.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # batch norm cannot train on a single image
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        losses: list[float] = []
        bar = tqdm(
            batches, desc=f"epoch {epoch}/{tc.epochs}", unit="batch", disable=not progress, leave=False
        )
        for index in bar:
            x = train_split.inputs[index]
            if tc.augment:
                x = augment_batch(x, scaling, generator, horizontal_flip=tc.horizontal_flip)
            elif tc.horizontal_flip:
                flip = torch.rand(len(index), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x, y = x.to(device), train_split.targets[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits = network(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        probabilities, logits_val = _predict(network, val_split.inputs, card, device, tc.batch_size, autocast)
        val_loss = float(loss_fn(logits_val.to(device), val_split.targets.to(device)))
        aurocs = label_aurocs(probabilities, val_split.truths, card)
        defined = [v for v in aurocs.values() if v is not None]
        metric = float(np.mean(defined)) if defined else -val_loss
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch, stale = metric, epoch, 0
            atomic_torch_save(_cpu_state(network), best_path)
        else:
            stale += 1
        history.append(
            {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_auroc": aurocs}
        )
        message = (
            f"epoch {epoch}: loss {np.mean(losses):.4f}, val loss {val_loss:.4f}, val AUROC {metric:.4f}"
        )
        if progress:
            tqdm.write(message + (" (best)" if improved else ""))
        logger.info("%s%s", message, " (best)" if improved else "")
        atomic_torch_save(
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "epochs_without_improvement": stale,
                "history": history,
                "rng": {
                    "augment": generator.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            },
            checkpoint_path,
        )
        stopped_early = tc.early_stopping_patience > 0 and stale >= tc.early_stopping_patience
        if stopped_early:
            logger.info("early stopping: no better validation AUROC for %d epochs", stale)

    # the best weights, thresholds and test metrics
    best_state = torch.load(best_path, map_location="cpu", weights_only=True)
    network.load_state_dict(best_state)
    val_probabilities, _ = _predict(network, val_split.inputs, card, device, tc.batch_size, autocast)
    thresholds = {label.name: label.threshold for label in card.labels}
    target = config.thresholds.target_sensitivity
    if target is not None:
        for j, label in enumerate(card.labels):
            known = ~np.isnan(val_split.truths[:, j])
            thresholds[label.name] = choose_threshold(
                val_probabilities[known, j], val_split.truths[known, j].astype(int), sensitivity=target
            )
    test_metrics: dict[str, dict[str, Any]] | None = None
    if test_split.cases:
        test_probabilities, _ = _predict(network, test_split.inputs, card, device, tc.batch_size, autocast)
        results = [
            CaseResult.from_case(case, {lb.name: float(p) for lb, p in zip(card.labels, row, strict=True)})
            for case, row in zip(test_split.cases, test_probabilities, strict=True)
        ]
        evaluation = evaluate(
            results,
            [lb.name for lb in card.labels],
            thresholds,
            out_dir=tc.checkpoint_dir / "test-evaluation",
        )
        test_metrics = {}
        for label_name, m in evaluation.overall.items():
            test_metrics[label_name] = {
                "n": m.n,
                "positives": m.n_positive,
                "negatives": m.n_negative,
                "auroc": m.auroc,
                "auroc_ci_low": m.auroc_ci.low if m.auroc_ci else None,
                "auroc_ci_high": m.auroc_ci.high if m.auroc_ci else None,
                "sensitivity": m.sensitivity,
                "specificity": m.specificity,
                "threshold": m.threshold,
            }

    today = dt.date.today()
    summary: dict[str, Any] = {
        "model": {"name": config.model.name, "version": config.model.version},
        "base_model": {"name": base_card.name, "version": base_card.version} if base_card else None,
        "trained_by": TRAINED_BY,
        "dicomnode_version": _dicomnode_version(),
        "date": today.isoformat(),
        "device": str(device),
        "autocast": str(autocast) if autocast else None,
        "split_seed": config.data.split_seed,
        "fractions": list(config.data.fractions),
        "unreadable_images": skipped,
        "splits": {name: _split_summary(name, split.cases, card) for name, split in splits.items()},
        "training": {
            "epochs_run": epoch,
            "epochs_configured": tc.epochs,
            "best_epoch": best_epoch,
            "best_val_auroc": best_metric,
            "stopped_early": stopped_early,
            "resumed_from_epoch": resumed_from,
            "batch_size": tc.batch_size,
            "learning_rate": tc.learning_rate,
            "weight_decay": tc.weight_decay,
            "augment": tc.augment,
            "horizontal_flip": tc.horizontal_flip,
            "class_weighting": tc.class_weighting,
            "class_weights": None if weights is None else [float(w) for w in weights.cpu()],
            "seed": tc.seed,
        },
        "history": history,
        "thresholds": {
            "values": thresholds,
            "method": "kept from the card"
            if target is None
            else f"validation split, sensitivity >= {target}",
        },
        "test_metrics": test_metrics,
    }
    card_dict = build_card_dict(config, start_dict, base_card, thresholds, summary, test_metrics, today)
    card_text = (
        f"# dicomnode model card written by {TRAINED_BY} on {today.isoformat()}; see docs/training.md.\n"
        + to_toml(card_dict)
    )
    parse_card(tomllib.loads(card_text))  # never write a card the loader would refuse
    _write_package(config.output.path, best_state, card_text, summary)
    logger.info(
        "wrote model package %s %s to %s", config.model.name, config.model.version, config.output.path
    )
    return config.output.path
