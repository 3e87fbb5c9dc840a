"""CheXNet-style DenseNet-121 (MONAI's implementation) and the key mapping for foreign weights.

The network is always built untrained (``pretrained=False``: no downloads) and then filled from the
package's weights file. Three state-dict layouts are accepted, chosen by the card's
``architecture_parameters.key_layout``:

* ``monai`` - keys as MONAI names them (``features.denseblock1.denselayer1.layers.conv1.weight``,
  ``class_layers.out.weight``);
* ``torchvision`` - torchvision's ``densenet121`` (``...denselayer1.conv1.weight``, ``classifier.*``,
  also the legacy ``norm.1``/``conv.2`` spellings);
* ``torchxrayvision`` - TorchXRayVision's ``xrv.models.DenseNet``, which uses torchvision's module
  names (``features.*`` + ``classifier``) and the same forward pass (features -> ReLU -> global
  average pool -> linear), so its ``state_dict()`` maps like torchvision's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from monai.networks.nets.densenet import DenseNet121

_LAYER_KEY = re.compile(
    r"^(?P<prefix>.*denselayer\d+)\.(?P<kind>norm|relu|conv)\.?(?P<index>[12])\.(?P<param>.+)$"
)


def build_densenet121(num_classes: int, in_channels: int, dropout: float = 0.0) -> DenseNet121:
    """An untrained 2-D DenseNet-121 with ``in_channels`` inputs and ``num_classes`` logits."""
    return DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob=dropout,
        pretrained=False,
    )


def to_monai_keys(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a torchvision or TorchXRayVision DenseNet state dict to MONAI's module names.

    Keys of TorchXRayVision models that are not weights (none in current releases; ``op_threshs``
    is a plain attribute, not a buffer) are dropped only if they are not tensors.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if layout == "monai":
        return state
    if layout not in ("torchvision", "torchxrayvision"):
        raise ValueError(f"unknown DenseNet key layout {layout!r}")
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            key = f"{match['prefix']}.layers.{match['kind']}{match['index']}.{match['param']}"
        elif key.startswith("classifier."):
            key = "class_layers.out." + key.removeprefix("classifier.")
        result[key] = value
    return result
