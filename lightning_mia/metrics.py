"""Membership-inference metrics: pure functions on numpy arrays.

Conventions (docs/design.md §3): **member = positive class (1)**, higher attack score = more likely member.

Every metric is a ratio of confusion counts and is NaN -- never an exception and never a silent 0 --
when its ratio is 0/0.  Metrics that compare the two classes (balanced accuracy, advantage, AUC, TPR at
low FPR) are NaN whenever the slice lacks members or non-members.  Counts are always reported, so an
empty or one-sided slice shows up as ``n_members == 0`` / ``n_nonmembers == 0`` next to its NaNs.

Why both classes: Rezaei & Liu (CVPR 2021, Sec. 3) show that precision/recall of the member class alone
hide a high false-alarm rate because the evaluation set is usually member-heavy (5:1); they report
balanced accuracy and FAR (= FPR), precision/recall of *both* classes, and the naive / ZeroR baselines.

Example:
    >>> import numpy as np
    >>> from lightning_mia.metrics import attack_metrics, naive_baseline
    >>> y = np.array([1, 1, 1, 0, 0])
    >>> s = np.array([0.9, 0.8, 0.3, 0.7, 0.1])
    >>> m = attack_metrics(y, s, s >= 0.5)
    >>> round(m["balanced_accuracy"], 4), m["far"], round(m["auc"], 4)
    (0.5833, 0.5, 0.8333)
    >>> naive_baseline(y, correct=np.array([1, 1, 0, 1, 0], bool))["far"]
    0.5
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BINARY_METRIC_KEYS",
    "SCORE_METRIC_KEYS",
    "METRIC_KEYS",
    "COUNT_KEYS",
    "binary_metrics",
    "score_metrics",
    "attack_metrics",
    "roc_points",
    "tpr_at_fpr",
    "naive_baseline",
    "zeror_baseline",
    "nan_metrics",
    "mean_std",
]

#: Metrics computed from hard predictions.
BINARY_METRIC_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "far",
    "tpr",
    "tnr",
    "precision_member",
    "recall_member",
    "precision_nonmember",
    "recall_nonmember",
    "f1",
    "f1_nonmember",
    "advantage",
)
# FPR budgets of the low-FPR operating points (Carlini et al., "Membership Inference Attacks From First
# Principles", 2022, report TPR at 1%, 0.1% and 0.001% FPR; we stop at 0.01%, already 10,000 non-members).
LOW_FPR = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001, "tpr_at_0.01pct_fpr": 0.0001}
#: 95% Clopper-Pearson interval of each low-FPR TPR (over the members behind it).
INTERVAL_KEYS = tuple(f"{k}_{side}" for k in LOW_FPR for side in ("lo", "hi"))
#: Metrics computed from continuous scores (threshold-free): AUC, TPR at low FPR with intervals, and the
#: empirical epsilon lower bound (:func:`lightning_mia.bounds.epsilon_lower_bound`).
SCORE_METRIC_KEYS = ("auc",) + tuple(LOW_FPR) + INTERVAL_KEYS + ("epsilon_lb",)
#: Most thresholds the epsilon bound is maximised over (score quantiles beyond that; see :func:`score_metrics`).
EPSILON_THRESHOLDS = 256
#: Every metric name (rates in [0, 1], advantage in [-1, 1]); counts are in :data:`COUNT_KEYS`.
METRIC_KEYS = BINARY_METRIC_KEYS + SCORE_METRIC_KEYS
#: Count columns returned next to the metrics.
COUNT_KEYS = ("n_members", "n_nonmembers")


def _ratio(num: float, den: float) -> float:
    """num/den, NaN when den == 0 (a 0/0 ratio is undefined, not 0)."""
    return float(num) / float(den) if den > 0 else float("nan")


def _as_bool(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.dtype == bool:
        return a
    if a.size and not np.all(np.isin(a, (0, 1))):
        raise ValueError(f"{name} must be boolean or 0/1, got values {np.unique(a)[:5].tolist()}")
    return a.astype(bool)


def nan_metrics(n_members: int = 0, n_nonmembers: int = 0) -> Dict[str, float]:
    """All metrics NaN with the given counts (for slices that could not be evaluated)."""
    out: Dict[str, float] = {k: float("nan") for k in METRIC_KEYS}
    out["n_members"] = int(n_members)
    out["n_nonmembers"] = int(n_nonmembers)
    return out


def binary_metrics(y_true, y_pred) -> Dict[str, float]:
    """Confusion-based metrics of hard membership predictions (member = 1).

    Keys: :data:`BINARY_METRIC_KEYS` plus ``n_members`` and ``n_nonmembers``.  ``far`` is the
    false-alarm rate FP / (FP + TN) (= FPR), ``tnr`` = 1 - far = ``recall_nonmember``, ``tpr`` =
    ``recall_member``, ``advantage`` = TPR - FPR (Yeom et al. 2018), ``f1`` is the member-class F1.
    """
    y = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred")
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred have different lengths: {y.shape[0]} vs {p.shape[0]}")
    tp = int(np.count_nonzero(y & p))
    fn = int(np.count_nonzero(y & ~p))
    fp = int(np.count_nonzero(~y & p))
    tn = int(np.count_nonzero(~y & ~p))
    pos, neg = tp + fn, fp + tn
    tpr = _ratio(tp, pos)
    tnr = _ratio(tn, neg)
    far = _ratio(fp, neg)
    both = pos > 0 and neg > 0
    return {
        "accuracy": _ratio(tp + tn, pos + neg),
        "balanced_accuracy": 0.5 * (tpr + tnr) if both else float("nan"),
        "far": far,
        "tpr": tpr,
        "tnr": tnr,
        "precision_member": _ratio(tp, tp + fp),
        "recall_member": tpr,
        "precision_nonmember": _ratio(tn, tn + fn),
        "recall_nonmember": tnr,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "f1_nonmember": _ratio(2 * tn, 2 * tn + fn + fp),
        "advantage": tpr - far if both else float("nan"),
        "n_members": pos,
        "n_nonmembers": neg,
    }


def _scored(y_true, scores) -> Optional[Tuple[np.ndarray, np.ndarray, int, int]]:
    """``(y, scores, n_members, n_nonmembers)`` as checked arrays, or ``None`` when score metrics are undefined
    (no members, no non-members, or a NaN score)."""
    y = _as_bool(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"y_true and scores have different lengths: {y.shape[0]} vs {s.shape[0]}")
    pos = int(y.sum())
    neg = int(y.size - pos)
    if pos == 0 or neg == 0 or np.isnan(s).any():
        return None
    return y, s, pos, neg


def roc_points(y_true, scores):
    """ROC steps ``(fpr, tpr)`` over every distinct score threshold, starting at (0, 0).

    A sample is predicted member when its score is >= the threshold; tied scores enter together
    (one step), exactly like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    checked = _scored(y_true, scores)
    if checked is None:
        return np.array([np.nan]), np.array([np.nan])
    y, s, pos, neg = checked
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of every run of tied scores: thresholds are the distinct scores.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / neg]
    tpr = np.r_[0.0, tps / pos]
    return fpr, tpr


def tpr_at_fpr(y_true, scores, max_fpr: float) -> float:
    """Largest TPR over the ROC steps whose FPR is <= ``max_fpr`` (no interpolation)."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    fpr, tpr = roc_points(y_true, scores)
    if np.isnan(fpr[0]):
        return float("nan")
    return float(tpr[fpr <= max_fpr].max())


def _auc_mann_whitney(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC = P(score_member > score_nonmember) + 0.5 P(tie), via tie-averaged ranks."""
    n = s.size
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # Average rank (1-based) of each run of ties.
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted) != 0) + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    pos = int(y.sum())
    neg = n - pos
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def score_metrics(y_true, scores, confidence: float = 0.95, delta: float = 0.0) -> Dict[str, float]:
    """Threshold-free metrics of attack scores (:data:`SCORE_METRIC_KEYS`).

    - ``auc``;
    - ``tpr_at_{1,0.1,0.01}pct_fpr``: the largest TPR at FPR <= the budget, NaN when the budget is finer than
      1 / n_nonmembers (the only admissible point would be FPR 0, which says nothing about the budget), with
      ``_lo`` / ``_hi``: the two-sided ``confidence`` Clopper-Pearson interval over the ``n_members`` members;
    - ``epsilon_lb``: the empirical epsilon lower bound at ``confidence`` and ``delta``
      (:func:`lightning_mia.bounds.epsilon_lower_bound` over at most :data:`EPSILON_THRESHOLDS` score quantiles;
      0 when nothing can be certified, NaN when the pool is too small to ever certify anything).

    NaN when the slice lacks members or non-members, or when any score is NaN (+-inf are valid,
    orderable scores).
    """
    from lightning_mia.bounds import clopper_pearson, epsilon_lower_bound

    checked = _scored(y_true, scores)
    if checked is None:
        return {k: float("nan") for k in SCORE_METRIC_KEYS}
    y, s, pos, neg = checked
    out = {"auc": _auc_mann_whitney(y, s)}
    fpr, tpr = roc_points(y, s)
    for key, alpha in LOW_FPR.items():
        if alpha < 1.0 / neg:
            out[key] = out[f"{key}_lo"] = out[f"{key}_hi"] = float("nan")
            continue
        out[key] = float(tpr[fpr <= alpha].max())
        lo, hi = clopper_pearson(int(round(out[key] * pos)), pos, confidence)
        out[f"{key}_lo"], out[f"{key}_hi"] = float(lo), float(hi)
    # the bound depends on the score order only: ranks keep ties and make +-inf scores finite; above
    # EPSILON_THRESHOLDS distinct scores the maximum is taken over that many score quantiles (a valid, slightly
    # smaller bound at a fraction of the cost: every threshold needs four beta quantiles)
    ranks = np.unique(s, return_inverse=True)[1].astype(np.float64)
    n_distinct = ranks.max() + 1
    if n_distinct > EPSILON_THRESHOLDS:
        ranks = np.floor(ranks * EPSILON_THRESHOLDS / n_distinct)
    out["epsilon_lb"] = float(epsilon_lower_bound(y, ranks, confidence=confidence, delta=delta)["epsilon"])
    return out


def attack_metrics(y_true, scores, y_pred, confidence: float = 0.95, delta: float = 0.0) -> Dict[str, float]:
    """:func:`binary_metrics` of ``y_pred`` merged with :func:`score_metrics` of ``scores`` (``confidence`` and
    ``delta`` of the intervals and the epsilon bound)."""
    out = binary_metrics(y_true, y_pred)
    out.update(score_metrics(y_true, scores, confidence, delta))
    return out


def naive_baseline(is_member, correct) -> Dict[str, float]:
    """The naive attack (Leino & Fredrikson 2020; Rezaei & Liu 2021, Sec. 3): predict *member* iff
    the target model classifies the sample correctly.  Score = correctness (0/1), so AUC is defined."""
    c = _as_bool(correct, "correct")
    return attack_metrics(is_member, c.astype(np.float64), c)


def zeror_baseline(is_member) -> Dict[str, float]:
    """ZeroR (Rezaei & Liu 2021, Table 2): always predict *member*; its member precision equals the
    member share of the evaluation set, its FAR is 1 and its balanced accuracy 0.5."""
    y = _as_bool(is_member, "is_member")
    return attack_metrics(y, np.ones(y.size), np.ones(y.size, dtype=bool))


def mean_std(values: Sequence[Dict[str, float]], keys: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Mean and population std (ddof=0, as ``np.std`` in the authors' code) of each key over dicts,
    ignoring NaNs; NaN when every value is NaN.  Returns ``{key: mean, key + "_std": std}``."""
    if keys is None:
        keys = list(values[0]) if values else []
    out: Dict[str, float] = {}
    for k in keys:
        arr = np.array([v.get(k, np.nan) for v in values], dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        out[k] = float(arr.mean()) if arr.size else float("nan")
        out[k + "_std"] = float(arr.std()) if arr.size else float("nan")
    return out
