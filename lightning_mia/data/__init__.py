"""Datamodules whose batches are ``(x, y, index)``: digits (embedded default), MNIST / Fashion-MNIST,
CIFAR-10/100 and synthetic data. None of them needs torchvision.

Example:
    >>> from lightning_mia.data import build_datamodule
    >>> dm = build_datamodule({"name": "synthetic", "n_train": 16, "n_heldout": 8}, batch_size=4)
    >>> dm.setup()
    >>> [t.shape[0] for t in next(iter(dm.train_dataloader()))]
    [4, 4, 4]
"""
from __future__ import annotations

from typing import Any, Mapping, Union

from ..registry import Registry
from .base import CorruptDataError, IndexedDataset, IndexedTensorDataset, MIADataModule, MissingDataError, seeded_subset
from .cifar import CIFARDataModule, load_cifar_arrays
from .digits import DigitsDataModule
from .mnist import MNISTDataModule, find_idx_files, read_idx
from .synthetic import SyntheticDataModule
from .transforms import Compose, RandomCrop, RandomHorizontalFlip, cifar_train_transform

__all__ = [
    "CIFARDataModule",
    "Compose",
    "CorruptDataError",
    "DATAMODULES",
    "DigitsDataModule",
    "IndexedDataset",
    "IndexedTensorDataset",
    "MIADataModule",
    "MNISTDataModule",
    "MissingDataError",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SyntheticDataModule",
    "build_datamodule",
    "cifar_train_transform",
    "find_idx_files",
    "load_cifar_arrays",
    "read_idx",
    "seeded_subset",
]

DATAMODULES = Registry("datamodule")
DATAMODULES.register("digits")(DigitsDataModule)
DATAMODULES.register("synthetic")(SyntheticDataModule)


@DATAMODULES.register("mnist")
def _mnist(**kwargs: Any) -> MNISTDataModule:
    return MNISTDataModule(dataset="mnist", **kwargs)


@DATAMODULES.register("fashion_mnist")
def _fashion_mnist(**kwargs: Any) -> MNISTDataModule:
    return MNISTDataModule(dataset="fashion_mnist", **kwargs)


@DATAMODULES.register("cifar10")
def _cifar10(**kwargs: Any) -> CIFARDataModule:
    return CIFARDataModule(dataset="cifar10", **kwargs)


@DATAMODULES.register("cifar100")
def _cifar100(**kwargs: Any) -> CIFARDataModule:
    return CIFARDataModule(dataset="cifar100", **kwargs)


def build_datamodule(spec: Union[str, Mapping[str, Any]], **defaults: Any) -> MIADataModule:
    """Build a datamodule from ``"name"`` or ``{"name": ..., **options}``; options override ``defaults``."""
    return DATAMODULES.build(spec, **defaults)
