"""Seeded random images of any shape, with a tunable class signal: for tests and quick experiments."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from .base import IndexedTensorDataset, MIADataModule, Transform
from .transforms import RandomHorizontalFlip

__all__ = ["SyntheticDataModule", "make_synthetic"]


def make_synthetic(
    n: int, input_shape: Sequence[int], num_classes: int, signal: float, seed: int, stream: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``x = signal * prototype[y] + N(0, 1)`` with balanced labels in random order.

    Class prototypes depend only on ``seed`` (shared by both splits); labels and noise on ``(seed, stream)``.
    """
    proto_gen = torch.Generator().manual_seed(int(seed) * 1000 + 0)
    prototypes = torch.randn((num_classes, *input_shape), generator=proto_gen)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + 1 + int(stream))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *input_shape), generator=gen)
    return signal * prototypes[labels] + noise, labels


class SyntheticDataModule(MIADataModule):
    """Random Gaussian "images" with a class-dependent mean pattern, seeded and held in memory.

    Each class ``c`` has a random prototype ``p_c ~ N(0, I)`` of shape ``input_shape``; a sample of class
    ``c`` is ``signal * p_c + N(0, I)``. ``signal=0`` gives pure noise (nothing to learn: any train/test
    gap is memorisation), larger values make the task easier. Train and held-out splits are independent
    draws from the same distribution; labels are balanced.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of classes (>= 2).
        n_train / n_heldout: split sizes.
        signal: class signal strength (>= 0).
        augment: random horizontal flips on training batches (exercises the augmentation path in tests).
        batch_size, num_workers, seed, train_subset, heldout_subset, eval_batch_size, pin_memory:
            see :class:`~lightning_mia.data.MIADataModule`.

    Example:
        >>> dm = SyntheticDataModule(input_shape=(3, 4, 4), num_classes=3, n_train=30, n_heldout=12, seed=1)
        >>> dm.setup()
        >>> x, y, i = dm.member_dataset()[5]
        >>> tuple(x.shape), int(i), dm.num_classes
        ((3, 4, 4), 5, 3)
    """

    def __init__(
        self,
        input_shape: Tuple[int, int, int] = (1, 8, 8),
        num_classes: int = 10,
        n_train: int = 256,
        n_heldout: int = 256,
        signal: float = 1.0,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the MIADataModule options: batch_size, seed, train_subset, ...
        shape = tuple(input_shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"input_shape must be three positive integers (C, H, W), got {input_shape!r}")
        sizes = (("num_classes", num_classes, 2), ("n_train", n_train, 1), ("n_heldout", n_heldout, 1))
        for name, value, minimum in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(signal, bool) or not isinstance(signal, (int, float)) or signal < 0:
            raise ValueError(f"signal must be a number >= 0, got {signal!r}")
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}")
        self.input_shape = shape  # type: ignore[assignment]
        self.num_classes = num_classes
        self.n_train = n_train
        self.n_heldout = n_heldout
        self.signal = float(signal)
        self.augment = augment
        self.class_names = [str(i) for i in range(num_classes)]

    def _train_transform(self) -> Optional[Transform]:
        return RandomHorizontalFlip() if self.augment else None

    def _load_splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        def split(n: int, stream: int) -> IndexedTensorDataset:
            x, y = make_synthetic(n, self.input_shape, self.num_classes, self.signal, self.seed, stream)
            return IndexedTensorDataset(x, y, seed=self.seed)

        return split(self.n_train, 0), split(self.n_heldout, 1)
