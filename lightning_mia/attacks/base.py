"""Attack base class, the ``ATTACKS`` registry and ``build_attack``.

An attack is a binary classifier on per-sample feature rows: label 1 = member (positive), and
``score`` is higher for samples more likely to be members.

Non-finite features (policy): features such as boundary distances or gradient norms can be inf/NaN
(a failed search, an overflow).  ``fit`` drops rows with any non-finite value (their count is kept in
``n_dropped_``) and raises ``ValueError`` when fewer than one member and one non-member remain;
``score`` returns NaN and ``predict`` returns False (non-member) for such rows, so nothing crashes.
The evaluation protocol (:mod:`lightning_mia.attacks.protocol`) drops non-finite rows before it
splits and reports their number as ``n_nonfinite``; the paper preset instead mirrors the authors'
``np.nan_to_num(posinf=1e5, neginf=-1e5)``.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Union

import numpy as np

from lightning_mia.registry import Registry
from lightning_mia.validation import check_choice, check_int

__all__ = ["ATTACKS", "Attack", "build_attack", "as_2d", "check_int", "check_choice"]

ATTACKS = Registry("attack")


def as_2d(X: Any) -> np.ndarray:
    """Features as a float64 (n, d) array; a 1-D array is one feature column."""
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim != 2:
        arr = arr.reshape(arr.shape[0], -1)
    return arr


class Attack:
    """Base class of membership-inference attacks (member = 1, higher score = more likely member).

    Subclasses implement ``_fit(X, y, sample_weight)`` and ``_score(X)`` on finite 2-D float arrays;
    this class handles input checks, the non-finite policy (module docstring) and ``predict``
    (``score >= threshold_``; ``threshold_`` = 0.5 for probabilistic attacks).

    Example:
        >>> import numpy as np
        >>> from lightning_mia.attacks import build_attack
        >>> rng = np.random.default_rng(0)
        >>> y = rng.random(400) < 0.5
        >>> X = rng.normal(size=(400, 3)) + 2.0 * y[:, None]
        >>> attack = build_attack("logistic_regression", seed=0).fit(X, y)
        >>> bool((attack.predict(X) == y).mean() > 0.9)
        True
    """

    #: True when the attack only accepts a single feature column (the threshold attack).
    requires_1d: bool = False
    #: Registry name, set by subclasses.
    name: str = "attack"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed, 0)
        self.threshold_: float = 0.5
        self.n_features_: Optional[int] = None
        self.n_dropped_: int = 0

    # -- public API -----------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, sample_weight: Optional[Any] = None) -> "Attack":
        """Fit on features ``X`` (n, d) and membership labels ``y`` (bool or 0/1); returns self."""
        X = as_2d(X)
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
        if y.dtype != bool:
            if y.size and not np.all(np.isin(y, (0, 1))):
                raise ValueError("y must be boolean or 0/1 membership labels")
            y = y.astype(bool)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if sample_weight.shape[0] != X.shape[0]:
                raise ValueError(f"sample_weight has {sample_weight.shape[0]} entries, X has {X.shape[0]} rows")
        if self.requires_1d and X.shape[1] != 1:
            X = self._select_1d(X)
        finite = np.isfinite(X).all(axis=1)
        self.n_dropped_ = int((~finite).sum())
        if self.n_dropped_:
            X, y = X[finite], y[finite]
            if sample_weight is not None:
                sample_weight = sample_weight[finite]
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            raise ValueError(
                f"{type(self).__name__}.fit needs members and non-members with finite features; "
                f"got {n_pos} members and {y.size - n_pos} non-members"
            )
        self.n_features_ = X.shape[1]
        self._fit(X, y, sample_weight)
        return self

    def score(self, X: Any) -> np.ndarray:
        """Membership score per row (higher = member); NaN for rows with non-finite features."""
        if self.n_features_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted yet; call fit first")
        X = as_2d(X)
        if self.requires_1d and X.shape[1] != 1:
            X = self._select_1d(X)
        if X.shape[1] != self.n_features_:
            raise ValueError(f"X has {X.shape[1]} features, the attack was fitted on {self.n_features_}")
        out = np.full(X.shape[0], np.nan)
        finite = np.isfinite(X).all(axis=1)
        if finite.any():
            out[finite] = self._score(X[finite])
        return out

    def predict(self, X: Any) -> np.ndarray:
        """Boolean membership prediction: ``score >= threshold_`` (False for non-finite rows)."""
        s = self.score(X)
        with np.errstate(invalid="ignore"):
            return s >= self.threshold_

    def spawn(self, seed: int) -> "Attack":
        """An unfitted copy with another seed (used by the protocol to fit one model per split)."""
        clone = copy.deepcopy(self)
        clone.seed = check_int("seed", seed, 0)
        clone.threshold_ = 0.5
        clone.n_features_ = None
        clone.n_dropped_ = 0
        return clone

    # -- subclass hooks -------------------------------------------------------------------------
    def _select_1d(self, X: np.ndarray) -> np.ndarray:
        raise ValueError(f"{type(self).__name__} needs a single feature column, got {X.shape[1]}")

    def _fit(self, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]) -> None:
        raise NotImplementedError

    def _score(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


def build_attack(spec: Union[str, Mapping[str, Any], Attack], seed: int = 0) -> Attack:
    """Build an attack from ``"name"`` or ``{"name": ..., **options}``; ``seed`` is the default seed
    (a ``seed`` in the spec wins).  An ``Attack`` instance is returned as an unfitted copy with ``seed``.

    Example:
        >>> from lightning_mia.attacks import build_attack
        >>> build_attack({"name": "threshold"}).requires_1d
        True
    """
    if isinstance(spec, Attack):
        return spec.spawn(seed)
    return ATTACKS.build(spec, seed=seed)
