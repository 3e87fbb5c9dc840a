"""Fitting the out-of-distribution gates of :mod:`dicomnode.models.ood` on images a site trusts.

``dicomnode ood fit MODEL DATA.csv|DIR`` decodes each reference image exactly as the worker does
(the card's preprocessing), adds augmented copies (small rotations, zooms, shifts and contrast
changes: a radiograph as another detector or a slightly different positioning would give it), fits
the gate and sets its threshold from leave-one-image-out scores (each image scored by a gate fitted
without it and its copies), so the threshold reflects unseen in-distribution images rather than the
fit's own. The parameters file and the card's ``[ood]`` table are written into the package.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicomnode.fsio import durable_write
from dicomnode.models.card import CARD_FILE_NAME, OodKind, OodSpec, set_ood_section
from dicomnode.models.ood import (
    FeatureDistance,
    autoencoder_input,
    build_autoencoder,
    pooled_features,
    reconstruction_errors,
)

if TYPE_CHECKING:
    from dicomnode.models import ModelPackage
    from dicomnode.models.runner import ModelRunner

logger = logging.getLogger(__name__)

THRESHOLD_MARGIN = 1.1  # the threshold: this times the largest leave-one-out reference score
AUGMENTED_COPIES = 8  # augmented copies per reference image
AUGMENTATION = (
    f"{AUGMENTED_COPIES} copies per image: rotation within 7 degrees, zoom 0.92-1.08, shift within 4 % "
    "of the side, contrast 0.9-1.1 and brightness within 0.1 of the input range"
)
GATE_FILES: dict[str, str] = {"feature-distance": "ood-features.npz", "autoencoder": "ood-autoencoder.pt"}


def reference_paths(source: Path) -> list[Path]:
    """The DICOM files of a labelled-dataset CSV (its ``path`` column) or of a folder (``*.dcm``)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*.dcm") if p.is_file())
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{source}: a CSV needs a 'path' column")
    return [source.parent / row["path"] for row in rows]


def model_inputs(paths: Sequence[Path], package: ModelPackage) -> np.ndarray:
    """(N, C, H, W) model inputs (first selected frame), decoded as the worker decodes them."""
    from dicomnode.imaging.preprocess import decode_model_input

    return np.stack([decode_model_input(path, package.card.preprocessing)[0] for path in paths])


def augment(batch: np.ndarray, copies: int, *, seed: int = 0) -> np.ndarray:
    """(N * copies, C, H, W): mild geometric and intensity changes of each image, values clipped to
    the batch's range. Copy ``j`` of image ``i`` is row ``i * copies + j``."""
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(seed)
    low, high = float(batch.min()), float(batch.max())
    rows, cols = batch.shape[2:]
    centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
    out = np.empty((batch.shape[0] * copies, *batch.shape[1:]), dtype=np.float32)
    for i, image in enumerate(batch):
        for j in range(copies):
            angle = np.deg2rad(rng.uniform(-7, 7))
            zoom = rng.uniform(0.92, 1.08)
            shift = rng.uniform(-0.04, 0.04, size=2) * np.array([rows, cols])
            matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / zoom
            offset = centre - matrix @ centre + shift
            contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * (high - low)
            mid = (low + high) / 2
            for channel in range(image.shape[0]):
                moved = affine_transform(image[channel], matrix, offset, order=1, mode="nearest")
                out[i * copies + j, channel] = np.clip((moved - mid) * contrast + mid + brightness, low, high)
    return out


def network_features(runner: ModelRunner, batch: np.ndarray) -> np.ndarray:
    """(N, K) pooled penultimate features of the model's own forward pass."""
    _, features = runner.predict_with_features(batch)
    if features is None:
        raise ValueError(f"model {runner.card.name} cannot provide its activations (feature-distance gate)")
    return pooled_features(features)


@dataclass(frozen=True)
class FittedGate:
    """A fitted gate before it is written: its parameters' bytes, threshold and leave-one-out scores."""

    kind: OodKind
    data: bytes
    threshold: float
    held_out_scores: np.ndarray  # each reference image scored by a gate fitted without it


def fit_feature_distance(originals: np.ndarray, augmented: np.ndarray | None, copies: int) -> FittedGate:
    """Fit on (N, K) features of the images (and their (N * copies, K) augmented copies)."""
    n = originals.shape[0]

    def reference(excluded: int | None) -> np.ndarray:
        keep = [i for i in range(n) if i != excluded]
        parts = [originals[keep]]
        if augmented is not None and copies:
            rows = [i * copies + j for i in keep for j in range(copies)]
            parts.append(augmented[rows])
        return np.concatenate(parts)

    held_out = np.array(
        [FeatureDistance.fit(reference(i)).distances(originals[i : i + 1])[0] for i in range(n)]
    )
    model = FeatureDistance.fit(reference(None))
    return FittedGate(
        "feature-distance", model.to_bytes(), float(held_out.max() * THRESHOLD_MARGIN), held_out
    )


def _train_autoencoder(inputs: np.ndarray, low: float, high: float, *, epochs: int, seed: int) -> object:
    import torch

    torch.manual_seed(seed)
    network = build_autoencoder()
    x = torch.from_numpy((autoencoder_input(inputs) - low) / (high - low))
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], 32):
            chunk = x[order[start : start + 32]]
            loss = ((network(chunk) - chunk) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    network.eval()
    return network


def fit_autoencoder(
    originals: np.ndarray, augmented: np.ndarray | None, copies: int, *, epochs: int = 60, folds: int = 4
) -> FittedGate:
    """Train the autoencoder on the images and their copies; the threshold from ``folds``-fold
    held-out errors (a fold's images and their copies left out), as leave-one-out would cost N fits."""
    import io

    import torch
    from torch import nn

    low, high = float(originals.min()), float(originals.max())
    n = originals.shape[0]

    def reference(keep: list[int]) -> np.ndarray:
        parts = [originals[keep]]
        if augmented is not None and copies:
            parts.append(augmented[[i * copies + j for i in keep for j in range(copies)]])
        return np.concatenate(parts)

    held_out = np.zeros(n)
    for fold in range(folds):
        test = [i for i in range(n) if i % folds == fold]
        train = [i for i in range(n) if i % folds != fold]
        network = _train_autoencoder(reference(train), low, high, epochs=epochs, seed=fold)
        assert isinstance(network, nn.Module)
        held_out[test] = reconstruction_errors(network, originals[test], low, high)
    final = _train_autoencoder(reference(list(range(n))), low, high, epochs=epochs, seed=folds)
    assert isinstance(final, nn.Module)
    buffer = io.BytesIO()
    torch.save({"network": final.state_dict(), "low": low, "high": high}, buffer)
    return FittedGate("autoencoder", buffer.getvalue(), float(held_out.max() * THRESHOLD_MARGIN), held_out)


def fit_gate(
    package: ModelPackage,
    paths: Sequence[Path],
    *,
    kind: OodKind = "feature-distance",
    fitted_on: str,
    copies: int | None = None,
    evidence: str = "",
    runner: ModelRunner | None = None,
) -> OodSpec:
    """Fit a gate of ``kind`` on ``paths``, write its file and the card's ``[ood]``; return the spec.

    ``copies`` augmented copies per image are added; by default none for ``feature-distance`` (on
    the default model they widened the accepted region until uniform noise passed: held-out chests
    up to 2.6, noise 2.1) and :data:`AUGMENTED_COPIES` for the autoencoder.
    """
    if copies is None:
        copies = 0 if kind == "feature-distance" else AUGMENTED_COPIES
    if len(paths) < 3:
        raise ValueError("an OOD gate needs at least three reference images")
    inputs = model_inputs(paths, package)
    augmented = augment(inputs, copies) if copies else None
    if kind == "feature-distance":
        if runner is None:
            from dicomnode.models.runner import ModelRunner

            runner = ModelRunner(package, "cpu")
        originals = network_features(runner, inputs)
        copied = network_features(runner, augmented) if augmented is not None else None
        fitted = fit_feature_distance(originals, copied, copies)
    else:
        fitted = fit_autoencoder(inputs, augmented, copies)
    file = GATE_FILES[kind]
    durable_write(package.path / file, fitted.data)
    spec = OodSpec(
        kind=kind,
        threshold=round(fitted.threshold, 6),
        file=file,
        fitted_on=fitted_on,
        reference_images=len(paths),
        augmentation=AUGMENTATION if copies else "",
        evidence=evidence,
    )
    set_ood_section(package.path / CARD_FILE_NAME, spec)
    logger.info(
        "fitted %s gate of %s on %d images: threshold %.4f (held-out reference scores %.4f-%.4f)",
        kind,
        package.card.name,
        len(paths),
        spec.threshold,
        float(fitted.held_out_scores.min()),
        float(fitted.held_out_scores.max()),
    )
    return spec


def auroc(in_scores: Sequence[float], out_scores: Sequence[float]) -> float:
    """Area under the ROC curve of "out-of-distribution" by score (ties count one half)."""
    wins = sum((o > i) + 0.5 * (o == i) for o in out_scores for i in in_scores)
    return float(wins / (len(in_scores) * len(out_scores)))
