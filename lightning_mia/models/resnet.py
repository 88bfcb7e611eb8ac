"""CIFAR ResNet (He et al., CVPR 2016, section 4.2), after bearpaw/pytorch-classification ``models/cifar/resnet.py``.

A 3x3 stem with 16 channels, three stages of ``n`` residual blocks with 16/32/64 base channels (stride 2 at
the start of stages 2 and 3), global average pooling and one Linear layer. Shortcuts that change shape are
1x1 convolution + BatchNorm projections (bearpaw's, i.e. He et al.'s option B).
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

from torch import Tensor, nn

from lightning_mia.models.init import bearpaw_init

from lightning_mia.models.registry import (
    MODELS,
    check_forward,
    check_input_shape,
    check_num_classes,
    register_alias,
)

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut. ReLUs are separate, not in-place modules (see :class:`ResNet`)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Registered after bn2 and before relu2 because that is when forward runs it.
        self.downsample = _projection(in_planes, planes * self.expansion, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 (reduce) - 3x3 - 1x1 (expand x4) conv-BN layers plus shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        # Stride on the 3x3 convolution, as in bearpaw.
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _projection(in_planes, planes * self.expansion, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + shortcut)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# bearpaw's spelling of block_name ("BasicBlock" / "Bottleneck"), accepted case-insensitively.
_BLOCK_SPELLINGS = {"basic": "basic", "basicblock": "basic", "bottleneck": "bottleneck"}


class ResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2`` (basic blocks) or ``9n+2`` (bottleneck blocks).

    Numbers from the recipe: 16/32/64 base channels and 3 stages (He et al. 2016, section 4.2); weights
    initialised as in bearpaw (convolutions ``N(0, sqrt(2 / (k*k*out_channels)))``, BatchNorm 1/0, Linear with
    PyTorch's default). Parameter counts for 10 classes: ResNet-20 272,474 (0.27M in He et al.), ResNet-110
    1,730,714 (1.7M). bearpaw's README row "ResNet-110, 1.70M" was trained with an older version of its file
    that switched to bottleneck blocks from depth 44 and still used ``n = (depth-2)/6``: that network is
    ``ResNet(depth=164, block_name="bottleneck")`` here (18 bottleneck blocks per stage, 1,704,154 params).

    Deviations, none of which changes the function computed on 32x32 inputs: the final ``AvgPool2d(8)`` is an
    ``AdaptiveAvgPool2d(1)`` (same on the 8x8 map CIFAR gives, and any input size works); the stem takes
    ``input_shape[0]`` channels; ReLUs are separate, non in-place modules, so each leaf module runs once per
    forward in registration order and outputs captured by forward hooks are not overwritten later.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image.
        depth: total number of weighted layers, ``6n+2`` for ``"basic"``, ``9n+2`` for ``"bottleneck"``.
        block_name: ``"basic"`` or ``"bottleneck"`` (bearpaw's ``"BasicBlock"`` / ``"Bottleneck"`` also work).

    Example:
        >>> import torch
        >>> model = ResNet(num_classes=10, input_shape=(3, 32, 32), depth=20)
        >>> sum(p.numel() for p in model.parameters())
        272474
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), depth: int = 110,
                 block_name: str = "basic") -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        shape = check_input_shape(input_shape)
        key = _BLOCK_SPELLINGS.get(block_name.lower()) if isinstance(block_name, str) else None
        if key is None:
            raise ValueError(f"block_name must be one of {sorted(_BLOCKS)}, got {block_name!r}")
        block: Type[Union[BasicBlock, Bottleneck]] = _BLOCKS[key]
        # Each basic block has 2 weighted layers, each bottleneck 3; plus the stem conv and the Linear layer.
        per_block = 2 if key == "basic" else 3
        step = 3 * per_block
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < step + 2 or (depth - 2) % step:
            raise ValueError(f"depth for block_name={key!r} must be {step}n+2 with n >= 1 "
                             f"(e.g. {', '.join(str(step * n + 2) for n in (1, 3, 6, 18))}), got {depth!r}")
        n = (depth - 2) // step
        self.input_shape = shape
        self.depth = depth
        self.block_name = key
        self.conv1 = nn.Conv2d(shape[0], 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self._in_planes = 16
        self.layer1 = self._make_layer(block, 16, n, stride=1)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        del self._in_planes
        self.reset_parameters()
        check_forward(self, shape, f"ResNet-{depth}")

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """bearpaw's initialisation (:func:`lightning_mia.models.init.bearpaw_init`)."""
        bearpaw_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@MODELS.register("resnet")
def resnet(num_classes: int, input_shape: Sequence[int], depth: int = 110, block_name: str = "basic") -> ResNet:
    """Build :class:`ResNet`; the default depth 110 is bearpaw's CIFAR recipe (TRAINING.md)."""
    return ResNet(num_classes=num_classes, input_shape=input_shape, depth=depth, block_name=block_name)


# The CIFAR depths of He et al. 2016 (Table 6) and the bottleneck ResNet-164 of He et al. 2016b
# ("Identity mappings", Table 2; also bearpaw's legacy "ResNet-110", see ResNet's docstring).
for _depth in (20, 32, 44, 56, 110):
    register_alias(f"resnet{_depth}", "resnet", depth=_depth, block_name="basic")
register_alias("resnet164", "resnet", depth=164, block_name="bottleneck")
