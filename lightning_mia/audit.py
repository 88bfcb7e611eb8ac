"""The audit pool: which training samples (members) and held-out samples (non-members) are attacked.

Positions are positions in the datamodule's ``member_dataset()`` / ``nonmember_dataset()``; ``*_indices`` are the
``index`` values those samples carry in their batches (their position in the *original* split, which differs from
the position when a datamodule trains on a ``train_subset`` / ``heldout_subset``). The pool is drawn once, seeded,
and saved to ``mia/audit.json`` with both, so a run can be audited again later and every audited sample traces
back to its data file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from lightning_mia.io import atomic_write_text

# The paper keeps the member:non-member ratio of CIFAR's train:test split, 5:1 (Rezaei & Liu 2021, §3).
DEFAULT_RATIO = 5.0

#: The largest position / index / seed an audit file may hold (int64, what every array of the package uses).
MAX_INT = 2**63 - 1


# ----------------------------------------------------------------------------------------------------------
# strict integers (audit.json, pool sizes)
# ----------------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _describe(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return f"a {'JSON object' if isinstance(v, dict) else 'list'}"
    if v is None:
        return "null"
    return repr(v)


def _int_field(name: str, v: Any, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """``v`` as an int, refusing bools, floats (also 3.0), null, strings, containers and out-of-range values."""
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {_describe(v)}")
    if not minimum <= int(v) <= maximum:
        raise ValueError(f"{name} must be an integer in {minimum}..{maximum}, got {int(v)}")
    return int(v)


def _int_array(name: str, v: Any, allow_none: bool = False) -> Optional[np.ndarray]:
    """A flat list of integers in 0..MAX_INT as an int64 array; the message names the field and the first bad item."""
    if v is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a list of integers, got null")
    if isinstance(v, np.ndarray):
        if v.ndim != 1 or not (np.issubdtype(v.dtype, np.integer) and v.dtype != np.bool_):
            raise ValueError(f"{name} must be a flat list of integers, got an array of {v.dtype} {v.shape}")
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {_describe(v)}")
    for k, item in enumerate(v):
        if not _is_int(item):
            raise ValueError(f"{name}[{k}] must be an integer, got {_describe(item)}")
        if not 0 <= int(item) <= MAX_INT:
            raise ValueError(f"{name}[{k}] must be an integer in 0..{MAX_INT}, got {int(item)}")
    return np.asarray(v, dtype=np.int64).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# what the samples of a dataset carry
# ----------------------------------------------------------------------------------------------------------
def _fast_column(dataset: Any, attr: str, column: int, positions: np.ndarray) -> Optional[np.ndarray]:
    """``dataset.<attr>[positions]`` for in-memory indexed datasets, checked against two items; else ``None``."""
    import torch

    values = getattr(dataset, attr, None)
    if not callable(getattr(dataset, "tensors", None)) or not isinstance(values, torch.Tensor):
        return None
    try:
        if values.ndim != 1 or len(values) != len(dataset):
            return None
        out = values[torch.as_tensor(positions, dtype=torch.int64)].cpu().numpy()
        for k in {0, len(positions) - 1} if len(positions) else ():  # the items must report the same values
            if int(dataset[int(positions[k])][column]) != int(out[k]):
                return None
    except Exception:
        return None
    return out


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def pool_columns(dataset: Any, positions: Any) -> "tuple[np.ndarray, np.ndarray]":
    """``(index values, labels)`` of the samples at ``positions``, in one pass over the items when the dataset
    cannot hand them over in bulk."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    index, labels = _fast_column(dataset, "indices", 2, positions), _fast_column(dataset, "targets", 1, positions)
    if index is None or labels is None:
        items = [dataset[int(p)] for p in positions]
        index = np.asarray([_scalar(it[2]) for it in items]) if index is None else index
        labels = np.asarray([_scalar(it[1]) for it in items]) if labels is None else labels
    return _as_index(index), labels.reshape(-1)


def _as_index(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.size and (values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"Dataset items must carry an integer index, got {values.dtype} values")
    return values.astype(np.int64).reshape(-1)


def _column(dataset: Any, positions: Any, column: int, attr: str) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    fast = _fast_column(dataset, attr, column, positions)
    if fast is not None:
        return fast
    return np.asarray([_scalar(dataset[int(p)][column]) for p in positions])


def pool_indices(dataset: Any, positions: Any) -> np.ndarray:
    """The ``index`` values (int64) that the samples at ``positions`` of ``dataset`` carry in their items.

    Example:
        >>> import torch
        >>> from lightning_mia.data import IndexedTensorDataset
        >>> ds = IndexedTensorDataset(torch.zeros(3, 1, 2, 2), torch.arange(3), indices=torch.tensor([7, 8, 9]))
        >>> pool_indices(ds, [0, 2]).tolist()
        [7, 9]
    """
    return _as_index(_column(dataset, positions, 2, "indices"))


def pool_labels(dataset: Any, positions: Any) -> np.ndarray:
    """The labels ``y`` of the samples at ``positions`` of ``dataset`` (dtype as stored: floats stay floats)."""
    return _column(dataset, positions, 1, "targets").reshape(-1)


def check_labels(labels: Any, num_classes: Optional[int], where: str, indices: Any = None) -> None:
    """Refuse labels that are not integers in ``[0, num_classes)`` (``num_classes=None``: only ``>= 0``).

    A label of -1 (unlabelled) or beyond the model's outputs would make the target accuracy, the loss feature
    and the per-class protocol silently wrong. Only the member / non-member datasets are checked: OOD sources
    use -1 on purpose. ``indices`` (default: the positions) name the first bad sample in the message.

    Example:
        >>> check_labels([0, 2, 1], 3, "member dataset")
        >>> try:
        ...     check_labels([0, -1, 5], 3, "member dataset", indices=[10, 11, 12])
        ... except ValueError as err:
        ...     print(str(err)[:83])
        The member dataset holds a label outside 0..2: sample with index 11 has label -1 (2
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        y = y.reshape(-1)
    idx = np.arange(len(y)) if indices is None else np.asarray(indices).reshape(-1)
    if len(idx) != len(y):
        raise ValueError(f"check_labels: {len(y)} labels but {len(idx)} indices")
    if y.size == 0:
        return
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"The {where} holds labels of type {y.dtype}; labels must be integer class numbers")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"The {where} holds a non-integer label: sample with index {int(idx[k])} has label "
                             f"{y[k].item()!r}; labels must be integer class numbers")
    hi = math.inf if num_classes is None else int(num_classes)
    bad = (y < 0) | (y >= hi)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        label = y[k].item()
        rng = "0.." if num_classes is None else f"0..{int(num_classes) - 1}"
        label = int(label) if float(label).is_integer() else label
        raise ValueError(
            f"The {where} holds a label outside {rng}: sample with index {int(idx[k])} has label {label} "
            f"({int(bad.sum())} bad label{'s' if bad.sum() > 1 else ''} in all). Labels must be class numbers "
            "0..num_classes-1; check the datamodule's labels and the model's num_classes.")


def check_dataset_labels(dataset: Any, positions: Any, num_classes: Optional[int], where: str) -> np.ndarray:
    """:func:`check_labels` on the samples at ``positions`` of ``dataset`` (messages name their ``index``);
    returns those samples' ``index`` values (read in the same pass)."""
    index, labels = pool_columns(dataset, positions)
    check_labels(labels, num_classes, where, index)
    return index


# ----------------------------------------------------------------------------------------------------------
# the pool
# ----------------------------------------------------------------------------------------------------------
@dataclass
class AuditPool:
    """Member and non-member positions, the ``index`` values of those samples, and the seed that drew them.

    ``member_indices`` / ``nonmember_indices`` are ``None`` until :meth:`attach_indices` (or :meth:`save` with the
    datasets) reads them from the datasets; ``fingerprint`` (see :mod:`lightning_mia.fingerprint`) identifies the
    pool, the data split and the monitor settings it was audited with.

    Example:
        >>> pool = make_audit_pool(n_train=100, n_heldout=30, ratio=5.0, seed=0)
        >>> len(pool.member_positions), len(pool.nonmember_positions)
        (100, 20)
    """

    member_positions: np.ndarray
    nonmember_positions: np.ndarray
    seed: int
    member_indices: Optional[np.ndarray] = None
    nonmember_indices: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    fingerprint: Optional[Dict[str, Any]] = None

    @property
    def n_members(self) -> int:
        return int(len(self.member_positions))

    @property
    def n_nonmembers(self) -> int:
        return int(len(self.nonmember_positions))

    def attach_indices(self, member_dataset: Any, nonmember_dataset: Any) -> "AuditPool":
        """Read the samples' own ``index`` values from the datasets (in place; returns ``self``).

        When the pool already records index values (a resumed run, an ``audit_file``) they must be the ones the
        samples carry now: otherwise the positions point at other samples (another split, subset or data
        files), and auditing them would mix two audit pools. That is a ValueError saying so.
        """
        return self.set_indices(pool_indices(member_dataset, self.member_positions),
                                pool_indices(nonmember_dataset, self.nonmember_positions))

    def set_indices(self, member_indices: np.ndarray, nonmember_indices: np.ndarray) -> "AuditPool":
        """:meth:`attach_indices` with index values already read (e.g. by :func:`check_dataset_labels`)."""
        checked = []
        for name, now, pos, attr in (("member", member_indices, self.member_positions, "member_indices"),
                                     ("non-member", nonmember_indices, self.nonmember_positions, "nonmember_indices")):
            now = np.asarray(now, dtype=np.int64).reshape(-1)
            if len(now) != len(pos):
                raise ValueError(f"{len(now)} {name} index values for {len(pos)} {name} positions")
            before = getattr(self, attr)
            if before is not None and not np.array_equal(np.asarray(before, np.int64), now):
                bad = int(np.flatnonzero(np.asarray(before) != now)[0]) if len(before) == len(now) else 0
                raise ValueError(
                    f"The {name} audit pool does not match the {name} dataset: position "
                    f"{int(pos[bad]) if len(pos) else '?'} was the sample with index "
                    f"{int(before[bad]) if len(before) else '?'} and now holds index "
                    f"{int(now[bad]) if len(now) else '?'}. The data split (datamodule seed, train_subset / "
                    "heldout_subset or data files) differs from the one the pool was drawn on; use the same data "
                    "settings, or start a fresh audit in a new run directory.")
            checked.append((attr, now))
        for attr, now in checked:  # both sides checked before either is set
            setattr(self, attr, now)
        return self

    def to_dict(self) -> Dict[str, Any]:
        def lst(a: Optional[np.ndarray]) -> Optional[List[int]]:
            return None if a is None else [int(v) for v in a]

        out = {
            "seed": int(self.seed),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            # the samples' own index values (null when not read from the datasets: never the positions)
            "member_indices": lst(self.member_indices),
            "nonmember_indices": lst(self.nonmember_indices),
            "member_positions": lst(self.member_positions),
            "nonmember_positions": lst(self.nonmember_positions),
            "meta": dict(self.meta),
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "audit pool") -> "AuditPool":
        """Validate and build; every field must hold integers only (the message names the field and ``where``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"The {where} must be a JSON object with member_positions and nonmember_positions, "
                             f"got {_describe(d)}")
        try:
            pools = {}
            for side in ("member", "nonmember"):
                pos = _int_array(f"{side}_positions", d.get(f"{side}_positions"), allow_none=True)
                idx = _int_array(f"{side}_indices", d.get(f"{side}_indices"), allow_none=True)
                if pos is None:  # files of older versions held the positions under *_indices only
                    if idx is None:
                        raise ValueError(f"{side}_positions is missing")
                    pos, idx = idx, None
                if idx is not None and len(idx) != len(pos):
                    raise ValueError(f"{side}_indices has {len(idx)} entries but {side}_positions {len(pos)}")
                n = d.get(f"n_{side}s")
                if n is not None and _int_field(f"n_{side}s", n) != len(pos):
                    raise ValueError(f"n_{side}s is {n} but {side}_positions has {len(pos)} entries")
                pools[side] = (pos, idx)
            seed = _int_field("seed", d.get("seed", 0))
            meta = d.get("meta")
            if meta is not None and not isinstance(meta, Mapping):
                raise ValueError(f"meta must be a JSON object, got {_describe(meta)}")
            fp = d.get("fingerprint")
            if fp is not None and not isinstance(fp, Mapping):
                raise ValueError(f"fingerprint must be a JSON object, got {_describe(fp)}")
        except ValueError as err:
            raise ValueError(f"Invalid {where}: {err}") from None
        return cls(member_positions=pools["member"][0], nonmember_positions=pools["nonmember"][0], seed=seed,
                   member_indices=pools["member"][1], nonmember_indices=pools["nonmember"][1],
                   meta=dict(meta or {}), fingerprint=None if fp is None else dict(fp))

    def save(self, path: str, member_dataset: Any = None, nonmember_dataset: Any = None) -> None:
        """Write ``audit.json`` atomically; with the datasets, the samples' ``index`` values are read first."""
        if (member_dataset is None) != (nonmember_dataset is None):
            raise ValueError("Pass both member_dataset and nonmember_dataset to AuditPool.save, or neither")
        if member_dataset is not None:
            self.attach_indices(member_dataset, nonmember_dataset)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "AuditPool":
        """Read an ``audit.json``; a file that is not one is a ValueError naming it (and the field at fault)."""
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"The audit file {path} does not exist (it is the mia/audit.json of a run)") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"The audit file {path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                             "is it an audit.json?") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"The audit file {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg})") from None
        except RecursionError:
            raise ValueError(f"The audit file {path} nests too deeply to be an audit.json") from None
        return cls.from_dict(d, where=f"audit file {path}")


def _size_arg(name: str, v: Any, allow_none: bool) -> Optional[int]:
    if v is None and allow_none:
        return None
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''}, got {_describe(v)}")
    if int(v) > MAX_INT:
        raise ValueError(f"{name}={int(v)} is too large (at most {MAX_INT})")
    return int(v)


def make_audit_pool(
    n_train: int,
    n_heldout: int,
    n_members: Optional[int] = None,
    n_nonmembers: Optional[int] = None,
    ratio: float = DEFAULT_RATIO,
    seed: int = 0,
) -> AuditPool:
    """Draw a seeded audit pool.

    With neither size given, the pool is as large as the data allows at ``ratio`` members per non-member. With one
    size given, the other follows from ``ratio`` (capped by what exists). Sizes larger than the data are an error;
    so are sizes that are not integers (floats, bools, ``None`` where a size is needed) and a ratio that is not a
    finite number > 0.
    """
    n_train = _size_arg("n_train", n_train, False)
    n_heldout = _size_arg("n_heldout", n_heldout, False)
    n_members = _size_arg("n_members", n_members, True)
    n_nonmembers = _size_arg("n_nonmembers", n_nonmembers, True)
    seed = _int_field("seed", seed)
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"Need at least one training and one held-out sample, got {n_train} and {n_heldout}")
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, (int, float, np.number)) or not (
            math.isfinite(float(ratio)) and float(ratio) > 0):
        raise ValueError(f"ratio (members per non-member) must be a finite number > 0, got {ratio!r}")
    ratio = float(ratio)
    if n_members is not None and not 1 <= n_members <= n_train:
        raise ValueError(f"n_members={n_members} is outside 1..{n_train} (the training split has {n_train} samples)")
    if n_nonmembers is not None and not 1 <= n_nonmembers <= n_heldout:
        raise ValueError(
            f"n_nonmembers={n_nonmembers} is outside 1..{n_heldout} (the held-out split has {n_heldout} samples)")
    if n_members is None and n_nonmembers is None:
        n_nonmembers = min(n_heldout, int(min(n_train / ratio, n_heldout)))
        n_members = min(n_train, int(round(min(n_nonmembers * ratio, n_train))))
    elif n_members is None:
        n_members = min(n_train, max(1, int(round(min(n_nonmembers * ratio, n_train)))))
    elif n_nonmembers is None:
        n_nonmembers = min(n_heldout, max(1, int(round(min(n_members / ratio, n_heldout)))))
    n_nonmembers = max(1, int(n_nonmembers))
    n_members = max(1, int(n_members))
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(n_train, size=n_members, replace=False))
    nonmembers = np.sort(rng.choice(n_heldout, size=n_nonmembers, replace=False))
    return AuditPool(members.astype(np.int64), nonmembers.astype(np.int64), seed=int(seed))


def validate_audit_pool(pool: AuditPool, n_train: int, n_heldout: int) -> None:
    """Refuse pools that point outside the data or repeat samples."""
    for name, pos, n in (("member", pool.member_positions, n_train), ("non-member", pool.nonmember_positions, n_heldout)):
        if len(pos) == 0:
            raise ValueError(f"The audit pool has no {name}s")
        bad = pos[(pos < 0) | (pos >= n)]
        if len(bad):
            raise ValueError(f"{len(bad)} {name} audit indices are outside the dataset of {n} samples "
                             f"(e.g. {bad[:5].tolist()})")
        if len(np.unique(pos)) != len(pos):
            raise ValueError(f"The {name} audit indices contain duplicates")


def _item_bytes(dataset: Any, positions: np.ndarray) -> List[bytes]:
    """Raw bytes of each sample's input, read in bulk when the dataset can hand over its tensors."""
    tensors = getattr(dataset, "tensors", None)
    if callable(tensors) and len(positions) == len(dataset):
        x = tensors()[0]
        x = x.reshape(len(x), -1).cpu().numpy()
        return [x[int(p)].tobytes() for p in positions]
    from lightning_mia.compat import input_bytes  # tensors: their raw bytes, as before; dicts/tuples: by content

    return [input_bytes(dataset[int(p)][0]) for p in positions]


def sample_digests(dataset: Any, positions: Optional[np.ndarray] = None) -> List[bytes]:
    """A 16-byte BLAKE2b digest of every sample's input (``positions`` default: all samples)."""
    import hashlib

    positions = np.arange(len(dataset)) if positions is None else np.asarray(positions)
    return [hashlib.blake2b(b, digest_size=16).digest() for b in _item_bytes(dataset, positions)]


def check_nonmembers_unseen(train_dataset: Any, nonmember_dataset: Any, nonmember_positions: np.ndarray,
                            max_fraction: float = 0.01) -> int:
    """Refuse a non-member pool that overlaps the training data: identical inputs on both sides fake a leak.

    Returns how many audit non-members are identical to a training sample. Real data sets hold a few exact
    duplicates across their splits; up to ``max_fraction`` of the non-members is tolerated (the caller warns),
    more is a ``ValueError``.
    """
    train = set(sample_digests(train_dataset))
    nonmembers = sample_digests(nonmember_dataset, nonmember_positions)
    n_seen = sum(d in train for d in nonmembers)
    if n_seen > max_fraction * len(nonmembers):
        raise ValueError(
            f"{n_seen} of {len(nonmembers)} audit non-members are identical to samples of the training data: the "
            "non-member pool must be held-out data the model never trains on (overlap would fake a membership "
            "leak). Check that member_dataset and nonmember_dataset come from disjoint splits.")
    return n_seen
