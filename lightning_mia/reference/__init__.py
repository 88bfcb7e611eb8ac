"""Reference ("shadow") models for LiRA / RMIA, trained live beside the target.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_mia.module import ImageClassifier
    >>> from lightning_mia.reference import ReferenceEnsemble
    >>> population = TensorDataset(torch.randn(20, 1, 8, 8), torch.arange(20) % 2, torch.arange(20))
    >>> ens = ReferenceEnsemble(ImageClassifier("lenet", num_classes=2, input_shape=(1, 8, 8)), count=2)
    >>> ens.setup(population); _ = ens.train_epoch()
    >>> ens.logits(population, range(5)).shape
    torch.Size([2, 5, 2])
"""
from .ensemble import STATE_FORMAT, ReferenceEnsemble, default_in_mask
from .optim import ELEMENTWISE_OPTIMIZERS, OptimizerRecipe, TrainerStandIn, parse_optimizers

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "OptimizerRecipe",
    "ReferenceEnsemble",
    "STATE_FORMAT",
    "TrainerStandIn",
    "default_in_mask",
    "parse_optimizers",
]
