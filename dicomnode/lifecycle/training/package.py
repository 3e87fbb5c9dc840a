"""The trained package: its model card (with measured performance) and the atomic write of the folder."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dicomnode.lifecycle.install import atomic_torch_save
from dicomnode.lifecycle.training.config import (
    SUMMARY_FILE_NAME,
    TO_BE_COMPLETED,
    TRAINED_BY,
    WEIGHTS_FILE_NAME,
    TrainConfig,
)
from dicomnode.models import load_model_package
from dicomnode.models.card import CARD_FILE_NAME, ModelCard
from dicomnode.models.runner import build_network

logger = logging.getLogger(__name__)


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
