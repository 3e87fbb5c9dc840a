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
from dicomnode.models.runner import ModelRunner, cam_target_layer


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
    with torch.no_grad():
        weights = gradients.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=out_shape, mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        cam = cam / peak if peak > 0 and np.isfinite(peak) else torch.zeros_like(cam)
        result = cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)
    return result


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
    tensor = runner.to_input(np.asarray(batch_item)[None])[0].contiguous()
    output_index = card.labels[label_index].output_index
    return grad_cam_map(
        runner.network,
        cam_target_layer(runner.network, card),
        tensor,
        lambda logits: label_log_odds(logits, output_index, card.output_activation),
        (int(out_shape[0]), int(out_shape[1])),
    )
