"""CIFAR-10 / CIFAR-100 from the standard "python version" archives (no torchvision, no download).

Accepted layouts inside ``data_dir`` (the first that exists wins):

- CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; or those
  files directly in ``data_dir``; or the archive ``cifar-10-python.tar.gz``.
- CIFAR-100: ``cifar-100-python/`` with ``train`` and ``test``; or those files directly in ``data_dir``; or
  ``cifar-100-python.tar.gz``.

The batches are pickles of dicts with ``b"data"`` (N x 3072 uint8, channel-major 32x32 images) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). They are read with a restricted unpickler that
only rebuilds numpy arrays, so a tampered archive cannot run code.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .base import CorruptDataError, IndexedTensorDataset, MIADataModule, MissingDataError, PathLike, Transform
from .transforms import cifar_train_transform

__all__ = ["CIFARDataModule", "load_cifar_arrays"]

# Normalisation from bearpaw/pytorch-classification cifar.py (the recipe our CIFAR models follow), which
# uses Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)) for both CIFAR-10 and CIFAR-100.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# Source: https://www.cs.toronto.edu/~kriz/cifar.html (batches.meta label_names).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Optional metadata member and its class-name key, used for class_names when present.
_META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}

_SPEC = {
    # dataset: (folder in the archive, archive name, train members, test members, label key, classes)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], b"fine_labels", 100),
}
DATASETS = tuple(_SPEC)
_IMAGE_BYTES = 3 * 32 * 32


def how_to_get(dataset: str) -> str:
    folder, archive, train, test, _, _ = _SPEC[dataset]
    return (
        f"Put {archive} (the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html) or its "
        f"extracted folder {folder}/ (with {', '.join(train + test)}) in data_dir."
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers only; anything else in the pickle is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") in protocol-2 pickles (harmless).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def _unpickle(raw: bytes, where: str, hint: str) -> Dict[bytes, Any]:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()  # the batches are Python 2 pickles
    except Exception as err:
        raise CorruptDataError(f"{where} is not a readable CIFAR batch pickle ({err}). {hint}") from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{where} holds a {type(obj).__name__}, expected a dict with b'data'. {hint}")
    return obj


def _parse_batch(batch: Dict[bytes, Any], label_key: bytes, num_classes: int, where: str, hint: str
                 ) -> Tuple[np.ndarray, np.ndarray]:
    for key in (b"data", label_key):
        if key not in batch:
            raise CorruptDataError(f"{where} has no {key!r} entry (keys: {sorted(batch)}). {hint}")
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as err:  # ragged / nested lists
        raise CorruptDataError(
            f"{where}: {label_key.decode()} is not a flat list of integers ({err}). {hint}"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise CorruptDataError(
            f"{where}: b'data' must be a uint8 array (N, {_IMAGE_BYTES}), got {data.dtype} {data.shape}. {hint}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise CorruptDataError(
            f"{where}: count mismatch, {data.shape[0]} images but {labels.size} {label_key.decode()}. {hint}"
        )
    if labels.size and (labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer)):
        # floats would be truncated to other classes by astype(int64), strings compared as text
        bad = next((v for v in labels.reshape(-1).tolist() if isinstance(v, bool) or not isinstance(v, int)), None)
        raise CorruptDataError(
            f"{where}: {label_key.decode()} must be integers, got {labels.dtype} values (e.g. {bad!r}). {hint}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(
            f"{where}: labels must be in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}. {hint}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _regular_member(tar: tarfile.TarFile, name: str, path: Path, hint: str) -> bytes:
    """The bytes of a regular-file member; links and other kinds are refused (extracting a link follows it to
    another member, or fails with a bare KeyError when its target is not in the archive)."""
    info = tar.getmember(name)
    if not info.isreg():
        kind = ("a symbolic link" if info.issym() else "a hard link" if info.islnk() else
                "a directory" if info.isdir() else "not a regular file")
        to = f" (to {info.linkname!r})" if info.issym() or info.islnk() else ""
        raise CorruptDataError(f"{path}: member {name} is {kind}{to}, not a regular file: the CIFAR archive must hold "
                               f"the batch files themselves. {hint}")
    f = tar.extractfile(info)
    if f is None:  # pragma: no cover - isreg() members always extract
        raise CorruptDataError(f"{path}: member {name} is not a regular file. {hint}")
    return f.read()


def _read_members(dataset: str, data_dir: Path) -> Tuple[Dict[str, bytes], str]:
    """Raw bytes of every needed batch file, and a description of where they came from."""
    folder, archive, train, test, _, _ = _SPEC[dataset]
    members = train + test
    meta = _META[dataset][0]
    hint = how_to_get(dataset)
    for d in (data_dir / folder, data_dir):
        if all((d / m).is_file() for m in members):
            out = {m: (d / m).read_bytes() for m in members}
            if (d / meta).is_file():
                out[meta] = (d / meta).read_bytes()
            return out, str(d)
        partial = [m for m in members if (d / m).is_file()]
        if partial:
            missing = [m for m in members if m not in partial]
            raise MissingDataError(f"{d} has {', '.join(partial)} but lacks {', '.join(missing)}. {hint}")
    path = data_dir / archive
    if not path.is_file():
        raise MissingDataError(
            f"{dataset.upper()} not found: neither {data_dir / folder}/ nor {path} exists. {hint}"
        )
    out: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {Path(n).as_posix(): n for n in tar.getnames()}
            for m in members:
                name = names.get(f"{folder}/{m}")
                if name is None:
                    raise CorruptDataError(f"{path} has no member {folder}/{m}. {hint}")
                out[m] = _regular_member(tar, name, path, hint)
            meta_name = names.get(f"{folder}/{meta}")
            if meta_name is not None and tar.getmember(meta_name).isreg():  # optional: a link there is ignored
                out[meta] = _regular_member(tar, meta_name, path, hint)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CorruptDataError(
            f"{path} is not a readable tar.gz archive (corrupt or truncated: {err}). {hint}"
        ) from None
    return out, str(path)


def _class_names(dataset: str, raw_meta: Optional[bytes]) -> Optional[List[str]]:
    """Class names from the optional meta pickle; None when it is absent or not as expected (never fatal)."""
    if raw_meta is None:
        return None
    try:
        meta = _NumpyOnlyUnpickler(io.BytesIO(raw_meta), encoding="bytes").load()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[_META[dataset][1]]]
    except Exception:
        return None
    return names if len(names) == _SPEC[dataset][5] else None


def _load_cifar(dataset: str, data_dir: PathLike):  # type: ignore[no-untyped-def]
    if dataset not in _SPEC:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    folder, archive, train, test, label_key, num_classes = _SPEC[dataset]
    hint = how_to_get(dataset)
    raw, source = _read_members(dataset, Path(data_dir).expanduser())
    parts: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, members in (("train", train), ("test", test)):
        for m in members:
            where = f"{m} in {source}"
            parts[split].append(_parse_batch(_unpickle(raw.pop(m), where, hint), label_key, num_classes, where, hint))
    train_x = np.concatenate([p[0] for p in parts["train"]])
    train_y = np.concatenate([p[1] for p in parts["train"]])
    test_x = np.concatenate([p[0] for p in parts["test"]])
    test_y = np.concatenate([p[1] for p in parts["test"]])
    return (train_x, train_y, test_x, test_y), _class_names(dataset, raw.get(_META[dataset][0]))


def load_cifar_arrays(dataset: str, data_dir: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images (N,3,32,32) uint8, train_labels (N,) int64, test_images, test_labels)``, validated."""
    return _load_cifar(dataset, data_dir)[0]


class CIFARDataModule(MIADataModule):
    """CIFAR-10 or CIFAR-100 (fine labels): train = the 50,000 training images, held-out = the 10,000 test images.

    Items are ``(x (3, 32, 32) float32 normalised, y, index)``, ``index`` the position in the concatenated
    training batches (``data_batch_1`` .. ``5``) or in ``test_batch``. Training batches are augmented with a
    random 32x32 crop after 4-pixel zero padding and a random horizontal flip (``augment=True``, seeded per
    worker); :meth:`member_dataset` and the held-out loaders are never augmented.

    Args:
        data_dir: directory holding the archive or its extracted folder (see the module docstring).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        augment: random crop + flip on training batches.
        normalize: per-channel normalisation with the CIFAR mean/std of the bearpaw recipe.
        batch_size, num_workers, seed, train_subset, heldout_subset, eval_batch_size, pin_memory:
            see :class:`~lightning_mia.data.MIADataModule`.

    Example:
        >>> dm = CIFARDataModule("data/", dataset="cifar10", batch_size=128)  # doctest: +SKIP
        >>> dm.setup(); dm.input_shape, dm.num_classes, len(dm.member_dataset())  # doctest: +SKIP
        ((3, 32, 32), 10, 50000)
    """

    def __init__(
        self,
        data_dir: str,
        dataset: str = "cifar10",
        augment: bool = True,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the MIADataModule options: batch_size, seed, train_subset, ...
        if dataset not in _SPEC:
            raise ValueError(f"dataset must be one of {', '.join(repr(d) for d in DATASETS)}, got {dataset!r}")
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if data_dir is None:
            raise ValueError(f"data_dir is required for {dataset}. {how_to_get(dataset)}")
        self.data_dir = Path(data_dir).expanduser()
        self.dataset = dataset
        self.augment = augment
        self.normalize = normalize
        self.num_classes = _SPEC[dataset][5]
        self.input_shape = (3, 32, 32)
        self.class_names = CIFAR10_CLASSES[:] if dataset == "cifar10" else [str(i) for i in range(100)]

    def _train_transform(self) -> Optional[Transform]:
        return cifar_train_transform(32) if self.augment else None

    def _load_splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        (train_x, train_y, test_x, test_y), names = _load_cifar(self.dataset, self.data_dir)
        if names is not None:
            self.class_names = names
        mean, std = (CIFAR_MEAN, CIFAR_STD) if self.normalize else (None, None)

        def split(x: np.ndarray, y: np.ndarray) -> IndexedTensorDataset:
            return IndexedTensorDataset(torch.from_numpy(x), torch.from_numpy(y), mean=mean, std=std, seed=self.seed)

        return split(train_x, train_y), split(test_x, test_y)
