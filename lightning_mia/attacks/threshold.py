"""Threshold attack on one score (e.g. true-class confidence or loss; Yeom et al. 2018).

The threshold and its direction are chosen on the attack's *training* split only, to maximise
(weighted) balanced accuracy, so evaluation on held-out rows is honest.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from lightning_mia.attacks.base import ATTACKS, Attack, check_int

__all__ = ["ThresholdAttack", "best_threshold"]


def best_threshold(x: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray] = None):
    """Best rule ``member iff direction * x >= direction * t`` by weighted balanced accuracy.

    Candidate thresholds are midpoints between consecutive distinct values (plus -inf / +inf, i.e.
    everything / nothing is a member); ``direction`` is +1 (members have larger values) or -1.
    Ties keep the first candidate in ascending threshold order, direction +1 first.

    Returns:
        ``(t, direction, balanced_accuracy_on_training_rows)``.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=bool).reshape(-1)
    w = np.ones_like(x) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs, ys, ws = x[order], y[order], w[order]
    w1, w0 = float(ws[ys].sum()), float(ws[~ys].sum())
    if w1 <= 0 or w0 <= 0:
        raise ValueError("best_threshold needs positive total weight for members and non-members")
    # Group ties: cumulative class weight at the end of each run of equal values.
    ends = np.r_[np.flatnonzero(np.diff(xs) != 0), xs.size - 1]
    cum1 = np.r_[0.0, np.cumsum(np.where(ys, ws, 0.0))[ends]]
    cum0 = np.r_[0.0, np.cumsum(np.where(ys, 0.0, ws))[ends]]
    # Candidate i: members are the values above the first i distinct values.
    tpr = (w1 - cum1) / w1
    fpr = (w0 - cum0) / w0
    bal_plus = 0.5 * (tpr + 1.0 - fpr)
    bal_minus = 1.0 - bal_plus  # complement rule: member iff x below the threshold
    i_plus = int(np.argmax(bal_plus))
    i_minus = int(np.argmax(bal_minus))
    values = xs[ends]
    if bal_plus[i_plus] >= bal_minus[i_minus]:
        i, direction, bal = i_plus, 1, float(bal_plus[i_plus])
    else:
        i, direction, bal = i_minus, -1, float(bal_minus[i_minus])
    if i == 0:
        t = -np.inf
    elif i == values.size:
        t = np.inf
    else:
        lo, hi = values[i - 1], values[i]
        t = float(lo + (hi - lo) / 2.0)  # midpoint without overflow
    return t, direction, bal


@ATTACKS.register("threshold")
class ThresholdAttack(Attack):
    """Member iff a single feature is above (or below) a learned threshold.

    Args:
        column: which feature column to use when ``X`` has several; ``None`` requires a single column.
        seed: unused (the attack is deterministic); accepted for a uniform interface.

    Attributes (after ``fit``): ``threshold_`` on the score scale, ``direction_`` (+1: members have
    larger feature values, -1: smaller), ``train_balanced_accuracy_``.  ``score(X) = direction_ * x``.

    Example:
        >>> import numpy as np
        >>> from lightning_mia.attacks import ThresholdAttack
        >>> x = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]); y = np.array([1, 1, 1, 0, 0, 0])
        >>> a = ThresholdAttack().fit(x, y)
        >>> a.direction_, a.threshold_, a.predict(np.array([0.0, 1.0])).tolist()
        (-1, -0.5, [True, False])
    """

    requires_1d = True
    name = "threshold"

    def __init__(self, column: Optional[int] = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.column = None if column is None else check_int("column", column, 0)
        self.direction_: int = 1
        self.train_balanced_accuracy_: float = float("nan")

    def _select_1d(self, X: np.ndarray) -> np.ndarray:
        if self.column is None:
            raise ValueError(
                f"the threshold attack needs a single feature column, got {X.shape[1]}; pass "
                "column=<index>, use a 1-D feature (e.g. 'loss', 'true_class_prob') or another attack"
            )
        if self.column >= X.shape[1]:
            raise ValueError(f"column={self.column} but X has only {X.shape[1]} columns")
        return X[:, [self.column]]

    def _fit(self, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]) -> None:
        t, d, bal = best_threshold(X[:, 0], y, sample_weight)
        self.direction_ = d
        self.threshold_ = d * t
        self.train_balanced_accuracy_ = bal

    def _score(self, X: np.ndarray) -> np.ndarray:
        return self.direction_ * X[:, 0]

    def __repr__(self) -> str:
        return f"ThresholdAttack(column={self.column})"
