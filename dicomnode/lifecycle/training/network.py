"""The network to train, its loss (class-weighted BCE), per-label AUROC and the device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from sklearn.metrics import roc_auc_score
from torch import nn

from dicomnode.errors import ConfigurationError
from dicomnode.models.card import ModelCard


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
