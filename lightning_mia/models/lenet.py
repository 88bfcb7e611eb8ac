"""LeNet as used for MNIST by Rezaei & Liu (CVPR 2021).

Source of the architecture: ``train_target_model.py`` of the authors' code, https://github.com/shrezaei/MI-Attack
(Keras): Conv2D(6, 3x3, relu) -> AveragePooling2D() -> Conv2D(16, 3x3, relu) -> AveragePooling2D() -> Flatten
-> Dense(120, relu) -> Dense(84, relu) -> Dense(num_classes).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from lightning_mia.models.registry import MODELS, check_forward, check_input_shape, check_num_classes

__all__ = ["LeNet"]


def _valid_output_size(size: int, padding: int) -> int:
    # conv 3x3 stride 1 -> avg-pool 2 (floor) -> conv 3x3 -> avg-pool 2: spatial size after the last pool.
    size = (size + 2 * padding - 2) // 2
    return (size + 2 * padding - 2) // 2


class LeNet(nn.Module):
    """LeNet of the MI-Attack authors: conv 6@3x3, avg-pool 2, conv 16@3x3, avg-pool 2, FC 120, FC 84, FC classes.

    The authors' Keras model uses unpadded ("valid") 3x3 convolutions, which need images of at least 10x10.
    ``padding=None`` (default) keeps that for images large enough (MNIST 28x28: 16x5x5 = 400 features;
    CIFAR 32x32: 16x6x6 = 576) and switches both convolutions to ``padding=1`` ("same") for smaller images
    such as scikit-learn's 8x8 digits (16x2x2 = 64 features). Pass ``padding=0`` or ``1`` to force one.
    The flatten size is measured with a dummy forward at construction, so any input size works.

    Weights use Keras' default initialisation (Glorot-uniform kernels, zero biases), as in the authors' code.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image.
        padding: convolution padding, ``None`` for the automatic choice above.

    Example:
        >>> import torch
        >>> model = LeNet(num_classes=10, input_shape=(1, 8, 8))
        >>> model.conv1.padding, model(torch.zeros(4, 1, 8, 8)).shape
        ((1, 1), torch.Size([4, 10]))
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 padding: Optional[int] = None) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        shape = check_input_shape(input_shape)
        if padding is None:
            # Valid convolutions as in the paper's code whenever the image is big enough for them.
            padding = 0 if min(_valid_output_size(shape[1], 0), _valid_output_size(shape[2], 0)) >= 1 else 1
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be None (automatic) or an integer >= 0, got {padding!r}")
        self.input_shape = shape
        # Layer sizes 6, 16, 120, 84: MI-Attack train_target_model.py (the classic LeNet-5 widths).
        self.conv1 = nn.Conv2d(shape[0], 6, kernel_size=3, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=3, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        flat = check_forward(self, shape, "LeNet", fn=self._features).shape[1]
        self.fc1 = nn.Linear(flat, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults (the authors trained this model in Keras): Glorot-uniform weights, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _features(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.flatten(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self._features(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@MODELS.register("lenet")
def lenet(num_classes: int, input_shape: Sequence[int], padding: Optional[int] = None) -> LeNet:
    """Build :class:`LeNet`."""
    return LeNet(num_classes=num_classes, input_shape=input_shape, padding=padding)
