"""Tests of lightning_mia.data: IDX/CIFAR parsing against hand-built files, augmentation, (x, y, index)
batches, subsets and splits. References are built independently here (struct/gzip/pickle/tarfile, numpy,
sklearn.datasets.load_digits, torch.flip)."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import lightning_mia.data as D
import lightning_mia.data.mnist as mnist_mod
from lightning_mia.data import (
    CIFARDataModule,
    CorruptDataError,
    DigitsDataModule,
    IndexedDataset,
    IndexedTensorDataset,
    MissingDataError,
    MNISTDataModule,
    RandomCrop,
    RandomHorizontalFlip,
    SyntheticDataModule,
    read_idx,
)
from lightning_mia.data.transforms import cifar_train_transform, hflip, random_crop

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------------------
# IDX files, written by hand
# ----------------------------------------------------------------------------------------------------------
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray, big_endian_dtype: str = ">u1") -> bytes:
    dt = np.dtype(big_endian_dtype)
    header = struct.pack(">BBBB", 0, 0, _IDX_CODES[dt], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dt).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool, dtype: str = ">u1") -> Path:
    raw = idx_bytes(arr, dtype)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist(d: Path, n_train=20, n_test=8, hw=(5, 6), gz=True, seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(d / name, arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [">u1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 7 % 100).astype(np.float64)
    path = write_idx(tmp_path / "x-idx3", arr, gz, dtype)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr.astype(np.dtype(dtype)))
    assert out.dtype.isnative and out.flags.writeable


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(CorruptDataError, match="bad magic number 0x12340801") as e:
        read_idx(p)
    assert str(p) in str(e.value)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")  # unknown type code 0x07
    with pytest.raises(CorruptDataError, match="bad magic"):
        read_idx(p)


def test_read_idx_wrong_kind_of_file(tmp_path):
    p = write_idx(tmp_path / "labels", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(CorruptDataError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(p, expected_magic=0x803)


def test_read_idx_truncated(tmp_path):
    full = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    p = tmp_path / "trunc-idx3-ubyte"
    p.write_bytes(full[:-5])
    with pytest.raises(CorruptDataError, match=r"truncated: dimensions \[4, 3, 3\] need 36 data bytes, only 31") as e:
        read_idx(p, hint="HOWTO")
    assert str(p) in str(e.value) and "HOWTO" in str(e.value)
    p.write_bytes(full[:10])  # header cut inside the dimension list
    with pytest.raises(CorruptDataError, match="header needs 16 bytes"):
        read_idx(p)
    p.write_bytes(full[:2])
    with pytest.raises(CorruptDataError, match="truncated"):
        read_idx(p)
    p.write_bytes(full + b"\x00\x01")
    with pytest.raises(CorruptDataError, match="36 data bytes, but 38"):
        read_idx(p)


def test_read_idx_truncated_gzip(tmp_path):
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))[:-12])
    with pytest.raises(CorruptDataError, match="corrupt or truncated gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_missing(tmp_path):
    with pytest.raises(MissingDataError, match="nope-idx1-ubyte not found"):
        read_idx(tmp_path / "nope-idx1-ubyte")


# ----------------------------------------------------------------------------------------------------------
# MNIST datamodule on tiny generated IDX files
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_small_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=6)
    dm.setup("fit")
    assert dm.input_shape == (1, 5, 6) and dm.num_classes == 10
    members, nonmembers = dm.member_dataset(), dm.nonmember_dataset()
    assert (len(members), len(nonmembers)) == (20, 8)
    for ds, img_key, lab_key in ((members, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                 (nonmembers, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        for i in (0, 3, len(ds) - 1):
            x, y, index = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 5, 6)
            assert y.dtype == torch.int64 and y.ndim == 0 and index.dtype == torch.int64 and index.ndim == 0
            assert int(index) == i and int(y) == arrays[lab_key][i]
            ref = (arrays[img_key][i].astype(np.float32) / 255.0 - 0.1307) / 0.3081  # pytorch/examples constants
            np.testing.assert_allclose(x[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    # unnormalised: pixels back in [0, 1]
    raw = MNISTDataModule(data_dir=tmp_path, normalize=False)
    raw.setup()
    np.testing.assert_allclose(raw.member_dataset().tensors()[0][:, 0].numpy() * 255.0,
                               arrays["train-images-idx3-ubyte"], atol=1e-3)


def test_mnist_torchvision_layout_and_dotted_names(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    dm = MNISTDataModule(data_dir=tmp_path)
    dm.setup()
    assert len(dm.member_dataset()) == 20
    # "train-images.idx3-ubyte" spelling of some mirrors
    d = tmp_path / "dotted"
    d.mkdir()
    for name, arr in arrays.items():
        write_idx(d / name.replace("-idx", ".idx"), arr, gz=False)
    dm = MNISTDataModule(data_dir=d)
    dm.setup()
    assert int(dm.nonmember_dataset()[7][1]) == arrays["t10k-labels-idx1-ubyte"][7]


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=True)  # 20 images, 19 labels
    with pytest.raises(CorruptDataError, match="count mismatch") as e:
        MNISTDataModule(data_dir=tmp_path).setup()
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz holds 20 images" in msg and "train-labels-idx1-ubyte.gz holds 19 labels" in msg
    assert "download=True" in msg


def test_mnist_corrupt_file_message_names_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte is truncated"):
        MNISTDataModule(data_dir=tmp_path).setup()


def test_mnist_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingDataError) as e:
        MNISTDataModule(data_dir=tmp_path).setup()
    msg = str(e.value)
    assert "missing t10k-labels-idx1-ubyte(.gz)" in msg and "pip install torchvision" in msg
    assert "apt-get" not in msg  # that hint is for Fashion-MNIST only
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist") as e:
        MNISTDataModule(data_dir=tmp_path / "empty", dataset="fashion_mnist").setup()
    assert "no-system-dir" in str(e.value)


def test_mnist_download_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision...` raise ImportError
    dm = MNISTDataModule(data_dir=tmp_path, download=True)
    pattern = r"needs torchvision, which is not installed \(`pip install torchvision`\)"
    with pytest.raises(MissingDataError, match=pattern):
        dm.prepare_data()


def test_mnist_argument_validation():
    with pytest.raises(ValueError, match="'mnist', 'fashion_mnist'"):
        MNISTDataModule(dataset="kmnist")
    with pytest.raises(ValueError, match="needs a data_dir"):
        MNISTDataModule(download=True)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        MNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        MNISTDataModule(num_workers=-1)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    dm = MNISTDataModule(dataset="fashion_mnist", normalize=False)  # data_dir=None -> Debian's directory
    dm.setup()
    x_tr, y_tr, i_tr = dm.member_dataset().tensors()
    x_te, y_te, _ = dm.nonmember_dataset().tensors()
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(y_tr, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(y_te, minlength=10), torch.full((10,), 1000))
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    assert torch.equal(i_tr, torch.arange(60000))
    # the documented constants are the training-set statistics
    assert abs(float(x_tr.mean()) - 0.2860) < 5e-4 and abs(float(x_tr.std()) - 0.3530) < 5e-4
    # independent read of one image with gzip + numpy
    raw = gzip.open(FASHION_DIR / "train-images-idx3-ubyte.gz").read()
    img = np.frombuffer(raw, np.uint8, count=784, offset=16 + 784 * 123).reshape(28, 28)
    np.testing.assert_allclose(x_tr[123, 0].numpy(), img / 255.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# CIFAR python-version archives, written by hand
# ----------------------------------------------------------------------------------------------------------
def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # the original batches are protocol-2 (Python 2 cPickle) pickles


def make_cifar(root: Path, dataset="cifar10", n_per_batch=4, n_test=6, archive=True, seed=0, tamper=None):
    """Write a tiny CIFAR in the exact python-version layout; return the images and labels."""
    rng = np.random.default_rng(seed)
    k = 10 if dataset == "cifar10" else 100
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    files, train_x, train_y = {}, [], []
    if dataset == "cifar10":
        train_names, test_names, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
        files["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
    else:
        train_names, test_names, label_key = ["train"], ["test"], b"fine_labels"
        files["meta"] = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [b"x"] * 20}
    test_x = test_y = None
    for name in train_names + test_names:
        n = n_test if name in test_names else (n_per_batch if dataset == "cifar10" else 5 * n_per_batch)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, k, n)
        d = {b"batch_label": name.encode(), b"data": x, b"filenames": [b"f.png"] * n}
        d[label_key] = [int(v) for v in y]  # lists of ints, as in the originals
        if dataset == "cifar100":
            d[b"coarse_labels"] = [int(v) // 5 for v in y]
        files[name] = d
        if name in test_names:
            test_x, test_y = x, y
        else:
            train_x.append(x)
            train_y.append(y)
    if tamper:
        tamper(files)
    blobs = {name: (d if isinstance(d, bytes) else _pickle_bytes(d)) for name, d in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        arch = root / ("cifar-10-python.tar.gz" if dataset == "cifar10" else "cifar-100-python.tar.gz")
        with tarfile.open(arch, "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir()
        for name, blob in blobs.items():
            (root / folder / name).write_bytes(blob)
    return (np.concatenate(train_x).reshape(-1, 3, 32, 32), np.concatenate(train_y),
            test_x.reshape(-1, 3, 32, 32), test_y)


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(3, 1, 1)  # bearpaw cifar.py
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], np.float32).reshape(3, 1, 1)


@pytest.mark.parametrize("dataset,archive", [("cifar10", True), ("cifar10", False), ("cifar100", True),
                                             ("cifar100", False)])
def test_cifar_loader(tmp_path, dataset, archive):
    train_x, train_y, test_x, test_y = make_cifar(tmp_path, dataset, archive=archive)
    dm = CIFARDataModule(str(tmp_path), dataset=dataset, augment=False)
    dm.setup()
    assert dm.num_classes == (10 if dataset == "cifar10" else 100) and dm.input_shape == (3, 32, 32)
    assert dm.class_names[:2] == (["c0", "c1"] if dataset == "cifar10" else ["f0", "f1"])
    x, y, i = dm.member_dataset().tensors()
    assert x.shape == (20, 3, 32, 32) and torch.equal(i, torch.arange(20))
    np.testing.assert_array_equal(y.numpy(), train_y)
    np.testing.assert_allclose(x.numpy(), (train_x / np.float32(255.0) - CIFAR_MEAN) / CIFAR_STD, atol=1e-5)
    x, y, i = dm.nonmember_dataset().tensors()
    np.testing.assert_array_equal(y.numpy(), test_y)
    np.testing.assert_allclose(x.numpy(), (test_x / np.float32(255.0) - CIFAR_MEAN) / CIFAR_STD, atol=1e-5)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(MissingDataError, match="cifar-10-python.tar.gz") as e:
        CIFARDataModule(tmp_path).setup()
    assert "cifar-10-batches-py" in str(e.value)
    # truncated archive
    make_cifar(tmp_path / "a")
    arch = tmp_path / "a" / "cifar-10-python.tar.gz"
    arch.write_bytes(arch.read_bytes()[: arch.stat().st_size // 2])
    with pytest.raises(CorruptDataError, match="cifar-10-python.tar.gz is not a readable tar.gz"):
        CIFARDataModule(tmp_path / "a").setup()
    # member missing from the archive
    make_cifar(tmp_path / "b", tamper=lambda f: f.pop("data_batch_3"))
    with pytest.raises(CorruptDataError, match="has no member cifar-10-batches-py/data_batch_3"):
        CIFARDataModule(tmp_path / "b").setup()
    # extracted folder lacking a batch
    make_cifar(tmp_path / "c", archive=False)
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(MissingDataError, match="lacks test_batch"):
        CIFARDataModule(tmp_path / "c").setup()


def _mismatch(files):
    files["data_batch_2"][b"labels"] = files["data_batch_2"][b"labels"][:-1]


def _bad_shape(files):
    files["test_batch"][b"data"] = files["test_batch"][b"data"][:, :100]


def _bad_label(files):
    files["train"][b"fine_labels"][0] = 100


def _not_pickle(files):
    files["test_batch"] = b"this is not a pickle"


@pytest.mark.parametrize("dataset,tamper,pattern", [
    ("cifar10", _mismatch, "data_batch_2 in .*count mismatch, 4 images but 3 labels"),
    ("cifar10", _bad_shape, r"test_batch in .*uint8 array \(N, 3072\)"),
    ("cifar100", _bad_label, "train in .*labels must be in 0..99"),
    ("cifar10", _not_pickle, "test_batch in .*not a readable CIFAR batch pickle"),
])
def test_cifar_corrupt_batches(tmp_path, dataset, tamper, pattern):
    make_cifar(tmp_path, dataset, tamper=tamper)
    with pytest.raises(CorruptDataError, match=pattern):
        CIFARDataModule(tmp_path, dataset=dataset).setup()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_code_in_pickles(tmp_path):
    def tamper(files):
        files["data_batch_1"][b"filenames"] = _Evil()
    make_cifar(tmp_path, tamper=tamper)
    with pytest.raises(CorruptDataError, match="refusing to load"):
        CIFARDataModule(tmp_path).setup()


def test_cifar_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="'cifar10', 'cifar100'"):
        CIFARDataModule(tmp_path, dataset="cifar20")
    with pytest.raises(ValueError, match="augment must be True or False"):
        CIFARDataModule(tmp_path, augment="yes")


# ----------------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------------
def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = torch.rand(3, 8, 8) + 1.0  # strictly positive, so padding zeros are recognisable
    padded = np.zeros((3, 14, 14), np.float32)
    padded[:, 3:11, 3:11] = x.numpy()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(400):
        out = random_crop(x, 8, padding=3, generator=g)
        assert out.shape == (3, 8, 8)
        hits = [(t, l) for t in range(7) for l in range(7) if np.array_equal(padded[:, t:t + 8, l:l + 8], out.numpy())]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 49  # every offset of the 7x7 grid occurs
    assert torch.equal(RandomCrop(8, padding=0)(x, generator=g), x)
    assert RandomCrop(5, padding=1)(x, generator=g).shape == (3, 5, 5)
    with pytest.raises(ValueError):
        RandomCrop(0)


def test_flip_matches_torch_flip_and_rate():
    x = torch.rand(3, 5, 7)
    assert torch.equal(hflip(x), torch.flip(x, dims=[2]))
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), torch.flip(x, dims=[2]))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    g = torch.Generator().manual_seed(1)
    flips = sum(torch.equal(RandomHorizontalFlip()(x, generator=g), torch.flip(x, dims=[2])) for _ in range(2000))
    assert 900 < flips < 1100  # Binomial(2000, 0.5): mean 1000, sd 22


def test_augmentation_determinism():
    x = torch.rand(3, 32, 32)
    aug = cifar_train_transform()
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (5, 5, 6))
    a = torch.stack([aug(x, generator=g1) for _ in range(20)])
    b = torch.stack([aug(x, generator=g2) for _ in range(20)])
    c = torch.stack([aug(x, generator=g3) for _ in range(20)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({v.numpy().tobytes() for v in a}) > 1  # the draws differ within one stream


def _matches_an_augmentation(x_aug: torch.Tensor, x_plain: torch.Tensor) -> bool:
    """Is x_aug (normalised) a 4-padded 32-crop, maybe flipped, of x_plain (normalised)? Padding = black."""
    raw = x_plain.numpy() * CIFAR_STD + CIFAR_MEAN
    padded = np.zeros((3, 40, 40), np.float32)
    padded[:, 4:36, 4:36] = raw
    target = x_aug.numpy() * CIFAR_STD + CIFAR_MEAN
    for t in range(9):
        for l in range(9):
            win = padded[:, t:t + 32, l:l + 32]
            if np.allclose(win, target, atol=1e-5) or np.allclose(win[:, :, ::-1], target, atol=1e-5):
                return True
    return False


def test_cifar_train_batches_are_augmented_members(tmp_path):
    make_cifar(tmp_path, n_per_batch=3)
    dm = CIFARDataModule(tmp_path, batch_size=8, seed=3)
    dm.setup()
    members = dm.member_dataset()
    changed = 0
    for x, y, index in dm.train_dataloader():
        for xa, ya, ia in zip(x, y, index):
            xm, ym, im = members[int(ia)]
            assert int(im) == int(ia) and int(ym) == int(ya)
            assert _matches_an_augmentation(xa, xm)
            changed += not torch.equal(xa, xm)
    assert changed >= 10  # 15 samples; P(identity crop and no flip) = 1/162 each
    # member_dataset is not augmented: reading twice gives the stored image
    assert torch.equal(members[4][0], members[4][0])
    assert torch.equal(members[4][0], members.tensors()[0][4])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_reproducible(tmp_path, num_workers):
    make_cifar(tmp_path, n_per_batch=3)

    def two_epochs(seed):
        dm = CIFARDataModule(tmp_path, batch_size=4, seed=seed, num_workers=num_workers)
        dm.setup()
        loader = dm.train_dataloader()
        return [b for _ in range(2) for b in loader]

    a, b, c = two_epochs(7), two_epochs(7), two_epochs(8)
    assert all(torch.equal(u, v) for ba, bb in zip(a, b) for u, v in zip(ba, bb))
    assert not all(torch.equal(ba[0], bc[0]) for ba, bc in zip(a, c))
    # the two epochs differ (new order and new augmentation each epoch)
    half = len(a) // 2
    assert not all(torch.equal(u[0], v[0]) for u, v in zip(a[:half], a[half:]))


# ----------------------------------------------------------------------------------------------------------
# (x, y, index) batches, subsets and splits
# ----------------------------------------------------------------------------------------------------------
def test_digits_split_disjoint_stratified_and_faithful():
    from sklearn.datasets import load_digits

    ref = load_digits()
    dm = DigitsDataModule(train_fraction=0.5, seed=1)
    dm.setup()
    tr, ho = dm.train_source_index.numpy(), dm.heldout_source_index.numpy()
    assert len(np.intersect1d(tr, ho)) == 0 and len(np.union1d(tr, ho)) == 1797
    for c in range(10):
        n_c = int((ref.target == c).sum())
        assert int((ref.target[tr] == c).sum()) == round(0.5 * n_c)
    x, y, i = dm.member_dataset().tensors()
    assert torch.equal(i, torch.arange(len(tr)))
    np.testing.assert_array_equal(y.numpy(), ref.target[tr])
    # documented normalisation constants (mean/std of all images / 16)
    np.testing.assert_allclose(x[:, 0].numpy(), (ref.images[tr] / 16.0 - 0.3053) / 0.3760, atol=1e-5)
    assert abs((ref.images / 16.0).mean() - 0.3053) < 1e-4 and abs((ref.images / 16.0).std() - 0.3760) < 1e-4
    x_h, y_h, _ = dm.nonmember_dataset().tensors()
    np.testing.assert_array_equal(y_h.numpy(), ref.target[ho])
    # another seed, another split; same seed, same split
    other = DigitsDataModule(seed=2)
    other.setup()
    same = DigitsDataModule(seed=1)
    same.setup()
    assert not torch.equal(other.train_source_index, dm.train_source_index)
    assert torch.equal(same.train_source_index, dm.train_source_index)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        DigitsDataModule(train_fraction=1.0)


def test_batches_carry_index_matching_dataset():
    dm = DigitsDataModule(batch_size=50, seed=0)
    dm.setup()
    members = dm.member_dataset()
    seen = []
    for x, y, index in dm.train_dataloader():
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and index.dtype == torch.int64
        for k in range(0, len(index), 7):
            xm, ym, _ = members[int(index[k])]
            assert torch.equal(x[k], xm) and int(y[k]) == int(ym)
        seen.append(index)
    seen = torch.cat(seen)
    assert not torch.equal(seen, torch.sort(seen).values)  # shuffled
    assert torch.equal(torch.sort(seen).values, torch.arange(len(members)))  # every member once
    x, y, index = next(iter(dm.val_dataloader()))
    assert torch.equal(index, torch.arange(50))
    assert torch.equal(x[10], dm.nonmember_dataset()[10][0])


def test_train_subset_members_are_exactly_the_trained_samples():
    full = SyntheticDataModule(n_train=40, n_heldout=30, seed=4)
    full.setup()
    dm = SyntheticDataModule(n_train=40, n_heldout=30, seed=4, train_subset=11, heldout_subset=9, batch_size=4,
                             augment=True)
    dm.setup()
    members = dm.member_dataset()
    member_idx = members.tensors()[2]
    assert len(members) == 11 and len(dm.nonmember_dataset()) == 9
    assert len(set(member_idx.tolist())) == 11 and int(member_idx.max()) < 40
    trained = torch.cat([b[2] for b in dm.train_dataloader()])
    assert sorted(trained.tolist()) == sorted(member_idx.tolist())
    # index = position in the ORIGINAL split: same sample as the full module's item at that index
    for k in range(len(members)):
        x, y, i = members[k]
        xf, yf, i_f = full.member_dataset()[int(i)]
        assert torch.equal(x, xf) and int(y) == int(yf) and int(i_f) == int(i)
    for x, y, i in dm.nonmember_dataset():
        assert torch.equal(x, full.nonmember_dataset()[int(i)][0])
    with pytest.raises(ValueError, match="train_subset=50 exceeds the 40 samples"):
        SyntheticDataModule(n_train=40, train_subset=50).setup()
    with pytest.raises(ValueError, match="train_subset must be an integer >= 1 or None"):
        SyntheticDataModule(train_subset=0)


def test_synthetic_determinism_and_signal():
    def data(seed, signal=1.0):
        dm = SyntheticDataModule(input_shape=(2, 4, 4), num_classes=4, n_train=40, n_heldout=20, seed=seed,
                                 signal=signal)
        dm.setup()
        return dm.member_dataset().tensors(), dm.nonmember_dataset().tensors()

    (a_tr, a_ho), (b_tr, b_ho), (c_tr, _) = data(3), data(3), data(4)
    assert all(torch.equal(u, v) for u, v in zip(a_tr + a_ho, b_tr + b_ho))
    assert not torch.equal(a_tr[0], c_tr[0])
    assert torch.equal(torch.bincount(a_tr[1]), torch.full((4,), 10))  # balanced labels
    assert not torch.equal(a_tr[0][:20], a_ho[0])  # independent splits

    def nearest_centroid_acc(signal):
        dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=10, n_train=300, n_heldout=300, signal=signal)
        dm.setup()
        (xt, yt, _), (xh, yh, _) = dm.member_dataset().tensors(), dm.nonmember_dataset().tensors()
        cent = torch.stack([xt[yt == c].mean(0).flatten() for c in range(10)])
        pred = torch.cdist(xh.flatten(1), cent).argmin(1)
        return float((pred == yh).float().mean())

    assert nearest_centroid_acc(2.0) > 0.9
    assert nearest_centroid_acc(0.0) < 0.25  # pure noise: chance is 0.1


# ----------------------------------------------------------------------------------------------------------
# IndexedDataset / IndexedTensorDataset / registry / Lightning
# ----------------------------------------------------------------------------------------------------------
def test_indexed_dataset_wraps_pairs():
    imgs = torch.randint(0, 256, (5, 4, 4), dtype=torch.uint8)
    ds = IndexedDataset(TensorDataset(imgs, torch.arange(5)))
    x, y, i = ds[3]
    assert x.shape == (1, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[0], imgs[3].float() / 255.0)
    assert y.dtype == torch.int64 and int(y) == 3 and i.dtype == torch.int64 and int(i) == 3 and i.ndim == 0
    ds = IndexedDataset([(np.ones((2, 3, 3), np.float64), 1)])
    assert ds[0][0].dtype == torch.float32 and ds[0][0].shape == (2, 3, 3)
    pattern = r"expects \(x, y\) items, but item 0 is a tuple of length 3 \(it looks already"
    with pytest.raises(TypeError, match=pattern):
        IndexedDataset(TensorDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.zeros(2)))
    with pytest.raises(TypeError, match="item 0 is a Tensor"):
        IndexedDataset(torch.zeros(3, 2))
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 2, 2), 0

    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(Stream())


def test_indexed_tensor_dataset_pickles_after_use():
    ds = IndexedTensorDataset(torch.zeros(4, 1, 3, 3), torch.arange(4), transform=RandomHorizontalFlip())
    ds[0]  # creates the generator
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2][0], ds.with_transform(None)[2][0])


def test_registry_builds_datamodules():
    dm = D.build_datamodule({"name": "synthetic", "n_train": 8, "n_heldout": 4}, batch_size=2)
    assert isinstance(dm, SyntheticDataModule) and dm.batch_size == 2
    assert D.build_datamodule("fashion_mnist").dataset == "fashion_mnist"
    assert D.build_datamodule({"name": "cifar100", "data_dir": "x"}).num_classes == 100
    with pytest.raises(KeyError, match="Known datamodules: cifar10, cifar100, digits, fashion_mnist, mnist, synthetic"):
        D.build_datamodule("svhn")


def test_fit_with_lightning_trainer(tmp_path):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)
            self.seen = []

        def training_step(self, batch, _):
            x, y, index = batch
            self.seen.append(index)
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y, _ = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=64, train_subset=128)
    model = Tiny()
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert sorted(torch.cat(model.seen).tolist()) == sorted(dm.member_dataset().tensors()[2].tolist())


def test_no_module_level_torchvision_import():
    """torchvision is an optional extra: it may only be imported inside functions."""
    import ast

    assert "torchvision" not in sys.modules or sys.modules["torchvision"] is None
    for path in Path(D.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "torchvision" for n in names), f"{path.name} imports torchvision"


def test_items_at_equals_collating_items_one_by_one():
    # the audit pass reads whole batches with items_at; reference: torch's default collate of dataset[i]
    from torch.utils.data import default_collate

    from lightning_mia.data import IndexedTensorDataset

    g = torch.Generator().manual_seed(0)
    ds = IndexedTensorDataset(torch.randint(0, 256, (20, 3, 5, 5), dtype=torch.uint8, generator=g),
                              torch.randint(0, 4, (20,), generator=g), indices=torch.arange(100, 120),
                              mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    pos = np.array([7, 0, 19, 7, 3])
    want = default_collate([ds[int(i)] for i in pos])
    for got, ref in zip(ds.items_at(pos), want):
        assert got.dtype == ref.dtype and torch.equal(got, ref)
    with pytest.raises(ValueError, match="without a transform"):
        ds.with_transform(lambda x, generator: x).items_at(pos)


def test_the_audit_pass_gives_the_same_arrays_with_or_without_the_batch_path():
    from lightning_mia.data import IndexedTensorDataset
    from lightning_mia.extraction import extract_pass
    from lightning_mia.features import FEATURES
    from lightning_mia.models import build_model

    class ItemsOnly(torch.utils.data.Dataset):  # hides items_at: the DataLoader path
        def __init__(self, ds):
            self.ds, self.transform = ds, None

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

    g = torch.Generator().manual_seed(1)
    ds = IndexedTensorDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g),
                              torch.randint(0, 10, (40,), generator=g), mean=[0.3], std=[0.3])
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, input_shape=(1, 28, 28))
    feats = {s.tag: FEATURES.build(s) for s in FEATURES.resolve_all(["confidence", "loss", "gradient_norms"])}
    pos = np.array([3, 1, 4, 15, 9, 26, 5, 35, 8, 39, 7])
    fast = extract_pass(model, ds, pos, feats, batch_size=4)
    slow = extract_pass(model, ItemsOnly(ds), pos, feats, batch_size=4)
    for tag in feats:
        np.testing.assert_array_equal(fast.features[tag], slow.features[tag])
    for name in ("label", "loss", "pred", "index", "correct"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
