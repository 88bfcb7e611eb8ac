"""The audit pool: which training samples (members) and held-out samples (non-members) are attacked.

Positions are positions in the datamodule's ``member_dataset()`` / ``nonmember_dataset()``; ``*_indices`` are the
``index`` values those samples carry in their batches (equal to the positions unless a datamodule subsets its
split). The pool is drawn once, seeded, and saved to ``mia/audit.json`` so a run can be audited again later.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from lightning_mia.io import atomic_write_text

# The paper keeps the member:non-member ratio of CIFAR's train:test split, 5:1 (Rezaei & Liu 2021, §3).
DEFAULT_RATIO = 5.0


@dataclass
class AuditPool:
    """Member and non-member positions, with the seed that drew them.

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

    @property
    def n_members(self) -> int:
        return int(len(self.member_positions))

    @property
    def n_nonmembers(self) -> int:
        return int(len(self.nonmember_positions))

    def to_dict(self) -> Dict[str, Any]:
        def lst(a: Optional[np.ndarray]) -> Optional[List[int]]:
            return None if a is None else [int(v) for v in a]

        return {
            "seed": int(self.seed),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "member_indices": lst(self.member_indices if self.member_indices is not None else self.member_positions),
            "nonmember_indices": lst(self.nonmember_indices if self.nonmember_indices is not None
                                     else self.nonmember_positions),
            "member_positions": lst(self.member_positions),
            "nonmember_positions": lst(self.nonmember_positions),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AuditPool":
        def arr(key: str) -> Optional[np.ndarray]:
            v = d.get(key)
            return None if v is None else np.asarray(v, dtype=np.int64)

        mp = arr("member_positions")
        nmp = arr("nonmember_positions")
        return cls(
            member_positions=mp if mp is not None else arr("member_indices"),
            nonmember_positions=nmp if nmp is not None else arr("nonmember_indices"),
            seed=int(d.get("seed", 0)),
            member_indices=arr("member_indices"),
            nonmember_indices=arr("nonmember_indices"),
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "AuditPool":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


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
    size given, the other follows from ``ratio`` (capped by what exists). Sizes larger than the data are an error.
    """
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"Need at least one training and one held-out sample, got {n_train} and {n_heldout}")
    if not ratio > 0:
        raise ValueError(f"ratio (members per non-member) must be > 0, got {ratio}")
    if n_members is not None and not 1 <= n_members <= n_train:
        raise ValueError(f"n_members={n_members} is outside 1..{n_train} (the training split has {n_train} samples)")
    if n_nonmembers is not None and not 1 <= n_nonmembers <= n_heldout:
        raise ValueError(
            f"n_nonmembers={n_nonmembers} is outside 1..{n_heldout} (the held-out split has {n_heldout} samples)")
    if n_members is None and n_nonmembers is None:
        n_nonmembers = min(n_heldout, int(n_train / ratio))
        n_members = min(n_train, int(round(n_nonmembers * ratio)))
    elif n_members is None:
        n_members = min(n_train, max(1, int(round(n_nonmembers * ratio))))
    elif n_nonmembers is None:
        n_nonmembers = min(n_heldout, max(1, int(round(n_members / ratio))))
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
    out = []
    for p in positions:
        x = dataset[int(p)][0]
        out.append(np.ascontiguousarray(x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)).tobytes())
    return out


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
