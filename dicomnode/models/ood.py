"""Out-of-distribution gates: a score per image saying how far it is from the model's reference images.

A CNN gives a confident number for anything it is fed (a knee labelled CHEST, an inverted image, a
photograph). A gate scores each model input before its findings are used; above the card's
``[ood] threshold`` the image gets no finding. Two kinds (the card's ``[ood] kind``):

* ``feature-distance``: the Mahalanobis distance of the model's own penultimate features (the
  Grad-CAM target activations averaged over space, kept from the prediction's forward pass, so it
  costs no second pass) to the reference images' features. The covariance of a few dozen images in
  thousands of dimensions is singular, so it is shrunk towards a scaled identity (Ledoit and Wolf
  2004): the reference images' principal directions keep (most of) their own variance, every other
  direction gets the average variance.
* ``autoencoder``: a small convolutional autoencoder trained on the reference images (grey scale,
  64x64); the score is its mean squared reconstruction error.

This module is runtime only (load and score); fitting is :mod:`dicomnode.lifecycle.ood`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from dicomnode.errors import ModelUnavailableError
from dicomnode.findings import REFUSED_OUT_OF_DISTRIBUTION
from dicomnode.models.card import OodSpec

if TYPE_CHECKING:
    import torch

    from dicomnode.models import ModelPackage
    from dicomnode.models.runner import ModelRunner

REFUSED_OOD = REFUSED_OUT_OF_DISTRIBUTION
AUTOENCODER_SIZE = 64  # the autoencoder's input: the model input's luminance resized to 64x64


class Gate(Protocol):
    """A fitted gate: a score per image; higher means further from the reference images."""

    @property
    def spec(self) -> OodSpec: ...

    def score(self, batch: np.ndarray, features: list[torch.Tensor] | None) -> np.ndarray: ...


def pooled_features(features: list[torch.Tensor]) -> np.ndarray:
    """(N, K) float64: each image's (K, h, w) target activations averaged over space."""
    return np.stack([f.float().mean(dim=(1, 2)).cpu().numpy() for f in features]).astype(np.float64)


def activations(runner: ModelRunner, batch: np.ndarray) -> list[torch.Tensor]:
    """The Grad-CAM target activations of an eager float32 pass, where the prediction kept none."""
    import torch

    from dicomnode.models.runner import cam_target_layer

    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured.append(output.float())

    handle = cam_target_layer(runner.network, runner.card).register_forward_hook(keep)
    try:
        with torch.inference_mode():
            for start in range(0, batch.shape[0], runner.max_batch_size):
                runner.network(runner.to_input(batch[start : start + runner.max_batch_size]).float())
    finally:
        handle.remove()
    return [row for chunk in captured for row in chunk.unbind(0)]


@dataclass(frozen=True)
class FeatureDistance:
    """Shrunk-covariance Mahalanobis distance to the reference features (see the module text).

    ``basis`` (K, r) holds the reference images' principal directions, ``variances`` (r,) the shrunk
    variance along each, ``residual_variance`` the variance of every other direction.
    """

    mean: np.ndarray
    basis: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureDistance:
        """Fit on (N, K) reference features (N >= 2), with the Ledoit-Wolf shrinkage intensity."""
        x = np.asarray(features, dtype=np.float64)
        n, k = x.shape
        if n < 2:
            raise ValueError("a feature-distance gate needs at least two reference images")
        mean = x.mean(axis=0)
        centred = x - mean
        # Eigen-decomposition of the sample covariance through the (N, N) Gram matrix.
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        eigen = singular**2 / n
        keep = eigen > eigen.max() * 1e-10 if eigen.size else eigen > 0
        basis, eigen = vt[keep].T, eigen[keep]
        nu = float(eigen.sum() / k)  # the target's variance: trace / K
        # Ledoit-Wolf intensity: beta / delta with delta = ||S - nu I||^2 and beta from the samples.
        delta = float(((eigen - nu) ** 2).sum() + (k - eigen.size) * nu**2) / k
        squared = (centred**2).sum(axis=1)
        beta = float(((squared**2).sum() / n - (eigen**2).sum()) / n) / k
        shrink = min(1.0, max(0.0, beta / delta)) if delta > 0 else 1.0
        shrink = max(shrink, 1e-3)  # never a singular covariance
        variances = (1.0 - shrink) * eigen + shrink * nu
        return cls(mean, basis, variances, shrink * nu)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of (N, K) features, divided by sqrt(K)."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        projected = centred @ self.basis
        inside = (projected**2 / self.variances).sum(axis=1)
        outside = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        squared = inside + outside / self.residual_variance
        return np.asarray(np.sqrt(squared / self.mean.shape[0]), dtype=np.float64)

    def to_bytes(self) -> bytes:
        """The parameters as the bytes of an ``.npz`` file (the caller writes them durably)."""
        from io import BytesIO

        buffer = BytesIO()
        np.savez(
            buffer,
            mean=self.mean,
            basis=self.basis,
            variances=self.variances,
            residual_variance=np.array(self.residual_variance),
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> FeatureDistance:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["basis"], data["variances"], float(data["residual_variance"]))


@dataclass(frozen=True)
class FeatureDistanceGate:
    """The ``feature-distance`` gate of one model package."""

    spec: OodSpec
    model: FeatureDistance

    def score(self, batch: np.ndarray, features: list[torch.Tensor] | None) -> np.ndarray:
        """Distances from the kept activations; raises ValueError without them."""
        if features is None or len(features) != batch.shape[0]:
            raise ValueError("the feature-distance gate needs the activations of the prediction pass")
        return self.model.distances(pooled_features(features))


def autoencoder_input(batch: np.ndarray) -> np.ndarray:
    """(N, 1, 64, 64) float32: the model input's channel mean, sampled to 64x64 (nearest)."""
    grey = np.asarray(batch, dtype=np.float32).mean(axis=1)
    rows = np.linspace(0, grey.shape[1] - 1, AUTOENCODER_SIZE).round().astype(int)
    cols = np.linspace(0, grey.shape[2] - 1, AUTOENCODER_SIZE).round().astype(int)
    small = grey[:, rows][:, :, cols]
    return np.asarray(small[:, None], dtype=np.float32)


def build_autoencoder() -> torch.nn.Module:
    """The small convolutional autoencoder: 64x64x1 -> 8x8x32 -> 64x64x1 (about 40 k weights)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
    )


@dataclass(frozen=True)
class AutoencoderGate:
    """The ``autoencoder`` gate: mean squared reconstruction error of :func:`autoencoder_input`."""

    spec: OodSpec
    network: torch.nn.Module
    low: float  # the model input's range, to bring it to [0, 1]
    high: float

    def score(self, batch: np.ndarray, features: list[torch.Tensor] | None) -> np.ndarray:
        return reconstruction_errors(self.network, batch, self.low, self.high)


def reconstruction_errors(network: torch.nn.Module, batch: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mean squared error per image of the autoencoder's reconstruction."""
    import torch

    x = torch.from_numpy((autoencoder_input(batch) - low) / (high - low))
    with torch.inference_mode():
        reconstructed = network(x)
        errors = ((reconstructed - x) ** 2).mean(dim=(1, 2, 3))
    return np.asarray(errors.numpy(), dtype=np.float64)


def load_gate(package: ModelPackage) -> Gate | None:
    """The package's gate, or None when its card has no ``[ood]``; a missing file refuses to load."""
    spec = package.card.ood
    if spec is None:
        return None
    path = package.path / spec.file
    if not path.is_file():
        raise ModelUnavailableError(
            f"model {package.card.name} {package.card.version}: OOD gate file {path} is missing "
            "(fit it with: dicomnode ood fit)"
        )
    if spec.kind == "feature-distance":
        return FeatureDistanceGate(spec, FeatureDistance.load(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    network = build_autoencoder()
    network.load_state_dict(state["network"])
    network.eval()
    return AutoencoderGate(spec, network, float(state["low"]), float(state["high"]))


@dataclass(frozen=True)
class OodDecision:
    """One image's gate result: its score, the threshold, and whether it is refused."""

    score: float
    threshold: float
    kind: str

    @property
    def refused(self) -> bool:
        return not self.score <= self.threshold  # NaN is refused too

    def to_dict(self) -> dict[str, str | float | bool]:
        """What the job's routing records (``dicomnode studies --json``)."""
        return {
            "kind": self.kind,
            "score": round(self.score, 4),
            "threshold": self.threshold,
            "refused": self.refused,
        }

    @property
    def reason(self) -> str:
        """The recorded reason, e.g. ``refused: out-of-distribution (feature-distance 3.1 > 1.4)``."""
        return f"{REFUSED_OOD} ({self.kind} score {self.score:.3f} > threshold {self.threshold:.3f})"


def decide(gate: Gate, batch: np.ndarray, features: list[torch.Tensor] | None) -> list[OodDecision]:
    """Score a batch and compare each score with the card's threshold."""
    scores = gate.score(batch, features)
    return [OodDecision(float(s), gate.spec.threshold, gate.spec.kind) for s in scores]
