"""Image classifiers for membership-inference audits: plain ``nn.Module`` s returning logits.

Registered names (``build_model(name, num_classes, input_shape, **options)``):

- ``"lenet"``: :class:`LeNet` of the MI-Attack authors (MNIST in Rezaei & Liu 2021); option ``padding``.
- ``"alexnet"``: :class:`AlexNet`, bearpaw's CIFAR AlexNet.
- ``"resnet"``: :class:`ResNet`, CIFAR ResNet; options ``depth`` (default 110), ``block_name``.
  Aliases ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110`` (basic blocks) and
  ``resnet164`` (bottleneck blocks).
- ``"densenet"``: :class:`DenseNet`, CIFAR DenseNet-BC; options ``depth`` (default 100), ``growth_rate``
  (12), ``reduction`` (0.5), ``bottleneck`` (True), ``drop_rate`` (0). Aliases ``densenet_bc_100``,
  ``densenet_bc_40`` (k = 12).

Every model takes any channel count and image size its pooling allows (all of them 8x8, 28x28 and 32x32;
an impossible ``input_shape`` is a ``ValueError`` at construction), registers its leaf modules in the order
forward runs them, each running once (no shared or in-place modules, so forward hooks see every activation
and captured outputs stay intact), and ends with one ``nn.Linear`` producing the logits. On 32x32 images the
CIFAR models compute exactly bearpaw/pytorch-classification's networks (same layers and parameter counts).

Example:
    >>> import torch
    >>> from lightning_mia.models import build_model
    >>> model = build_model("lenet", num_classes=10, input_shape=(1, 8, 8))
    >>> model(torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
"""
from lightning_mia.models.registry import MODELS, build_model, register_alias  # noqa: I001  (registry first)
from lightning_mia.models.lenet import LeNet
from lightning_mia.models.alexnet import AlexNet
from lightning_mia.models.resnet import BasicBlock, Bottleneck, ResNet
from lightning_mia.models.densenet import DenseNet, DenseLayer, Transition

__all__ = [
    "MODELS",
    "build_model",
    "register_alias",
    "LeNet",
    "AlexNet",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "DenseLayer",
    "Transition",
]
