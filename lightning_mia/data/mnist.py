"""MNIST and Fashion-MNIST from IDX files, with our own IDX parser (no torchvision needed).

Where the files are looked for, in this order (the first directory holding all four files wins):
``data_dir``, ``data_dir/MNIST/raw`` or ``data_dir/FashionMNIST/raw`` (torchvision's layout, so files it
downloaded are found), and for Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist`` (package
``dataset-fashion-mnist``). Each file may be gzip-compressed (``.gz``) or raw.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .base import CorruptDataError, IndexedTensorDataset, MIADataModule, MissingDataError, PathLike

__all__ = ["MNISTDataModule", "find_idx_files", "read_idx"]

# IDX type codes (byte 3 of the magic number) -> big-endian numpy dtype. Source: the format description on
# http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dims (n, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dim (n)

# Debian/Ubuntu package dataset-fashion-mnist installs the four .gz files here.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# Normalisation constants. MNIST: pytorch/examples mnist/main.py, Normalize((0.1307,), (0.3081,)).
# Fashion-MNIST: mean/std of the 60,000 training images scaled to [0, 1], computed with numpy from the
# dataset-fashion-mnist files (0.28604, 0.35302).
_NORMALIZATION = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,))}

_CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    # Source: github.com/zalandoresearch/fashion-mnist README, "Labels".
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_ROLES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DATASETS = tuple(_NORMALIZATION)


def how_to_get(dataset: str) -> str:
    """The user-facing hint on how to obtain the files of ``dataset``."""
    files = ", ".join(f"{stem}.gz" for stem in _ROLES.values())
    ways = []
    if dataset == "fashion_mnist":
        ways.append(
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them in {FASHION_MNIST_SYSTEM_DIR})"
        )
    ways.append(f"put the four IDX files ({files}) in data_dir")
    ways.append("`pip install torchvision` and pass download=True with a data_dir")
    return f"To get {_PRETTY.get(dataset, dataset)}: " + "; or ".join(ways) + "."


def read_idx(path: PathLike, expected_magic: Optional[int] = None, hint: str = "") -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes) into a numpy array.

    Raises :class:`MissingDataError` when the file does not exist and :class:`CorruptDataError` naming the
    file for a bad magic number, an unexpected magic (``expected_magic``), a truncated header or body,
    trailing bytes, or a broken gzip stream. ``hint`` is appended to every message.

    Example:
        >>> import struct, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> _ = open(p, "wb").write(struct.pack(">IIBBB", 0x801, 3, 7, 0, 9))
        >>> read_idx(p, expected_magic=0x801).tolist()
        [7, 0, 9]
    """
    path = Path(path)
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise MissingDataError(f"IDX file {path} not found.{tail}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptDataError(f"{path} is a corrupt or truncated gzip file ({err}).{tail}") from None
    if len(raw) < 4:
        raise CorruptDataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number.{tail}"
        )
    magic = struct.unpack(">I", raw[:4])[0]
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDataError(
            f"{path} has a bad magic number 0x{magic:08x}; an IDX file starts with two zero bytes, a type code "
            f"(one of {', '.join(hex(c) for c in _IDX_DTYPES)}) and the number of dimensions "
            f"(images: 0x{IDX_IMAGES_MAGIC:08x}, labels: 0x{IDX_LABELS_MAGIC:08x}). Not an IDX file?{tail}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise CorruptDataError(f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}.{tail}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(
            f"{path} is truncated: its header needs {header} bytes for {ndim} dimensions, "
            f"the file has {len(raw)}.{tail}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body < expected:
        raise CorruptDataError(
            f"{path} is truncated: dimensions {list(dims)} need {expected} data bytes, only {body} present.{tail}"
        )
    if body > expected:
        raise CorruptDataError(
            f"{path} is corrupt: dimensions {list(dims)} need {expected} data bytes, "
            f"but {body} follow the header.{tail}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def _candidate_dirs(dataset: str, data_dir: Optional[PathLike]) -> List[Path]:
    dirs: List[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root, root / _TORCHVISION_FOLDER[dataset] / "raw"]
    if dataset == "fashion_mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _find_in(directory: Path, stem: str) -> Optional[Path]:
    # Also accept the "train-images.idx3-ubyte" spelling used by some mirrors.
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (directory / name).is_file():
            return directory / name
    return None


def find_idx_files(dataset: str, data_dir: Optional[PathLike]) -> Dict[str, Path]:
    """The four IDX files of ``dataset`` from the first directory that holds all of them.

    Raises :class:`MissingDataError` listing the directories searched and the files each one lacks.
    """
    if dataset not in _NORMALIZATION:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    report = []
    for d in _candidate_dirs(dataset, data_dir):
        found = {role: _find_in(d, stem) for role, stem in _ROLES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        missing = [f"{_ROLES[r]}(.gz)" for r, p in found.items() if p is None]
        report.append(f"{d} ({'does not exist' if not d.is_dir() else 'missing ' + ', '.join(missing)})")
    where = "; ".join(report) if report else "nowhere: data_dir is None"
    raise MissingDataError(f"{_PRETTY[dataset]} IDX files not found. Searched {where}. {how_to_get(dataset)}")


def _download_with_torchvision(dataset: str, data_dir: PathLike) -> None:
    """Fetch the files with torchvision (optional dependency, imported only here) into ``data_dir``."""
    hint = how_to_get(dataset)
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415 - optional extra, never imported at module level
    except ImportError:
        raise MissingDataError(
            f"download=True needs torchvision, which is not installed (`pip install torchvision`). {hint}"
        ) from None
    except Exception as err:  # a torchvision that does not match torch fails at import with RuntimeError
        raise MissingDataError(f"download=True needs torchvision, but importing it failed: {err}. {hint}") from None
    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}[dataset]
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as err:
        raise MissingDataError(
            f"Downloading {_PRETTY[dataset]} with torchvision into {data_dir} failed (offline?): {err}. {hint}"
        ) from None


def load_mnist_arrays(
    dataset: str, data_dir: Optional[PathLike]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images (N,H,W) uint8, train_labels (N,), test_images, test_labels)``, validated."""
    files = find_idx_files(dataset, data_dir)
    hint = how_to_get(dataset)
    arrays = {}
    for role, path in files.items():
        magic = IDX_IMAGES_MAGIC if role.endswith("images") else IDX_LABELS_MAGIC
        arrays[role] = read_idx(path, expected_magic=magic, hint=hint)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise CorruptDataError(
                f"count mismatch: {files[f'{split}_images']} holds {images.shape[0]} images but "
                f"{files[f'{split}_labels']} holds {labels.shape[0]} labels. {hint}"
            )
        if labels.size and labels.max() >= 10:
            raise CorruptDataError(
                f"{files[f'{split}_labels']} has label {int(labels.max())}; {_PRETTY[dataset]} has classes 0..9. {hint}"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise CorruptDataError(
            f"image size mismatch: {files['train_images']} has {arrays['train_images'].shape[1:]} images, "
            f"{files['test_images']} has {arrays['test_images'].shape[1:]}. {hint}"
        )
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


class MNISTDataModule(MIADataModule):
    """MNIST or Fashion-MNIST: train split = the 60,000 training images, held-out = the 10,000 test images.

    Items are ``(x (1, 28, 28) float32 normalised, y, index)`` with ``index`` the position in the IDX file.

    Args:
        data_dir: directory with the IDX files (see the module docstring for where else is looked).
            ``None`` works for Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed.
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        download: when the files are missing, fetch them with torchvision (optional dependency) into
            ``data_dir``. Off by default: nothing goes to the network unless asked.
        normalize: subtract the data set mean and divide by its std (constants in this module).
        batch_size, num_workers, seed, train_subset, heldout_subset, eval_batch_size, pin_memory:
            see :class:`~lightning_mia.data.MIADataModule`.

    Example:
        >>> dm = MNISTDataModule(dataset="fashion_mnist", train_subset=1000)  # doctest: +SKIP
        >>> dm.setup(); len(dm.member_dataset()), dm.input_shape               # doctest: +SKIP
        (1000, (1, 28, 28))
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        dataset: str = "mnist",
        download: bool = False,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the MIADataModule options: batch_size, seed, train_subset, ...
        if dataset not in _NORMALIZATION:
            raise ValueError(f"dataset must be one of {', '.join(repr(d) for d in DATASETS)}, got {dataset!r}")
        if not isinstance(download, bool):
            raise ValueError(f"download must be True or False, got {download!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if download and data_dir is None:
            raise ValueError("download=True needs a data_dir to download into")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.dataset = dataset
        self.download = download
        self.normalize = normalize
        self.num_classes = 10
        self.input_shape = (1, 28, 28)  # nominal; setup() takes the size from the files
        self.class_names = list(_CLASS_NAMES[dataset])

    def _files_present(self) -> bool:
        try:
            find_idx_files(self.dataset, self.data_dir)
            return True
        except MissingDataError:
            return False

    def prepare_data(self) -> None:
        """Download (only with ``download=True`` and only when files are missing); Lightning calls this once."""
        if self.download and not self._files_present():
            assert self.data_dir is not None
            _download_with_torchvision(self.dataset, self.data_dir)

    def _load_splits(self) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
        self.prepare_data()  # no-op unless download=True and files are missing (e.g. used outside a Trainer)
        train_x, train_y, test_x, test_y = load_mnist_arrays(self.dataset, self.data_dir)
        mean, std = _NORMALIZATION[self.dataset] if self.normalize else (None, None)

        def split(x: np.ndarray, y: np.ndarray) -> IndexedTensorDataset:
            data = torch.from_numpy(x.astype(np.uint8, copy=False)).unsqueeze(1)  # (N, 1, H, W) uint8
            return IndexedTensorDataset(data, torch.from_numpy(y.astype(np.int64)), mean=mean, std=std, seed=self.seed)

        return split(train_x, train_y), split(test_x, test_y)
