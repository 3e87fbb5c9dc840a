"""Training data: decoded tensors per split (the production preprocessing) and their augmentation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from tqdm import tqdm

from dicomnode.errors import ConfigurationError, InvalidDatasetError
from dicomnode.imaging.preprocess import decode_model_input
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.lifecycle.datasets import Case
from dicomnode.models.card import ModelCard

logger = logging.getLogger(__name__)

# augmentation ranges (the brief of the training issue): rotation ±7°, scale ±10 %, shift ±5 % of the
# image size, brightness ±0.1 and contrast ×(1 ± 0.1) in display units
ROTATION_DEGREES = 7.0
SCALE_RANGE = 0.10
SHIFT_RANGE = 0.05
BRIGHTNESS_RANGE = 0.10
CONTRAST_RANGE = 0.10


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
