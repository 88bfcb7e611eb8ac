"""Weight initialisation shared by the CIFAR-style models."""
from __future__ import annotations

from torch import nn


def bearpaw_init(model: nn.Module) -> None:
    """bearpaw/pytorch-classification's initialisation (models/cifar/resnet.py, densenet.py): He-normal
    (fan-out) convolutions, BatchNorm weight 1 and bias 0; Linear layers keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
