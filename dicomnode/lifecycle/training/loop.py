"""The training loop: network, loss, metrics, checkpoints and the run itself (``train``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dicomnode._toml import to_toml
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.lifecycle.datasets import Case, load_labelled_dataset, split_by_patient
from dicomnode.lifecycle.evaluation import CaseResult, choose_threshold, evaluate
from dicomnode.lifecycle.install import atomic_torch_save
from dicomnode.lifecycle.training.config import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    SCRATCH_ARCHITECTURES,
    SUMMARY_FILE_NAME,
    TRAINED_BY,
    TrainConfig,
    _scratch_card_dict,
)
from dicomnode.lifecycle.training.data import InputScaling, TensorSplit, _targets, augment_batch, decode_cases
from dicomnode.lifecycle.training.network import (
    Loss,
    class_weights,
    label_aurocs,
    new_network,
    resolve_device,
)
from dicomnode.lifecycle.training.package import _dicomnode_version, _write_package, build_card_dict
from dicomnode.models import load_model_package
from dicomnode.models.card import CARD_FILE_NAME, ModelCard, parse_card
from dicomnode.models.runner import build_network, probabilities_from_logits

logger = logging.getLogger(__name__)


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
