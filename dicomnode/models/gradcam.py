"""Grad-CAM class-activation heat maps (Selvaraju et al. 2017) for the key image.

The map explains the label's log-odds (``log p / (1 - p)``): for a sigmoid output that is the logit,
for a softmax output it is ``z_k - logsumexp(z_j, j != k)``. Unlike the raw probability it does not
saturate, so a confident prediction still yields a map. Runs with gradients enabled and in float32
(prediction itself runs under ``inference_mode``, where no gradient exists).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (torch convention)
from torch import nn

from dicomnode.models.card import ModelCard
from dicomnode.models.runner import ModelRunner, cam_head, cam_target_layer


def label_log_odds(logits: torch.Tensor, output_index: int, activation: str) -> torch.Tensor:
    """Log-odds of one output per batch row, from logits, for a softmax or sigmoid head."""
    logits = logits.float()
    if activation == "sigmoid":
        return logits[:, output_index]
    others = torch.cat([logits[:, :output_index], logits[:, output_index + 1 :]], dim=1)
    if others.shape[1] == 0:
        return logits[:, output_index]
    return logits[:, output_index] - torch.logsumexp(others, dim=1)


def grad_cam_map(
    network: nn.Module,
    target_layer: nn.Module,
    image: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    out_shape: tuple[int, int],
) -> np.ndarray:
    """Grad-CAM of ``score(network(image))`` at ``target_layer``'s output, as float32 in [0, 1].

    ``image`` is one (C, H, W) tensor on the network's device. The map is upsampled bilinearly to
    ``out_shape`` (rows, columns); an all-zero map means no positive evidence was found.
    """
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = target_layer.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = image.detach().clone().float().unsqueeze(0).requires_grad_(True)
            value = score(network(x)).sum()
            activations = captured[-1]
            (gradients,) = torch.autograd.grad(value, activations)
    finally:
        handle.remove()
    return _cams(activations, gradients, [out_shape])[0]


def _cams(
    activations: torch.Tensor, gradients: torch.Tensor, out_shapes: list[tuple[int, int]]
) -> list[np.ndarray]:
    """Grad-CAM from (N, K, h, w) activations and their gradients: ReLU of the gradient-weighted sum,
    upsampled to each row's shape and scaled to [0, 1] (all zero when there is no positive evidence)."""
    maps = []
    with torch.no_grad():
        weights = gradients.float().mean(dim=(2, 3), keepdim=True)
        cams = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))
        for row, shape in enumerate(out_shapes):
            cam = F.interpolate(cams[row : row + 1], size=shape, mode="bilinear", align_corners=False)[0, 0]
            peak = float(cam.max())
            cam = cam / peak if peak > 0 and np.isfinite(peak) else torch.zeros_like(cam)
            maps.append(cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32))
    return maps


def grad_cam(
    runner: ModelRunner, batch_item: np.ndarray, label_index: int, out_shape: tuple[int, int]
) -> np.ndarray:
    """Heat map (``out_shape`` rows x columns, float32 in [0, 1]) of card label ``label_index``.

    ``batch_item`` is one preprocessed (C, H, W) model input, as passed to :meth:`ModelRunner.predict`;
    ``label_index`` indexes ``runner.card.labels`` (not the network outputs). Since preprocessing
    stretches the image to the model's size, the map is stretched back to the source's (rows, columns).
    """
    card: ModelCard = runner.card
    if not 0 <= label_index < len(card.labels):
        raise IndexError(f"label_index {label_index} is outside the {len(card.labels)} labels")
    if out_shape[0] < 1 or out_shape[1] < 1:
        raise ValueError("out_shape must be positive")
    return grad_cam_batch(
        runner, np.asarray(batch_item)[None], [label_index], [(int(out_shape[0]), int(out_shape[1]))]
    )[0]


def grad_cam_batch(
    runner: ModelRunner,
    items: np.ndarray,
    label_indices: list[int],
    out_shapes: list[tuple[int, int]],
) -> list[np.ndarray]:
    """Grad-CAM maps of several (image, label) pairs with one forward pass per chunk.

    ``items`` is (N, C, H, W) preprocessed input; row i is explained for card label
    ``label_indices[i]`` and upsampled to ``out_shapes[i]``. Gradients are taken with respect to the
    target layer's activations only, so the backward pass runs through the head alone.
    """
    card: ModelCard = runner.card
    if not len(items) == len(label_indices) == len(out_shapes):
        raise ValueError("items, label_indices and out_shapes must have the same length")
    target = cam_target_layer(runner.network, card)
    maps: list[np.ndarray] = []
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured.append(output)

    handle = target.register_forward_hook(keep)
    try:
        for start in range(0, len(items), runner.max_batch_size):
            indices = label_indices[start : start + runner.max_batch_size]
            captured.clear()
            with torch.inference_mode(False), torch.enable_grad():
                chunk = runner.to_input(np.asarray(items[start : start + runner.max_batch_size]))
                # the input requires grad so a graph exists even when the weights are frozen
                logits = runner.network(chunk.float().clone().requires_grad_(True))
                scores = torch.stack(
                    [
                        label_log_odds(
                            logits[row : row + 1], card.labels[index].output_index, card.output_activation
                        )[0]
                        for row, index in enumerate(indices)
                    ]
                )
                (gradients,) = torch.autograd.grad(scores.sum(), captured[-1])
            maps.extend(_cams(captured[-1], gradients, out_shapes[start : start + len(indices)]))
    finally:
        handle.remove()
    return maps


def grad_cam_from_features(
    runner: ModelRunner,
    features: list[torch.Tensor],
    label_indices: list[int],
    out_shapes: list[tuple[int, int]],
) -> list[np.ndarray]:
    """Grad-CAM maps from target activations kept by :meth:`ModelRunner.predict_with_features`.

    ``features[i]`` is one image's (K, h, w) activation, explained for card label
    ``label_indices[i]`` and upsampled to ``out_shapes[i]``. Only the head (pooling and dense layers)
    runs, forward and backward: the same gradients as :func:`grad_cam_batch` without its second
    pass through the backbone.
    """
    card: ModelCard = runner.card
    if not len(features) == len(label_indices) == len(out_shapes):
        raise ValueError("features, label_indices and out_shapes must have the same length")
    head = cam_head(runner.network, card)
    if head is None:
        raise ValueError(f"no Grad-CAM head for {card.architecture} models")
    maps: list[np.ndarray] = []
    for start in range(0, len(features), runner.max_batch_size):
        indices = label_indices[start : start + runner.max_batch_size]
        with torch.inference_mode(False), torch.enable_grad():
            activations = torch.stack(
                [f.float().clone() for f in features[start : start + runner.max_batch_size]]
            ).requires_grad_(True)
            logits = head(activations)
            scores = torch.stack(
                [
                    label_log_odds(
                        logits[row : row + 1], card.labels[index].output_index, card.output_activation
                    )[0]
                    for row, index in enumerate(indices)
                ]
            )
            (gradients,) = torch.autograd.grad(scores.sum(), activations)
        maps.extend(_cams(activations, gradients, out_shapes[start : start + len(indices)]))
    return maps
