"""Running a model package: build the network once per worker, predict probabilities in batches.

Device: CUDA when available (else CPU) unless the caller names one. On CUDA the runner uses
channels-last memory layout and autocast (bfloat16 where the GPU supports it, else float16);
probabilities are always computed in float32 from the logits. Prediction runs under
``torch.inference_mode``; Grad-CAM (:mod:`dicomnode.models.gradcam`) re-runs with gradients.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dicomnode.errors import ModelUnavailableError
from dicomnode.findings import LabelFinding
from dicomnode.models import ModelPackage
from dicomnode.models.card import ModelCard

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16


def build_network(package: ModelPackage, map_location: torch.device | str = "cpu") -> nn.Module:
    """The package's network with its trained weights loaded, in eval mode.

    Raises :class:`ModelUnavailableError` when the weights are missing or do not fit the
    architecture the card declares.
    """
    card = package.card
    weights = package.weights_path
    if not weights.is_file():
        raise ModelUnavailableError(f"model {card.name} {card.version}: weights file {weights} is missing")
    params = card.architecture_parameters
    network: nn.Module
    try:
        if card.architecture == "torchscript":
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; loading still works
                warnings.simplefilter("ignore", DeprecationWarning)
                network = torch.jit.load(str(weights), map_location=map_location)
        else:
            state = torch.load(weights, map_location=map_location, weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if card.architecture == "xception":
                from dicomnode.models.xception import Xception

                network = Xception(
                    num_classes=int(params["num_classes"]),
                    in_channels=int(params["in_channels"]),
                    hidden_units=int(params.get("hidden_units", 0)),
                    dropout=float(params.get("dropout", 0.0)),
                )
            else:
                from dicomnode.models.densenet import build_densenet121, to_monai_keys

                network = build_densenet121(
                    int(params["num_classes"]), int(params["in_channels"]), float(params.get("dropout", 0.0))
                )
                state = to_monai_keys(state, str(params.get("key_layout", "monai")))
            network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError) as exc:
        raise ModelUnavailableError(
            f"model {card.name} {card.version}: weights {weights.name} do not load into "
            f"{card.architecture}: {exc}"
        ) from exc
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def cam_target_layer(network: nn.Module, card: ModelCard) -> nn.Module:
    """The module whose output Grad-CAM explains: the last convolutional activation before pooling."""
    if card.architecture == "xception":
        return network.get_submodule("block14_sepconv2_act")
    if card.architecture == "densenet121":
        return network.get_submodule("class_layers.relu")
    raise ValueError(f"Grad-CAM is not available for {card.architecture} models")


def probabilities_from_logits(logits: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """Apply the card's activation in float32 and keep the labels' output columns, in label order."""
    logits = logits.float()
    if logits.ndim != 2 or logits.shape[1] != card.num_classes:
        raise ValueError(
            f"network output shape {tuple(logits.shape)} does not match num_classes={card.num_classes}"
        )
    probs = torch.softmax(logits, dim=1) if card.output_activation == "softmax" else torch.sigmoid(logits)
    index = torch.tensor([label.output_index for label in card.labels], device=probs.device)
    return probs.index_select(1, index)


class ModelRunner:
    """One loaded model on one device; create once per worker process and reuse."""

    def __init__(
        self,
        package: ModelPackage,
        device: str | torch.device | None = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        autocast: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.package = package
        self.card = package.card
        self.device = torch.device(device) if device is not None else default_device()
        self.max_batch_size = max_batch_size
        self.autocast_dtype: torch.dtype | None = None
        if autocast and self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        started = time.perf_counter()
        self.network = build_network(package, map_location=self.device).to(self.device)
        self.channels_last = self.device.type == "cuda" and self.card.architecture != "torchscript"
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        logger.info(
            "loaded model %s %s on %s (autocast %s) in %.2f s",
            self.card.name,
            self.card.version,
            self.device,
            self.autocast_dtype,
            time.perf_counter() - started,
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, rows, columns) the card's preprocessing produces."""
        rows, cols = self.card.preprocessing.size
        return self.card.preprocessing.channels, rows, cols

    def to_input(self, batch: np.ndarray) -> torch.Tensor:
        """Validate an (N, C, H, W) float array and move it to the device in the network's layout."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape (N, {', '.join(map(str, self.input_shape))}), got {batch.shape}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                return self.network(tensor)
        return self.network(tensor)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, number of labels) in card label order for an (N, C, H, W) float32 batch.

        Any N is accepted; the work is split into chunks of at most ``max_batch_size``.
        """
        if self.card.task != "image-classification":
            raise ValueError(f"model {self.card.name} is a {self.card.task} model: use predict_volume")
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.card.labels)), dtype=np.float32)
        outputs: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.max_batch_size):
                tensor = self.to_input(batch[start : start + self.max_batch_size])
                probs = probabilities_from_logits(self._forward(tensor), self.card)
                outputs.append(probs.cpu().numpy().astype(np.float32))
        return np.concatenate(outputs, axis=0)

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        """Probabilities (number of labels,) for one series given as (N_slices, C, H, W) float32.

        The network receives one (1, C, N_slices, H, W) tensor: the layout of 3-D CNNs (MONAI).
        """
        if self.card.task != "series-classification":
            raise ValueError(f"model {self.card.name} is an {self.card.task} model: use predict")
        if volume.ndim != 4 or tuple(volume.shape[1:]) != self.input_shape or volume.shape[0] == 0:
            raise ValueError(f"expected a volume of shape (slices, {', '.join(map(str, self.input_shape))})")
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(self.device)
            tensor = tensor.permute(1, 0, 2, 3).unsqueeze(0).contiguous()
            probs = probabilities_from_logits(self._forward(tensor), self.card)
        return probs[0].cpu().numpy().astype(np.float32)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def findings_for(probabilities: Sequence[float] | np.ndarray, card: ModelCard) -> list[LabelFinding]:
    """One :class:`LabelFinding` per card label from one row of :meth:`ModelRunner.predict`."""
    row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if row.shape[0] != len(card.labels):
        raise ValueError(f"{row.shape[0]} probabilities for {len(card.labels)} labels")
    if not np.all(np.isfinite(row)):
        raise ValueError("probabilities must be finite")
    findings = []
    for label, value in zip(card.labels, row, strict=True):
        probability = float(min(max(value, 0.0), 1.0))  # float rounding may step just outside 0..1
        findings.append(
            LabelFinding(
                label=label.name,
                display_name=label.display_name,
                concept=label.concept,
                probability=probability,
                threshold=label.threshold,
                present=probability >= label.threshold,
            )
        )
    return findings
