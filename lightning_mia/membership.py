"""``MembershipData``: the per-sample arrays of one audit, validated once.

What the extraction pass produces and what the protocols, the auditor and the writer consume -- the analogue of
TensorFlow Privacy's ``AttackInputData``, with the target model's correctness carried along so every attack can
be reported on all, correctly classified and misclassified samples.

Example:
    >>> import numpy as np
    >>> d = MembershipData(features={"loss": np.array([0.1, 2.0, 0.3])}, is_member=[1, 0, 1],
    ...                    correct=[True, False, True], label=[0, 1, 2])
    >>> d.n, d.features["loss"].shape, d.select(d.is_member).n
    (3, (3, 1), 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

#: Sort key offsets that keep members, non-members and each OOD source apart when shards are merged.
_MEMBER_BIT, _SOURCE_BIT = 2**40, 2**41


def _vector(value: Any, name: str, n: Optional[int], dtype: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"MembershipData: {name} has {arr.shape[0]} entries for {n} samples")
    if dtype is bool and arr.dtype != bool:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"MembershipData: {name} must be boolean or 0/1")
    return arr.astype(dtype, copy=False)


@dataclass(frozen=True)
class MembershipData:
    """Per-sample arrays of an audit (``n`` samples); every array is checked to have ``n`` rows.

    Attributes:
        features: ``{tag: (n, d) float64}`` feature values (a 1-D array is one column).
        is_member: ``(n,)`` bool, True for training samples.
        correct: ``(n,)`` bool, the target model classifies the sample correctly.
        label: ``(n,)`` int64 true class (the predicted class for unlabelled OOD samples).
        loss, pred: ``(n,)`` per-sample loss and predicted class (NaN / -1 when not known).
        index: ``(n,)`` the sample's ``index`` as its dataset reports it; ``position``: its position in the dataset.
        source: ``(n,)`` 0 for the audit pool, ``k`` for the k-th out-of-distribution source.
    """

    features: Mapping[str, np.ndarray]
    is_member: np.ndarray
    correct: np.ndarray
    label: np.ndarray
    loss: Optional[np.ndarray] = None
    pred: Optional[np.ndarray] = None
    index: Optional[np.ndarray] = None
    position: Optional[np.ndarray] = None
    source: Optional[np.ndarray] = None
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        member = _vector(self.is_member, "is_member", None, bool)
        n = member.shape[0]
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        put("is_member", member)
        put("correct", _vector(self.correct, "correct", n, bool))
        put("label", _vector(self.label, "label", n, np.int64))
        put("loss", np.full(n, np.nan) if self.loss is None else _vector(self.loss, "loss", n, np.float64))
        put("pred", np.full(n, -1, np.int64) if self.pred is None else _vector(self.pred, "pred", n, np.int64))
        put("index", np.arange(n) if self.index is None else _vector(self.index, "index", n, np.int64))
        put("position", np.arange(n) if self.position is None else _vector(self.position, "position", n, np.int64))
        put("source", np.zeros(n, np.int64) if self.source is None else _vector(self.source, "source", n, np.int64))
        feats: Dict[str, np.ndarray] = {}
        for tag, X in dict(self.features).items():
            X = np.asarray(X, dtype=np.float64)
            X = X[:, None] if X.ndim == 1 else X.reshape(X.shape[0], -1) if X.ndim > 2 else X
            if X.shape[0] != n:
                raise ValueError(f"MembershipData: feature {tag!r} has {X.shape[0]} rows for {n} samples")
            feats[tag] = X
        put("features", feats)
        put("extra", {k: np.asarray(v) for k, v in dict(self.extra).items()})

    @property
    def n(self) -> int:
        return int(self.is_member.shape[0])

    def _arrays(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("features", "extra")}

    def select(self, mask: Any) -> "MembershipData":
        """The samples where ``mask`` (bool mask or integer indices) selects."""
        mask = np.asarray(mask)
        return MembershipData(features={k: v[mask] for k, v in self.features.items()},
                              extra={k: v[mask] for k, v in self.extra.items()},
                              **{k: v[mask] for k, v in self._arrays().items()})

    def pool(self) -> "MembershipData":
        """The audit pool (``source == 0``): members and held-out non-members."""
        return self.select(self.source == 0)

    def with_features(self, features: Mapping[str, np.ndarray]) -> "MembershipData":
        """The same samples with another feature dict."""
        return replace(self, features=dict(features))

    def sort_key(self) -> np.ndarray:
        """A key that orders pool members, pool non-members and each OOD source by position, without clashes."""
        return self.position + np.where(self.is_member, 0, _MEMBER_BIT) + self.source * _SOURCE_BIT

    @staticmethod
    def concat(parts: Iterable["MembershipData"]) -> "MembershipData":
        """Concatenate shards, order them by :meth:`sort_key` and drop repeated samples (padded shards)."""
        parts = [p for p in parts if p is not None]
        nonempty = [p for p in parts if p.n] or parts[:1]
        if not nonempty:
            raise ValueError("MembershipData.concat needs at least one part")
        first = nonempty[0]
        tags, extras = list(first.features), list(first.extra)
        arrays = {k: np.concatenate([p._arrays()[k] for p in nonempty]) for k in first._arrays()}
        feats = {t: np.concatenate([p.features[t] for p in nonempty]) for t in tags}
        extra = {k: np.concatenate([p.extra[k] for p in nonempty]) for k in extras}
        merged = MembershipData(features=feats, extra=extra, **arrays)
        _, keep = np.unique(merged.sort_key(), return_index=True)  # sorted, de-duplicated
        return merged.select(keep)


def finite_rows(X: Any) -> np.ndarray:
    """Boolean mask of rows whose values are all finite."""
    X = np.asarray(X, dtype=np.float64)
    return np.isfinite(X.reshape(len(X), -1)).all(axis=1)
