"""Keras' Xception (Chollet 2017) in torch, with the classification head of the packaged model.

Written to reproduce ``keras.applications.Xception`` numerically so that Keras-trained weights run
without TensorFlow: batch norm with Keras' epsilon 1e-3, and Keras' "same" padding, which for a
stride-2 window on an even-sized input pads only after (right/bottom), unlike torch's symmetric
padding. Module names follow the Keras layer names (``block2.sepconv1_bn`` for
``block2_sepconv1_bn``) so that :mod:`dicomnode.lifecycle.keras_import` maps weights by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (torch convention)
from torch import nn

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # torch's momentum = 1 - Keras' 0.99 (matters only for training)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


def same_padding(length: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras/TensorFlow "same" padding of one dimension: (before, after), the extra pixel after."""
    out = (length + stride - 1) // stride
    total = max((out - 1) * stride + kernel - length, 0)
    return total // 2, total - total // 2


class SameMaxPool2d(nn.Module):
    """Max pooling with Keras' "same" padding (pads with -inf, asymmetrically when needed)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class SeparableConv2d(nn.Module):
    """Keras' SeparableConv2D (3x3 depthwise then 1x1 pointwise, no bias, stride 1, "same")."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pointwise(self.depthwise(x))
        return out


class DownBlock(nn.Module):
    """Entry/exit-flow block: two separable convs, a strided max pool, and a 1x1 strided shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pre_activation: bool) -> None:
        super().__init__()
        self.pre_activation = pre_activation
        self.sepconv1 = SeparableConv2d(in_channels, mid_channels)
        self.sepconv1_bn = _bn(mid_channels)
        self.sepconv2 = SeparableConv2d(mid_channels, out_channels)
        self.sepconv2_bn = _bn(out_channels)
        self.pool = SameMaxPool2d(3, 2)
        # Keras' 1x1 stride-2 "same" conv needs no padding for any input size.
        self.residual_conv = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.residual_bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.residual_bn(self.residual_conv(x))
        y = F.relu(x) if self.pre_activation else x
        y = F.relu(self.sepconv1_bn(self.sepconv1(y)))
        y = self.pool(self.sepconv2_bn(self.sepconv2(y)))
        out: torch.Tensor = y + residual
        return out


class MiddleBlock(nn.Module):
    """Middle-flow block: three (ReLU, separable conv, BN) with an identity shortcut."""

    def __init__(self, channels: int = 728) -> None:
        super().__init__()
        self.sepconv1 = SeparableConv2d(channels, channels)
        self.sepconv1_bn = _bn(channels)
        self.sepconv2 = SeparableConv2d(channels, channels)
        self.sepconv2_bn = _bn(channels)
        self.sepconv3 = SeparableConv2d(channels, channels)
        self.sepconv3_bn = _bn(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sepconv1_bn(self.sepconv1(F.relu(x)))
        y = self.sepconv2_bn(self.sepconv2(F.relu(y)))
        y = self.sepconv3_bn(self.sepconv3(F.relu(y)))
        out: torch.Tensor = y + x
        return out


class Xception(nn.Module):
    """Xception backbone + global average pooling + optional hidden dense layer + output layer.

    The output is logits; the runner applies the card's softmax or sigmoid. ``block14_sepconv2_act``
    is the last activation before pooling: the Grad-CAM target.
    """

    def __init__(
        self, num_classes: int = 2, in_channels: int = 3, hidden_units: int = 0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.block1_conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, bias=False)  # "valid"
        self.block1_conv1_bn = _bn(32)
        self.block1_conv2 = nn.Conv2d(32, 64, 3, bias=False)  # "valid"
        self.block1_conv2_bn = _bn(64)
        self.block2 = DownBlock(64, 128, 128, pre_activation=False)
        self.block3 = DownBlock(128, 256, 256, pre_activation=True)
        self.block4 = DownBlock(256, 728, 728, pre_activation=True)
        self.middle = nn.Sequential(*(MiddleBlock(728) for _ in range(8)))  # Keras blocks 5..12
        self.block13 = DownBlock(728, 728, 1024, pre_activation=True)
        self.block14_sepconv1 = SeparableConv2d(1024, 1536)
        self.block14_sepconv1_bn = _bn(1536)
        self.block14_sepconv2 = SeparableConv2d(1536, 2048)
        self.block14_sepconv2_bn = _bn(2048)
        self.block14_sepconv2_act = nn.ReLU()
        self.dense: nn.Linear | None = nn.Linear(2048, hidden_units) if hidden_units else None
        self.dropout = nn.Dropout(dropout)
        self.dense_out = nn.Linear(hidden_units or 2048, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone: the last convolutional feature map (N, 2048, h, w)."""
        x = F.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = F.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        x = self.block2(x)
        x = self.block3(x)
        x = self.block4(x)
        x = self.middle(x)
        x = self.block13(x)
        x = F.relu(self.block14_sepconv1_bn(self.block14_sepconv1(x)))
        out: torch.Tensor = self.block14_sepconv2_act(self.block14_sepconv2_bn(self.block14_sepconv2(x)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the last feature map: global average pooling and the dense layers."""
        x = features.mean(dim=(2, 3))
        if self.dense is not None:
            x = F.relu(self.dense(x))
        out: torch.Tensor = self.dense_out(self.dropout(x))
        return out
