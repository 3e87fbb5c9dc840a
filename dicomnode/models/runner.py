"""Running a model package: build the network once per worker, predict probabilities in batches.

Device: CUDA when available (else CPU) unless the caller names one. The runner uses channels-last
memory layout (on CPU too: oneDNN's depthwise and pointwise convolutions of Xception run about 1.5x
faster in it, with logits within 1e-6 of the default layout); on CUDA also autocast (bfloat16 where
the GPU supports it, else float16); probabilities are always computed in float32 from the logits.
On CPU the network is traced and frozen into one optimised TorchScript graph at load time (checked
against the eager network within 1e-5, else not used). Prediction runs under
``torch.inference_mode``. :meth:`ModelRunner.predict_with_features` also keeps the Grad-CAM target
layer's activations, so that Grad-CAM (:mod:`dicomnode.models.gradcam`) needs only a backward pass
through the head instead of a second forward pass through the whole network.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dicomnode.errors import ConfigurationError, ModelUnavailableError
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
                network = torch.jit.load(str(weights), map_location=map_location)  # type: ignore[no-untyped-call]  # torch.jit is untyped
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


def cam_head(network: nn.Module, card: ModelCard) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The rest of the network after :func:`cam_target_layer`: target activations -> logits.

    None when the architecture's head is not known; Grad-CAM then re-runs the whole network.
    """
    if card.architecture == "xception":
        from dicomnode.models.xception import Xception

        if isinstance(network, Xception):
            return network.head
        return None
    if card.architecture == "densenet121":
        layers = network.get_submodule("class_layers")
        names = [name for name, _ in layers.named_children()]
        if not names or names[0] != "relu":
            return None
        return nn.Sequential(*(module for name, module in layers.named_children() if name != "relu"))
    return None


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
        cpu_threads: int | None = None,
    ) -> None:
        """``cpu_threads``: torch's intra-op threads while this runner predicts on the CPU (default:
        torch's setting), e.g. one core fewer than the machine has when other work runs beside it."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError("cpu_threads must be at least 1")
        self.cpu_threads = cpu_threads
        self.package = package
        self.card = package.card
        self.device = torch.device(device) if device is not None else default_device()
        _check_device(self.device)
        self.max_batch_size = max_batch_size
        self.autocast_dtype: torch.dtype | None = None
        if autocast and self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        started = time.perf_counter()
        self.network = build_network(package, map_location=self.device).to(self.device)
        self.channels_last = self.card.architecture != "torchscript"
        self._frozen: torch.jit.ScriptModule | None = None
        self._frozen_tried = False  # after a try, None in _frozen means: run the network eagerly
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._graph()  # freeze now: part of loading, not of the first batch
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
                logits: torch.Tensor = self.network(tensor)
                return logits
        plain: torch.Tensor = self.network(tensor)
        return plain

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, number of labels) in card label order for an (N, C, H, W) float32 batch.

        Any N is accepted; the work is split into chunks of at most ``max_batch_size``.
        """
        return self._predict(batch, keep_features=False)[0]

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, list[torch.Tensor] | None]:
        """Like :meth:`predict`, and also each row's Grad-CAM target activations (K, h, w), float32.

        The activations are None where a Grad-CAM from them would differ from a float32 re-run of the
        network: under autocast (reduced precision), for TorchScript or series models, and for
        architectures whose head :func:`cam_head` does not know.
        """
        return self._predict(batch, keep_features=self._features_possible())

    def _features_possible(self) -> bool:
        return (
            self.autocast_dtype is None
            and self.card.task == "image-classification"
            and self.card.architecture != "torchscript"
            and cam_head(self.network, self.card) is not None
        )

    def _predict(
        self, batch: np.ndarray, *, keep_features: bool
    ) -> tuple[np.ndarray, list[torch.Tensor] | None]:
        if self.card.task != "image-classification":
            raise ValueError(f"model {self.card.name} is a {self.card.task} model: use predict_volume")
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.card.labels)), dtype=np.float32), [] if keep_features else None
        graph = self._graph()
        outputs: list[np.ndarray] = []
        captured: list[torch.Tensor] = []
        handle = None
        threads = torch.get_num_threads()
        if self.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        if keep_features and graph is None:

            def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
                captured.append(output)

            handle = cam_target_layer(self.network, self.card).register_forward_hook(keep)
        try:
            with torch.inference_mode():
                for start in range(0, batch.shape[0], self.max_batch_size):
                    tensor = self.to_input(batch[start : start + self.max_batch_size])
                    if graph is not None:
                        logits, features = graph(tensor)
                        if keep_features:
                            captured.append(features)
                    else:
                        logits = self._forward(tensor)
                    probs = probabilities_from_logits(logits, self.card)
                    outputs.append(probs.cpu().numpy().astype(np.float32))
        finally:
            if handle is not None:
                handle.remove()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        probabilities = np.concatenate(outputs, axis=0)
        if not keep_features:
            return probabilities, None
        kept: list[torch.Tensor] = []
        with torch.inference_mode(False):  # clones of inference tensors made here can enter autograd
            for chunk in captured:
                kept.extend(chunk.float().clone().unbind(0))
        return probabilities, kept if len(kept) == batch.shape[0] else None

    def _graph(self) -> torch.jit.ScriptModule | None:
        """The network frozen into one TorchScript graph returning (logits, Grad-CAM activations).

        CPU float32 only. A frozen graph runs without holding Python's GIL, so the worker's other
        threads do not stall the forward pass (an eager forward makes hundreds of GIL hand-overs:
        1.5 instead of 30 images/s beside one busy Python thread on 2 cores; 14-24 frozen), freezing
        folds batch norm into the convolutions and ``optimize_for_inference`` keeps oneDNN's layout
        between them (30-40 against 45-57 ms per image at batch 8 on one thread). Built when the
        runner loads and checked against the eager network (within 1e-5); where tracing fails or
        differs, the eager network runs.
        """
        if not self._frozen_tried:
            self._frozen_tried = True
            self._frozen = self._freeze()
        return self._frozen

    def _freeze(self) -> torch.jit.ScriptModule | None:
        if self.device.type != "cpu" or not self._features_possible():
            return None
        started = time.perf_counter()
        try:
            wrapper = _LogitsAndFeatures(self.network, cam_target_layer(self.network, self.card))
            generator = torch.Generator().manual_seed(0)
            example = self.to_input(torch.rand((2, *self.input_shape), generator=generator).numpy())
            check = self.to_input(torch.rand((3, *self.input_shape), generator=generator).numpy())
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings (shapes are fixed by the card), deprecation
                traced = torch.jit.trace(wrapper, example, check_trace=False).eval()  # type: ignore[no-untyped-call]
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                expected, expected_features = wrapper(check)
                logits, features = frozen(check)
            if not (
                torch.allclose(logits, expected, rtol=0.0, atol=1e-5)
                and torch.allclose(features, expected_features, rtol=1e-4, atol=1e-5)
            ):
                logger.info("frozen graph of %s differs from the network; running it eagerly", self.card.name)
                return None
        except Exception as exc:  # any tracing problem: the eager network is always correct
            logger.info("cannot freeze %s (%s); running it eagerly", self.card.name, type(exc).__name__)
            return None
        logger.info("froze %s into one graph in %.2f s", self.card.name, time.perf_counter() - started)
        return frozen

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


class _LogitsAndFeatures(nn.Module):
    """The network returning its logits and the Grad-CAM target layer's output (for tracing)."""

    def __init__(self, network: nn.Module, target: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.target = target
        self._captured: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        handle = self.target.register_forward_hook(self._keep)
        try:
            logits = self.network(x)
        finally:
            handle.remove()
        return logits, self._captured[-1]

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._captured.append(output)


def _check_device(device: torch.device) -> None:
    """Refuse a CUDA device this machine lacks before the weights are read: torch's error about
    deserialising onto CUDA blamed the weights file, not the setting."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index or 0
    if index >= count:
        found = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
        raise ConfigurationError(
            "worker.device",
            f"{str(device)!r} but torch finds {found} on this machine; "
            'set worker.device = "cpu" or "auto" (auto uses a GPU when there is one)',
        )


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
