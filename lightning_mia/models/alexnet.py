"""AlexNet for CIFAR, after bearpaw/pytorch-classification ``models/cifar/alexnet.py`` (Wei Yang).

That recipe keeps AlexNet's five convolutions ("One weird trick", Krizhevsky 2014, arXiv:1404.5997), adjusts
the paddings for 32x32 images and drops the fully connected hidden layers: a single Linear(256, classes).
bearpaw's README: 2.47M parameters on CIFAR-10; the models Rezaei & Liu (CVPR 2021) attack.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lightning_mia.models.registry import MODELS, check_forward, check_input_shape, check_num_classes

__all__ = ["AlexNet"]


class AlexNet(nn.Module):
    """CIFAR AlexNet: conv 64@11x11/4 (pad 5), max-pool 2, conv 192@5x5, max-pool 2, conv 384@3x3,
    conv 256@3x3, conv 256@3x3, max-pool, Linear(256, num_classes); ReLU after every convolution.

    Layer sizes, strides and paddings are bearpaw's (``models/cifar/alexnet.py``); on 32x32 inputs the network
    is that model exactly (2,472,266 parameters for 10 classes; README: 2.47M). Two changes let other
    image sizes through, neither of which alters anything on 32x32 (all feature maps there have even sizes
    8, 4, 2): the first two max-pools use ``ceil_mode=True``, so odd maps (7x7 for 28x28 MNIST) keep their
    border instead of collapsing, and the last ``MaxPool2d(2)`` (2x2 -> 1x1 on CIFAR) is an
    ``AdaptiveMaxPool2d(1)``, so the classifier always receives 256 features.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image.

    Example:
        >>> import torch
        >>> model = AlexNet(num_classes=10, input_shape=(1, 28, 28))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32)) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        shape = check_input_shape(input_shape)
        self.input_shape = shape
        # Separate ReLU modules (not one shared, not in-place) so forward hooks on leaves see each activation
        # once and captured outputs are not overwritten afterwards.
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 64, kernel_size=11, stride=4, padding=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(256, num_classes)
        check_forward(self, shape, "AlexNet")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("alexnet")
def alexnet(num_classes: int, input_shape: Sequence[int]) -> AlexNet:
    """Build :class:`AlexNet`."""
    return AlexNet(num_classes=num_classes, input_shape=input_shape)
