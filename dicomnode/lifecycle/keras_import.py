"""Keras 3 ``.keras`` archives -> torch state dicts, with h5py only (no TensorFlow, no Keras).

A ``.keras`` file is a zip holding ``config.json`` (the layer graph) and ``model.weights.h5``. Keras 3
stores each layer's variables under a name made from its *class* (``conv2d``, ``conv2d_1``, ...,
``batch_normalization_7``) numbered in the order of the model's layer list, not under the layer's
own name; :func:`keras_layer_weights` replays that numbering from ``config.json`` to recover which
arrays belong to which named layer. Layouts: Conv2D kernels HWIO -> OIHW, depthwise kernels
(H, W, C, 1) -> (C, 1, H, W), Dense kernels (in, out) -> (out, in), BatchNormalization variables
gamma, beta, moving_mean, moving_variance.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

_CONTAINER_CLASSES = {"Functional", "Sequential", "Model"}


def keras_snake_case(class_name: str) -> str:
    """Keras 3's snake-case form of a class name (``SeparableConv2D`` -> ``separable_conv2d``)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the archive's graph, with its variables as stored."""

    path: str  # config names from the outer model inwards, joined by "/", e.g. "xception/block1_conv1"
    class_name: str
    config: dict[str, Any]
    weights: tuple[np.ndarray, ...]


def read_keras_archive(archive: Path | str) -> tuple[dict[str, Any], list[KerasLayer]]:
    """Read a ``.keras`` zip: (the model config, every layer in graph order with its variables)."""
    with zipfile.ZipFile(archive) as zf:
        config = json.loads(zf.read("config.json"))
        weights_bytes = zf.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
        layers = keras_layer_weights(config, h5)
    return config, layers


def keras_layer_weights(config: dict[str, Any], h5: h5py.File) -> list[KerasLayer]:
    """Pair every layer of ``config`` with its variables in ``h5``, replaying Keras' save names."""
    result: list[KerasLayer] = []
    consumed: set[str] = set()
    _walk(config["config"]["layers"], "layers", "", h5, result, consumed)
    stored: set[str] = set()
    h5.visititems(lambda name, obj: stored.add(name) if isinstance(obj, h5py.Dataset) else None)
    unused = {name for name in stored if name.startswith("layers/")} - consumed
    if unused:
        raise ValueError(f"weights not matched to any layer: {sorted(unused)[:5]}")
    return result


def _walk(
    layers: list[dict[str, Any]],
    h5_prefix: str,
    path_prefix: str,
    h5: h5py.File,
    result: list[KerasLayer],
    consumed: set[str],
) -> None:
    used: dict[str, int] = {}
    for layer in layers:
        class_name = layer["class_name"]
        saved = keras_snake_case(class_name)
        if saved in used:
            used[saved] += 1
            saved = f"{saved}_{used[saved]}"
        else:
            used[saved] = 0
        name = layer["config"]["name"]
        path = f"{path_prefix}{name}"
        group_path = f"{h5_prefix}/{saved}"
        if class_name in _CONTAINER_CLASSES:
            _walk(layer["config"]["layers"], f"{group_path}/layers", f"{path}/", h5, result, consumed)
            continue
        arrays: list[np.ndarray] = []
        variables = h5.get(f"{group_path}/vars")
        if variables is not None:
            for index in range(len(variables)):
                consumed.add(f"{group_path}/vars/{index}")
                arrays.append(np.asarray(variables[str(index)], dtype=np.float32))
        result.append(
            KerasLayer(path=path, class_name=class_name, config=layer["config"], weights=tuple(arrays))
        )


@dataclass(frozen=True)
class ConvertedXception:
    """A Keras Xception classifier converted to :class:`~dicomnode.models.xception.Xception`."""

    state_dict: dict[str, torch.Tensor]
    input_size: tuple[int, int]  # (rows, columns)
    in_channels: int
    num_classes: int
    hidden_units: int
    dropout: float
    final_activation: str  # activation of the last Dense layer in Keras ("linear" = logits)
    keras_version: str


def _torch_prefix(keras_name: str) -> str:
    """``block2_sepconv1_bn`` -> ``block2.sepconv1_bn``; ``block7_sepconv1`` -> ``middle.2.sepconv1``."""
    match = re.fullmatch(r"block(\d+)_(.+)", keras_name)
    if match is None:
        raise ValueError(f"unexpected Xception layer name {keras_name!r}")
    block, rest = int(match.group(1)), match.group(2)
    if block in (1, 14):
        return keras_name
    if block in (2, 3, 4, 13):
        return f"block{block}.{rest}"
    if 5 <= block <= 12:
        return f"middle.{block - 5}.{rest}"
    raise ValueError(f"unexpected Xception block in {keras_name!r}")


def _put_bn(state: dict[str, torch.Tensor], prefix: str, layer: KerasLayer) -> None:
    if len(layer.weights) != 4:
        raise ValueError(f"{layer.path}: expected gamma, beta, moving mean and variance")
    gamma, beta, mean, var = layer.weights
    state[f"{prefix}.weight"] = torch.from_numpy(gamma)
    state[f"{prefix}.bias"] = torch.from_numpy(beta)
    state[f"{prefix}.running_mean"] = torch.from_numpy(mean)
    state[f"{prefix}.running_var"] = torch.from_numpy(var)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)


def _conv_kernel(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def _depthwise_kernel(kernel: np.ndarray) -> torch.Tensor:
    if kernel.shape[3] != 1:
        raise ValueError("depth_multiplier other than 1 is not supported")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(2, 3, 0, 1)))  # (C, 1, H, W)


def convert_keras_xception(archive: Path | str) -> ConvertedXception:
    """Convert a Keras Xception transfer-learning model (backbone + GAP + Dense head) to torch."""
    _, layers = read_keras_archive(archive)
    keras_version = ""
    with zipfile.ZipFile(archive) as zf:
        if "metadata.json" in zf.namelist():
            keras_version = str(json.loads(zf.read("metadata.json")).get("keras_version", ""))

    inputs = [layer for layer in layers if layer.class_name == "InputLayer"]
    batch_shape = inputs[0].config.get("batch_shape") or inputs[0].config.get("batch_input_shape")
    if not batch_shape or len(batch_shape) != 4:
        raise ValueError("the archive's input layer has no (batch, rows, columns, channels) shape")
    _, rows, cols, in_channels = batch_shape

    state: dict[str, torch.Tensor] = {}
    residual_blocks = iter((2, 3, 4, 13))
    residual_bn_blocks = iter((2, 3, 4, 13))
    dense_layers: list[KerasLayer] = []
    dropout = 0.0
    has_pooling = False
    for layer in layers:
        local = layer.path.rsplit("/", 1)[-1]
        nested = "/" in layer.path
        if layer.class_name == "Conv2D":
            if local.startswith("block"):
                state[f"{_torch_prefix(local)}.weight"] = _conv_kernel(layer.weights[0])
            else:
                state[f"block{next(residual_blocks)}.residual_conv.weight"] = _conv_kernel(layer.weights[0])
        elif layer.class_name == "SeparableConv2D":
            prefix = _torch_prefix(local)
            state[f"{prefix}.depthwise.weight"] = _depthwise_kernel(layer.weights[0])
            state[f"{prefix}.pointwise.weight"] = _conv_kernel(layer.weights[1])
        elif layer.class_name == "BatchNormalization":
            if local.startswith("block"):
                _put_bn(state, _torch_prefix(local), layer)
            else:
                _put_bn(state, f"block{next(residual_bn_blocks)}.residual_bn", layer)
        elif layer.class_name == "Dense" and not nested:
            dense_layers.append(layer)
        elif layer.class_name == "Dropout" and not nested:
            dropout = float(layer.config.get("rate", 0.0))
        elif layer.class_name in ("GlobalAveragePooling2D",):
            has_pooling = True
        elif layer.class_name not in ("InputLayer", "Activation", "Add", "MaxPooling2D"):
            raise ValueError(f"layer {layer.path} ({layer.class_name}) is not part of a Keras Xception model")
    if not has_pooling or not 1 <= len(dense_layers) <= 2:
        raise ValueError("expected GlobalAveragePooling2D followed by one or two Dense layers")

    hidden_units = 0
    if len(dense_layers) == 2:
        hidden = dense_layers[0]
        if hidden.config.get("activation") != "relu":
            raise ValueError("the hidden Dense layer must use ReLU")
        hidden_units = int(hidden.config["units"])
        state["dense.weight"] = torch.from_numpy(np.ascontiguousarray(hidden.weights[0].T))
        state["dense.bias"] = torch.from_numpy(hidden.weights[1])
    out = dense_layers[-1]
    state["dense_out.weight"] = torch.from_numpy(np.ascontiguousarray(out.weights[0].T))
    state["dense_out.bias"] = torch.from_numpy(out.weights[1])
    return ConvertedXception(
        state_dict=state,
        input_size=(int(rows), int(cols)),
        in_channels=int(in_channels),
        num_classes=int(out.config["units"]),
        hidden_units=hidden_units,
        dropout=dropout,
        final_activation=str(out.config.get("activation", "linear")),
        keras_version=keras_version,
    )
