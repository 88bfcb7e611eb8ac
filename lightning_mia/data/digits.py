"""scikit-learn's 8x8 digits: the embedded default data set (no download, no files)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch

from .base import IndexedTensorDataset, MIADataModule, _STREAM_SPLIT

__all__ = ["DigitsDataModule", "stratified_split"]

# Mean and std of all 1,797 images of sklearn.datasets.load_digits() scaled to [0, 1]
# (pixel values 0..16 divided by 16), computed once with numpy: 0.30526, 0.37605.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split positions into (train, held-out) with ``round(train_fraction * n_c)`` train samples per class.

    Both index arrays are sorted (original order). Every class keeps at least one sample on each side when it
    has two or more.
    """
    rng = np.random.default_rng([int(seed), _STREAM_SPLIT])
    train = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(pos.size)]
        k = int(round(train_fraction * pos.size))
        if pos.size >= 2:
            k = min(max(k, 1), pos.size - 1)
        train.append(pos[:k])
    train_pos = np.sort(np.concatenate(train))
    heldout_pos = np.setdiff1d(np.arange(labels.size), train_pos)
    return train_pos, heldout_pos


class DigitsDataModule(MIADataModule):
    """The 1,797 8x8 handwritten digits of ``sklearn.datasets.load_digits``, split into train and held-out.

    Images are scaled from 0..16 to [0, 1] and normalised; ``input_shape = (1, 8, 8)``, 10 classes. The split
    is stratified by class and seeded by ``seed``; ``index`` is the position within each split (which keeps
    the order of ``load_digits``), and ``train_source_index`` / ``heldout_source_index`` map it back to the
    position in ``load_digits()``.

    Args:
        train_fraction: share of every class that goes to the train split (0 < f < 1).
        normalize: subtract the data set mean and divide by its std.
        batch_size, num_workers, seed, train_subset, heldout_subset, eval_batch_size, pin_memory:
            see :class:`~lightning_mia.data.MIADataModule`.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> len(dm.member_dataset()) + len(dm.nonmember_dataset()), dm.input_shape, dm.num_classes
        (1797, (1, 8, 8), 10)
    """

    def __init__(
        self,
        train_fraction: float = 0.5,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the MIADataModule options: batch_size, seed, train_subset, ...
        if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not (
            0.0 < float(train_fraction) < 1.0
        ):
            raise ValueError(f"train_fraction must be a number strictly between 0 and 1, got {train_fraction!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.train_fraction = float(train_fraction)
        self.normalize = normalize
        self.num_classes = 10
        self.input_shape = (1, 8, 8)
        self.class_names = [str(i) for i in range(10)]
        self.train_source_index: Optional[torch.Tensor] = None
        self.heldout_source_index: Optional[torch.Tensor] = None

    def _load_splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        from sklearn.datasets import load_digits  # ships with scikit-learn, no download

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # 0..16 -> [0, 1]
        labels = np.asarray(digits.target, dtype=np.int64)
        train_pos, heldout_pos = stratified_split(labels, self.train_fraction, self.seed)
        self.train_source_index = torch.from_numpy(train_pos)
        self.heldout_source_index = torch.from_numpy(heldout_pos)
        mean, std = (DIGITS_MEAN, DIGITS_STD) if self.normalize else (None, None)
        targets = torch.from_numpy(labels)

        def split(pos: np.ndarray) -> IndexedTensorDataset:
            p = torch.from_numpy(pos)
            return IndexedTensorDataset(images[p], targets[p], mean=mean, std=std, input_scale=1.0, seed=self.seed)

        return split(train_pos), split(heldout_pos)
