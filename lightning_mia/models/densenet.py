"""CIFAR DenseNet / DenseNet-BC (Huang et al., CVPR 2017), after bearpaw/pytorch-classification
``models/cifar/densenet.py``.

A 3x3 stem with ``2 * growth_rate`` channels, three dense blocks joined by transitions (BN-ReLU-conv1x1
compressing channels by ``reduction``, avg-pool 2), then BN-ReLU, global average pooling and one Linear layer.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_mia.models.init import bearpaw_init

from lightning_mia.models.registry import (
    MODELS,
    check_forward,
    check_input_shape,
    check_num_classes,
    register_alias,
)

__all__ = ["DenseNet", "DenseLayer", "Transition"]


class DenseLayer(nn.Module):
    """One dense layer: (BN-ReLU-conv1x1 to ``4 * growth_rate`` if ``bottleneck``) BN-ReLU-conv3x3 to
    ``growth_rate`` channels, [dropout], concatenated to its input."""

    # Bottleneck width 4k: Huang et al. 2017, section 3 ("we let each 1x1 convolution produce 4k feature-maps").
    bottleneck_width = 4

    def __init__(self, in_planes: int, growth_rate: int, bottleneck: bool, drop_rate: float) -> None:
        super().__init__()
        if bottleneck:
            planes = self.bottleneck_width * growth_rate
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.relu1 = nn.ReLU()
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
            in_planes = planes
        self.bottleneck = bottleneck
        self.bn2 = nn.BatchNorm2d(in_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_planes, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x))) if self.bottleneck else x
        out = self.conv2(self.relu2(self.bn2(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        return torch.cat((x, out), dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (``in_planes -> out_planes``) then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC (default) or plain DenseNet with three dense blocks.

    ``depth`` counts the weighted layers: stem + 2 per bottleneck dense layer (1 without bottleneck) in each of
    the three blocks + 2 transitions + the Linear layer, so ``depth = 6n + 4`` for DenseNet-BC (n dense layers
    per block; ``3n + 4`` without bottleneck). Defaults ``depth=100, growth_rate=12, reduction=0.5`` are the
    DenseNet-BC (L=100, k=12) of Huang et al. 2017 (Table 2: 0.8M params) and of bearpaw's CIFAR recipe
    (TRAINING.md; README: 0.77M). Its exact count for 10 classes is 769,162; for 100 classes 800,032.

    As in bearpaw: stem ``Conv3x3(C, 2k)`` (Huang et al. 2017 use 2k for BC), transition width
    ``floor(channels * reduction)`` (bearpaw's ``compressionRate=2`` is ``reduction=0.5``), dropout after
    each 3x3 convolution when ``drop_rate > 0`` (default 0: the recipe trains with augmentation, no dropout), the
    same initialisation (He-normal fan-out convolutions, BatchNorm 1/0). Deviations that do not change the
    function on 32x32 inputs: ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(8)`` (any input size works),
    ``input_shape[0]`` stem channels, and separate non in-place ReLU modules so each leaf module runs once per
    forward in registration order and hooked outputs are not overwritten.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image (H and W at least 4: two transitions halve them).
        depth: ``6n+4`` with ``bottleneck=True``, ``3n+4`` otherwise (n >= 1).
        growth_rate: channels added by each dense layer (k).
        reduction: transition compression factor in (0, 1].
        bottleneck: use the 1x1 bottleneck convolution (the "B" of DenseNet-BC).
        drop_rate: dropout probability after each 3x3 convolution in dense layers, in [0, 1).

    Example:
        >>> import torch
        >>> model = DenseNet(num_classes=10, input_shape=(3, 32, 32), depth=10, growth_rate=4)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), depth: int = 100,
                 growth_rate: int = 12, reduction: float = 0.5, bottleneck: bool = True,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        shape = check_input_shape(input_shape)
        if not isinstance(bottleneck, bool):
            raise ValueError(f"bottleneck must be True or False, got {bottleneck!r}")
        step = 6 if bottleneck else 3
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < step + 4 or (depth - 4) % step:
            raise ValueError(f"depth for bottleneck={bottleneck} must be {step}n+4 with n >= 1 "
                             f"(e.g. {', '.join(str(step * n + 4) for n in (1, 6, 16))}), got {depth!r}")
        if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"growth_rate must be an integer >= 1, got {growth_rate!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction <= 1:
            raise ValueError(f"reduction must be a number in (0, 1], got {reduction!r}")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        n = (depth - 4) // step
        self.input_shape = shape
        self.depth = depth
        self.growth_rate = growth_rate

        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(shape[0], planes, kernel_size=3, padding=1, bias=False)
        blocks = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth_rate, bottleneck, float(drop_rate)))
                planes += growth_rate
            blocks.append(nn.Sequential(*layers))
            if i < 2:
                out_planes = int(math.floor(planes * reduction))
                if out_planes < 1:
                    raise ValueError(f"reduction={reduction} leaves no channels after a transition of "
                                     f"{planes} channels")
                blocks.append(Transition(planes, out_planes))
                planes = out_planes
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = blocks
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        self.reset_parameters()
        check_forward(self, shape, f"DenseNet-{depth}")

    def reset_parameters(self) -> None:
        """bearpaw's initialisation (:func:`lightning_mia.models.init.bearpaw_init`)."""
        bearpaw_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@MODELS.register("densenet")
def densenet(num_classes: int, input_shape: Sequence[int], depth: int = 100, growth_rate: int = 12,
             reduction: float = 0.5, bottleneck: bool = True, drop_rate: float = 0.0) -> DenseNet:
    """Build :class:`DenseNet`; defaults are DenseNet-BC (L=100, k=12), bearpaw's CIFAR recipe (TRAINING.md)."""
    return DenseNet(num_classes=num_classes, input_shape=input_shape, depth=depth, growth_rate=growth_rate,
                    reduction=reduction, bottleneck=bottleneck, drop_rate=drop_rate)


# DenseNet-BC (L=100, k=12): Huang et al. 2017 Table 2 / bearpaw README. L=40, k=12: a small BC variant for
# CPU runs (the L=40 row of Huang et al. is the plain DenseNet; here it is BC with 6 dense layers per block).
register_alias("densenet_bc_100", "densenet", depth=100, growth_rate=12, bottleneck=True)
register_alias("densenet_bc_40", "densenet", depth=40, growth_rate=12, bottleneck=True)
