"""Shared pieces of every datamodule: indexed datasets and the :class:`MIADataModule` base.

Every item is ``(x, y, index)``: ``x`` a float32 tensor ``(C, H, W)``, ``y`` and ``index`` int64 scalar
tensors. ``index`` is the sample's position in its *original* split (the full train split or the full
held-out split), also when the datamodule trains on a subset, so audit samples always trace back to the
file they came from and padded DistributedSampler duplicates can be removed by index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_mia import compat
from lightning_mia.validation import check_int

from .canaries import CanaryConfig, draw_canaries

__all__ = [
    "CorruptDataError",
    "IndexedDataset",
    "IndexedTensorDataset",
    "MIADataModule",
    "MissingDataError",
    "seeded_subset",
]

# A train-time transform takes one image (C, H, W) and a generator that supplies all its randomness.
Transform = Callable[..., torch.Tensor]
PathLike = Union[str, Path]


class MissingDataError(FileNotFoundError):
    """A data file the datamodule needs is not there; the message says how to get it."""


class CorruptDataError(ValueError):
    """A data file exists but its content is not what the format promises; the message names it."""


def _to_image_tensor(x: Any) -> torch.Tensor:
    """Convert one image to float32 (C, H, W); uint8 is scaled to [0, 1] like torchvision's ToTensor."""
    if not isinstance(x, (torch.Tensor, np.ndarray)) and hasattr(x, "getbands"):
        # PIL image (only when the user wraps a torchvision dataset without transform): HWC -> CHW.
        arr = np.array(x, copy=True)
        x = torch.from_numpy(arr)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    else:
        x = x.to(torch.float32)
    if x.ndim == 2:  # a single-channel image stored as (H, W)
        x = x.unsqueeze(0)
    return x


class IndexedDataset(Dataset):
    """Wrap any map-style dataset of ``(x, y)`` items into ``(x, y, index)`` items.

    ``x`` becomes a float32 tensor (a 2-D image gets a channel axis, uint8 is scaled to [0, 1]), ``y`` and
    ``index`` int64 scalar tensors; ``index`` is the item's position in ``dataset``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0])))
        >>> x, y, i = ds[2]
        >>> tuple(x.shape), int(y), int(i), i.dtype
        ((1, 2, 2), 0, 2, torch.int64)
    """

    def __init__(self, dataset: Dataset) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"IndexedDataset needs a map-style dataset (with __getitem__ and __len__), "
                f"got {type(dataset).__name__}"
            )
        try:
            len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"IndexedDataset needs a dataset with __len__, got {type(dataset).__name__}") from None
        self.dataset = dataset
        if len(self) > 0:
            self[0]  # fail at construction, not in the middle of an epoch, when items have the wrong form

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else (
                f"a {type(item).__name__}"
            )
            hint = " (it looks already indexed)" if isinstance(item, (tuple, list)) and len(item) == 3 else ""
            raise TypeError(f"IndexedDataset expects (x, y) items, but item {index} is {what}{hint}")
        x, y = item
        return _to_image_tensor(x), torch.as_tensor(y, dtype=torch.int64), torch.tensor(int(index), dtype=torch.int64)


class IndexedTensorDataset(Dataset):
    """An in-memory split whose items are ``(x, y, index)``.

    ``data`` is ``(N, C, H, W)`` uint8 or float; an item is computed as
    ``x = normalize(transform(data[i] * input_scale))``, i.e. the optional train-time ``transform`` sees the
    image in [0, 1] (so zero padding means a black border, as in torchvision recipes) and the per-channel
    normalisation comes last. Storing uint8 keeps CIFAR-10 at 150 MB instead of 600 MB.
    ``indices`` (default ``arange(N)``) are what items report as their index.

    The transform's randomness comes from a generator owned by the dataset: seeded with ``seed`` in the main
    process, and with the worker seed (derived by the DataLoader from its seeded generator plus the worker id)
    inside worker processes, so augmentation is reproducible for any ``num_workers``.

    Example:
        >>> import torch
        >>> ds = IndexedTensorDataset(torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(4),
        ...                           indices=torch.tensor([10, 11, 12, 13]), mean=[0.5], std=[0.5])
        >>> x, y, i = ds[1]
        >>> x.flatten().tolist(), int(y), int(i)
        ([1.0, 1.0, 1.0, 1.0], 1, 11)
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        *,
        indices: Optional[torch.Tensor] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        input_scale: Optional[float] = None,
        transform: Optional[Transform] = None,
        seed: int = 0,
    ) -> None:
        data = torch.as_tensor(data)
        targets = torch.as_tensor(targets).to(torch.int64).reshape(-1)
        if data.ndim != 4:
            raise ValueError(f"data must have shape (N, C, H, W), got {tuple(data.shape)}")
        if targets.numel() != data.shape[0]:
            raise ValueError(f"{data.shape[0]} images but {targets.numel()} targets")
        if indices is None:
            indices = torch.arange(data.shape[0])
        indices = torch.as_tensor(indices).to(torch.int64).reshape(-1)
        if indices.numel() != data.shape[0]:
            raise ValueError(f"{data.shape[0]} images but {indices.numel()} indices")
        channels = data.shape[1]
        mean_t = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {mean_t.numel()}/{std_t.numel()}")
        if input_scale is None:
            input_scale = 1.0 / 255.0 if data.dtype == torch.uint8 else 1.0
        self.data = data
        self.targets = targets
        self.indices = indices
        self.mean = mean_t.reshape(channels, 1, 1)
        self.std = std_t.reshape(channels, 1, 1)
        self.input_scale = float(input_scale)
        self.transform = transform
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None
        self._generator_key: Optional[int] = None

    def __len__(self) -> int:
        return self.data.shape[0]

    def _rng(self) -> torch.Generator:
        info = get_worker_info()
        key = self.seed if info is None else int(info.seed)
        if self._generator is None or self._generator_key != key:
            self._generator = torch.Generator().manual_seed(key % (2**63))
            self._generator_key = key
        return self._generator

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.data[i].to(torch.float32) * self.input_scale
        if self.transform is not None:
            x = self.transform(x, generator=self._rng())
        x = (x - self.mean) / self.std
        return x, self.targets[i], self.indices[i]

    def __getstate__(self) -> Dict[str, Any]:
        # Generators are per process; a worker builds its own from its worker seed.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_key"] = None
        return state

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    def with_transform(self, transform: Optional[Transform], seed: Optional[int] = None) -> "IndexedTensorDataset":
        """Same samples (storage shared), another train-time transform."""
        return IndexedTensorDataset(
            self.data, self.targets, indices=self.indices, mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(), input_scale=self.input_scale, transform=transform,
            seed=self.seed if seed is None else seed,
        )

    def subset(self, positions: Union[Sequence[int], torch.Tensor, np.ndarray]) -> "IndexedTensorDataset":
        """The rows at ``positions`` (positions in this dataset); items keep their original ``index``."""
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
        out = self.with_transform(self.transform)
        out.data, out.targets, out.indices = self.data[pos], self.targets[pos], self.indices[pos]
        return out

    def items_at(self, positions: Union[Sequence[int], torch.Tensor, np.ndarray]
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The items at ``positions`` as one batch, equal bit for bit to collating ``self[i]`` one by one; only
        without a transform (the transform draws per item). The audit pass reads batches this way: a Python call
        and a collate per sample were about 40% of a LeNet audit pass."""
        if self.transform is not None:
            raise ValueError("items_at() is for datasets without a transform; index items one by one")
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
        return self._normalised(self.data[pos]), self.targets[pos], self.indices[pos]

    def _normalised(self, data: torch.Tensor) -> torch.Tensor:
        """Stored rows as the model sees them, without the transform (the same float ops as :meth:`__getitem__`)."""
        return (data.to(torch.float32) * self.input_scale - self.mean) / self.std

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All items at once, without the transform: ``(x (N,C,H,W) float32, y (N,), index (N,))``."""
        x = self._normalised(self.data)
        return x, self.targets.clone(), self.indices.clone()


def seeded_subset(n_total: int, n: int, seed: int, stream: int) -> np.ndarray:
    """``n`` distinct positions out of ``n_total``, drawn with ``seed``, returned sorted.

    ``stream`` separates independent draws made from one user seed (split, train subset, held-out subset).
    """
    rng = np.random.default_rng([int(seed), int(stream)])
    return np.sort(rng.choice(n_total, size=n, replace=False))


# Seed streams so that one user seed gives independent draws for the different random choices.
_STREAM_SPLIT, _STREAM_TRAIN_SUBSET, _STREAM_HELDOUT_SUBSET = 0, 1, 2


class MIADataModule(compat.LightningDataModule):
    """Base datamodule: a train split (members) and a held-out split (non-members), items ``(x, y, index)``.

    A LightningDataModule of both Lightning packages (``pytorch_lightning`` and ``lightning.pytorch``, whichever
    are installed): it and every subclass work with either package's Trainer and LightningCLI
    (:mod:`lightning_mia.compat`).

    Subclasses implement :meth:`_load_splits` (and optionally :meth:`_train_transform`); this class takes
    care of subsets, canaries, data loaders and seeding.

    Args:
        batch_size: training (and, unless ``eval_batch_size`` is given, evaluation) batch size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seeds the train shuffling, the augmentation, subsets and any random split.
        train_subset: train on only this many samples of the train split, drawn at random with ``seed``
            (sorted, so they keep the split's order). ``index`` stays the position in the *full* train split,
            so audit indices trace back to the data files. :meth:`member_dataset` holds exactly these samples.
        heldout_subset: likewise for the held-out split (validation/test and non-members).
        eval_batch_size: batch size of the validation/test loaders (default: ``batch_size``).
        pin_memory: passed to every DataLoader (useful when training on CUDA).
        canaries: one-run auditing (Steinke, Nasr & Jagielski, NeurIPS 2023): ``{"count": m, "seed": s}`` (a
            :class:`~lightning_mia.data.canaries.CanaryConfig`; ``seed`` defaults to ``seed``) draws m candidates
            from the train split (after ``train_subset``) and trains on each by a seeded fair coin; the rest of the
            train split is always trained on. :meth:`canary_dataset` holds the m candidates (in index order),
            :meth:`canary_inclusion` the coins (True = trained on). :meth:`train_dataset` holds the ordinary
            samples plus the included canaries; :meth:`member_dataset` only the ordinary samples -- included
            canaries are trained on, but they stay out of the member/non-member audit pool, so no attack is ever
            fitted on a canary's inclusion bit and the one-run audit's guesses stay blind to the coins.
            Excluded canaries are in no dataset but :meth:`canary_dataset`.

    Attributes (final after :meth:`setup`): ``num_classes``, ``input_shape`` ``(C, H, W)``, ``class_names``.

    A datamodule of your own supports one-run auditing by providing the same two methods: ``canary_dataset()``
    (``(x, y, index)`` items, no augmentation) and ``canary_inclusion()`` (bool array aligned with it), and by
    training on exactly the included canaries.

    Example:
        >>> from lightning_mia.data import SyntheticDataModule
        >>> dm = SyntheticDataModule(n_train=20, n_heldout=10, batch_size=8, train_subset=12)
        >>> dm.setup("fit")
        >>> x, y, index = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.member_dataset()), len(dm.nonmember_dataset())
        ((8, 1, 8, 8), 12, 10)
        >>> dm = SyntheticDataModule(n_train=40, n_heldout=10, canaries={"count": 10, "seed": 1})
        >>> inc = dm.canary_inclusion()
        >>> len(dm.canary_dataset()), len(dm.train_dataset()) == 30 + int(inc.sum()), len(dm.member_dataset())
        (10, True, 30)
    """

    num_classes: int
    input_shape: Tuple[int, int, int]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: Optional[int] = None,
        heldout_subset: Optional[int] = None,
        eval_batch_size: Optional[int] = None,
        pin_memory: bool = False,
        canaries: Optional[CanaryConfig] = None,
    ) -> None:
        super().__init__()
        # Stored in checkpoints (``datamodule_hyper_parameters``) but not sent to the logger, so keys such as
        # ``seed`` cannot clash with the LightningModule's hyperparameters when Lightning merges them.
        self.save_hyperparameters(logger=False)
        self.canaries = CanaryConfig.coerce(canaries)
        # plain types in the checkpoint (LightningCLI resumes with torch.load(weights_only=True))
        self.hparams["canaries"] = None if self.canaries is None else self.canaries.to_dict()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        check_int("train_subset", train_subset, 1, allow_none=True)
        check_int("heldout_subset", heldout_subset, 1, allow_none=True)
        check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
        if not isinstance(pin_memory, bool):
            raise ValueError(f"pin_memory must be True or False, got {pin_memory!r}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.train_subset = train_subset
        self.heldout_subset = heldout_subset
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.pin_memory = pin_memory
        self.class_names: List[str] = []
        self._train: Optional[IndexedTensorDataset] = None
        self._heldout: Optional[IndexedTensorDataset] = None
        self._members: Optional[IndexedTensorDataset] = None
        self._canaries: Optional[IndexedTensorDataset] = None
        self._canary_included: Optional[np.ndarray] = None

    # --- to implement in subclasses -------------------------------------------------------------------
    def _load_splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        """Return the full (train, held-out) splits, without transforms."""
        raise NotImplementedError

    def _train_transform(self) -> Optional[Transform]:
        """The train-time augmentation, or None."""
        return None

    # --- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load both splits once (later calls are no-ops), apply ``train_subset``/``heldout_subset`` and draw the
        canaries."""
        if self._train is not None:
            return
        train, heldout = self._load_splits()
        train = self._apply_subset(train, self.train_subset, "train_subset", "train", _STREAM_TRAIN_SUBSET)
        heldout = self._apply_subset(heldout, self.heldout_subset, "heldout_subset", "held-out", _STREAM_HELDOUT_SUBSET)
        self.input_shape = train.input_shape
        if heldout.input_shape != train.input_shape:
            raise CorruptDataError(
                f"train images have shape {train.input_shape} but held-out images {heldout.input_shape}"
            )
        members = train
        if self.canaries is not None:
            positions, included = draw_canaries(len(train), self.canaries, self.seed)
            ordinary = np.setdiff1d(np.arange(len(train)), positions)
            self._canaries, self._canary_included = train.subset(positions), included
            members = train.subset(ordinary)
            # the trained-on set keeps the split's order: ordinary samples and included canaries, sorted
            train = train.subset(np.sort(np.concatenate([ordinary, positions[included]])))
        self._train, self._heldout, self._members = train, heldout, members

    def _apply_subset(
        self, split: IndexedTensorDataset, n: Optional[int], arg: str, what: str, stream: int
    ) -> IndexedTensorDataset:
        if n is None:
            return split
        if n > len(split):
            raise ValueError(f"{arg}={n} exceeds the {len(split)} samples of the {what} split")
        return split.subset(seeded_subset(len(split), n, self.seed, stream))

    def _splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        if self._train is None or self._heldout is None:
            self.setup()
        assert self._train is not None and self._heldout is not None
        return self._train, self._heldout

    def train_dataset(self) -> IndexedTensorDataset:
        """The training split as trained on (with the included canaries): with augmentation when configured."""
        train, _ = self._splits()
        return train.with_transform(self._train_transform(), seed=self.seed)

    def member_dataset(self) -> IndexedTensorDataset:
        """Every trained-on sample except the canaries, without augmentation; items ``(x, y, index)``."""
        self._splits()
        assert self._members is not None
        return self._members

    def canary_dataset(self) -> IndexedTensorDataset:
        """The ``canaries.count`` candidates (included or not) in index order, without augmentation; items
        ``(x, y, index)`` with ``index`` their position in the full train split."""
        self._splits()
        if self._canaries is None:
            raise ValueError("this datamodule has no canaries: pass canaries={'count': m} (YAML: "
                             "data.init_args.canaries: {count: m})")
        return self._canaries

    def canary_inclusion(self) -> np.ndarray:
        """One fair coin per canary, aligned with :meth:`canary_dataset`: True = in the training set. The same
        ``canaries.seed`` (default ``seed``) and split always give the same coins."""
        self.canary_dataset()
        assert self._canary_included is not None
        return self._canary_included.copy()

    def nonmember_dataset(self) -> IndexedTensorDataset:
        """The held-out split (never trained on), without augmentation; items ``(x, y, index)``."""
        return self._splits()[1]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Keep workers (and their augmentation generators) alive across epochs instead of re-forking.
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a generator seeded by ``seed`` (a new order each epoch, the same every run).

        A LightningModule that draws its batches differently says so with a ``prepare_train_dataloader(loader)``
        method, which gets this loader and returns the one to train on: DP-SGD's Poisson sampling
        (:meth:`lightning_mia.module.ImageClassifier.prepare_train_dataloader`).
        """
        loader = self._loader(self.train_dataset(), self.batch_size, shuffle=True)
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        prepare = getattr(module, "prepare_train_dataloader", None)
        return prepare(loader) if callable(prepare) else loader

    def val_dataloader(self) -> DataLoader:
        """The held-out split, in order."""
        return self._loader(self.nonmember_dataset(), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out split, in order (same as validation: there is no third split)."""
        return self._loader(self.nonmember_dataset(), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The held-out split, in order (``trainer.predict(model, datamodule=dm)``)."""
        return self._loader(self.nonmember_dataset(), self.eval_batch_size, shuffle=False)


def _default_class_names(num_classes: int) -> List[str]:
    return [str(i) for i in range(num_classes)]
