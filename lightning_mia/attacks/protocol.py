"""The attack evaluation protocol: splits, balancing, slices, eval-ratio control and baselines.

Pure functions on numpy arrays (no Lightning).  One call of :func:`evaluate`:

1. drops rows with non-finite features (counted per slice as ``n_nonfinite``);
2. for each of ``repeats`` seeded splits, holds out ``eval_fraction`` of the rows, stratified by
   membership x target-model correctness (x true class when ``labels`` are given), so member share,
   slice sizes and class balance are the same in both parts;
3. balances the attack-training rows (``balance``), fits the attack -- one model for every slice
   (default), one model per slice (``fit_per_slice``), and/or one per true class (``per_class``);
4. scores the held-out rows and computes :func:`~lightning_mia.metrics.attack_metrics` on each slice
   (``all``, ``correct``, ``misclassified``: whether the target model classified the sample right),
   the naive and ZeroR baselines on the same rows, and, for every ``eval_ratios`` value r, the
   metrics of the *same* fitted attack on the held-out rows resampled to members:non-members = r
   (Rezaei & Liu 2021, Table 2: member precision follows the ratio, balanced accuracy and FAR don't);
5. returns the mean and std (ddof=0) over repeats in one row per slice.

Undefined values are NaN, never an exception: a slice without members or non-members, or whose
training part has fewer than ``min_train_per_class`` rows of a class, gives NaN metrics next to its
counts.

Example:
    >>> import numpy as np
    >>> from lightning_mia.attacks.protocol import evaluate
    >>> rng = np.random.default_rng(0)
    >>> member = rng.random(2000) < 0.5
    >>> X = rng.normal(size=(2000, 1)) + 1.0 * member[:, None]
    >>> correct = rng.random(2000) < 0.8
    >>> res = evaluate(X, member, correct, attack_spec="threshold", repeats=2, seed=0)
    >>> [r["slice"] for r in res.rows]
    ['all', 'correct', 'misclassified']
    >>> 0.6 < res.rows[0]["balanced_accuracy"] < 0.75   # Phi(1/2) = 0.69
    True
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_mia.attacks.base import Attack, as_2d, build_attack, check_int
from lightning_mia.layout import SLICES
from lightning_mia.metrics import (
    METRIC_KEYS,
    attack_metrics,
    binary_metrics,
    mean_std,
    naive_baseline,
    nan_metrics,
    zeror_baseline,
)

__all__ = [
    "SLICES",
    "BALANCE_MODES",
    "BASELINE_KEYS",
    "RATIO_METRICS",
    "ProtocolResult",
    "evaluate",
    "stratified_split",
    "balance_training_set",
    "resample_to_ratio",
    "ratio_key",
]

BALANCE_MODES = ("undersample", "oversample", "class_weight", "none")
#: Baseline metrics reported as ``naive_{key}`` and ``zeror_{key}``.
BASELINE_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "far",
    "tpr",
    "precision_member",
    "recall_member",
    "precision_nonmember",
    "recall_nonmember",
    "advantage",
)
#: Metrics reported per evaluation ratio r: row key prefix -> metric key.
RATIO_METRICS = {"precision": "precision_member", "balanced_accuracy": "balanced_accuracy", "far": "far"}


def ratio_key(prefix: str, ratio: float) -> str:
    """Row key of a per-ratio metric, e.g. ``ratio_key("precision", 0.2) == "precision_at_ratio_0.2"``."""
    return f"{prefix}_at_ratio_{format(ratio, 'g')}"


@dataclass
class ProtocolResult:
    """Output of :func:`evaluate` (and of the paper preset).

    Attributes:
        rows: one dict per slice: ``slice``, pool counts ``n_members`` / ``n_nonmembers`` /
            ``n_nonfinite``, ``repeats`` (repeats in which an attack was fitted for the slice),
            mean held-out counts ``n_eval_members`` / ``n_eval_nonmembers`` / ``n_unscored``, every
            metric of :data:`~lightning_mia.metrics.METRIC_KEYS` with ``{metric}_std``,
            ``naive_{k}`` / ``zeror_{k}`` for :data:`BASELINE_KEYS`, and per ratio r
            ``precision_at_ratio_{r}``, ``balanced_accuracy_at_ratio_{r}``, ``far_at_ratio_{r}``
            (each with ``_std``) and ``zeror_precision_at_ratio_{r}``.
        scores: (n,) attack score on the held-out rows of repeat 0, NaN elsewhere (from the ``all``
            slice's model; with ``fit_per_slice`` and no ``all`` slice, each row's slice model).
        fold: (n,) repeat-0 split: 0 = attack training, 1 = evaluation, -1 = dropped (non-finite).
        pred: (n,) repeat-0 hard predictions (1.0 member / 0.0) matching ``scores``, NaN elsewhere.
        slice_scores / slice_pred: per slice, the scores / predictions behind that slice's metrics
            (differ from ``scores`` only with ``fit_per_slice``).
        seconds: wall time of the call.
    """

    rows: List[Dict[str, Any]]
    scores: np.ndarray
    fold: np.ndarray
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slice_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    slice_pred: Dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, slice_name: str) -> Dict[str, Any]:
        """The row of one slice (KeyError listing the slices present)."""
        for r in self.rows:
            if r["slice"] == slice_name:
                return r
        raise KeyError(f"No slice {slice_name!r}; slices: {[r['slice'] for r in self.rows]}")


# ---------------------------------------------------------------------------------------------------
# Building blocks (public: used by the paper preset and by tests)
# ---------------------------------------------------------------------------------------------------
def stratified_split(strata: np.ndarray, eval_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of evaluation rows: ``eval_fraction`` of every stratum, drawn at random.

    ``eval_fraction * size`` is rounded stochastically (floor, plus one with probability equal to
    the fractional part), so tiny strata are not always kept out of the evaluation set.
    """
    strata = np.asarray(strata).reshape(-1)
    mask = np.zeros(strata.size, dtype=bool)
    _, inverse = np.unique(strata, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    for k in range(bounds.size - 1):
        idx = order[bounds[k] : bounds[k + 1]]
        want = eval_fraction * idx.size
        n_eval = int(math.floor(want)) + int(rng.random() < want - math.floor(want))
        if n_eval:
            mask[rng.permutation(idx)[:n_eval]] = True
    return mask


def balance_training_set(
    y: np.ndarray, mode: str, rng: np.random.Generator
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Row indices (into ``y``) and optional sample weights of a class-balanced attack training set.

    Modes: ``undersample`` (random subset of the larger class, size of the smaller), ``oversample``
    (the smaller class plus random duplicates up to the larger class's size), ``class_weight`` (all
    rows, weight n / (2 n_class) so both classes weigh the same), ``none`` (all rows, no weights).
    Indices come in random order so no attack can learn from row order.
    """
    check_mode(mode)
    y = np.asarray(y, dtype=bool).reshape(-1)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if mode == "none" or pos.size == 0 or neg.size == 0:
        return rng.permutation(y.size), None
    if mode == "class_weight":
        w = np.where(y, y.size / (2.0 * pos.size), y.size / (2.0 * neg.size))
        idx = rng.permutation(y.size)
        return idx, w[idx]
    small, large = (pos, neg) if pos.size <= neg.size else (neg, pos)
    if mode == "undersample":
        keep = np.r_[small, rng.choice(large, size=small.size, replace=False)]
    else:  # oversample
        keep = np.r_[small, large, rng.choice(small, size=large.size - small.size, replace=True)]
    return rng.permutation(keep), None


def resample_to_ratio(
    is_member: np.ndarray, ratio: float, rng: np.random.Generator
) -> Optional[np.ndarray]:
    """Indices of the largest subset with members:non-members = ``ratio`` (subsampling the larger
    side; counts rounded).  ``None`` when a side would be empty."""
    y = np.asarray(is_member, dtype=bool).reshape(-1)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    m, k = pos.size, neg.size
    if m == 0 or k == 0:
        return None
    if m >= ratio * k:
        k2, m2 = k, int(round(ratio * k))
    else:
        m2, k2 = m, int(round(m / ratio))
    m2, k2 = min(m2, m), min(k2, k)
    if m2 < 1 or k2 < 1:
        return None
    keep_pos = pos if m2 == m else rng.choice(pos, size=m2, replace=False)
    keep_neg = neg if k2 == k else rng.choice(neg, size=k2, replace=False)
    return np.sort(np.r_[keep_pos, keep_neg])


def check_mode(mode: str) -> str:
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {list(BALANCE_MODES)}, got {mode!r}")
    return mode


def _bool_array(a: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(a).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but X has {n} rows")
    if arr.dtype != bool:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name} must be boolean or 0/1")
        arr = arr.astype(bool)
    return arr


def _child_seed(*key: int) -> int:
    """A reproducible 32-bit seed for sklearn/xgboost derived from integers."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def check_split_options(eval_fraction: float, repeats: int, slices: Sequence[str], eval_ratios: Sequence[float]
                        ) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """Validate the split options shared by :func:`evaluate` and the typed protocol; returns (slices, ratios)."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    check_int("repeats", repeats, 1)
    if isinstance(slices, str):
        slices = (slices,)
    slices = tuple(slices)
    if not slices or any(s not in SLICES for s in slices) or len(set(slices)) != len(slices):
        raise ValueError(f"slices must be a non-empty list of distinct names from {list(SLICES)}, got {list(slices)}")
    ratios = tuple(eval_ratios or ())
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
            raise ValueError(f"eval_ratios must be positive finite numbers (members per non-member), got {r!r}")
    return slices, tuple(float(r) for r in ratios)


# ---------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------
def evaluate(
    X: Any,
    is_member: Any,
    correct: Any,
    labels: Any = None,
    attack_spec: Union[str, Mapping[str, Any], Attack] = "logistic_regression",
    *,
    repeats: int = 1,
    eval_fraction: float = 0.2,
    balance: str = "undersample",
    slices: Sequence[str] = SLICES,
    fit_per_slice: bool = False,
    per_class: bool = False,
    eval_ratios: Sequence[float] = (5.0, 1.0, 0.2),
    seed: int = 0,
    min_train_per_class: int = 2,
    folds: Optional[int] = None,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> ProtocolResult:
    """Fit and evaluate one attack on an audit pool; see the module docstring for the procedure.

    Args:
        X: (n, d) attack features (a 1-D array is one feature).
        is_member: (n,) bool, True for members (rows of the target model's training set).
        correct: (n,) bool, True when the target model classifies the row correctly.
        labels: (n,) int true classes; needed for ``per_class`` and used to stratify splits.
        attack_spec: ``"name"``, ``{"name": ..., **options}`` or an :class:`Attack` instance.
            Attack seeds are derived from ``seed`` and the repeat.
        repeats: number of seeded random splits.
        eval_fraction: held-out share of every stratum (the paper's attacker knows 80%).
        balance: ``undersample`` (default), ``oversample``, ``class_weight`` or ``none``.
        slices: subset of ``("all", "correct", "misclassified")``.
        fit_per_slice: fit a separate attack on each slice's training rows (paper Sec. 5.3-5.4)
            instead of one attack evaluated on every slice.
        per_class: one attack per true class (the authors' set-up); scores are merged.
        eval_ratios: member:non-member ratios of the resampled evaluation sets (``()`` = none).
        seed: master seed (splits, balancing, attacks, ratio resampling).
        min_train_per_class: minimum members and non-members in a training set to fit an attack.
        folds: k-fold cross-fitting instead of one held-out split: the finite rows are dealt into ``folds``
            stratified folds and each fold is scored by an attack fitted on the others, so every row gets a score
            from a model not fitted on it and the metrics use the whole pool (``eval_fraction`` is then unused;
            ``fold`` is 1 for every scored row).
        confidence, delta: of the low-FPR intervals and the epsilon lower bound
            (:func:`lightning_mia.metrics.score_metrics`).

    Returns:
        :class:`ProtocolResult`.

    Raises:
        ValueError: invalid option or array shapes; KeyError: unknown attack name.
    """
    t0 = time.perf_counter()
    X2 = as_2d(X)
    n = X2.shape[0]
    member = _bool_array(is_member, "is_member", n)
    correct_arr = _bool_array(correct, "correct", n)
    slices, ratios = check_split_options(eval_fraction, repeats, slices, eval_ratios)
    check_mode(balance)
    check_int("seed", seed, 0)
    check_int("min_train_per_class", min_train_per_class, 1)
    if folds is not None:
        check_int("folds", folds, 2)
    if not isinstance(fit_per_slice, bool) or not isinstance(per_class, bool):
        raise ValueError("fit_per_slice and per_class must be True or False")
    labels_arr = None
    if labels is not None:
        labels_arr = np.asarray(labels).reshape(-1)
        if labels_arr.shape[0] != n:
            raise ValueError(f"labels has {labels_arr.shape[0]} entries but X has {n} rows")
    if per_class and labels_arr is None:
        raise ValueError("per_class=True needs labels (the true class of every row)")
    proto = build_attack(attack_spec, seed=seed)  # validates the spec before any work
    if proto.requires_1d and X2.shape[1] != 1 and getattr(proto, "column", None) is None:
        raise ValueError(
            f"attack {proto.name!r} needs a single feature column but X has {X2.shape[1]}; "
            "choose a 1-D feature, pass column=<index>, or use another attack"
        )

    finite = np.isfinite(X2).all(axis=1)
    slice_masks = {"all": np.ones(n, dtype=bool), "correct": correct_arr, "misclassified": ~correct_arr}
    strata = member.astype(np.int64) * 2 + correct_arr
    if labels_arr is not None:
        _, lab_codes = np.unique(labels_arr, return_inverse=True)
        strata = strata + 4 * lab_codes.astype(np.int64)

    fold = np.full(n, -1, dtype=np.int64)
    slice_scores = {s: np.full(n, np.nan) for s in slices}
    slice_pred = {s: np.full(n, np.nan) for s in slices}
    per_slice: Dict[str, List[Dict[str, float]]] = {s: [] for s in slices}
    fitted_count = {s: 0 for s in slices}

    for rep in range(repeats):
        rng = np.random.default_rng(np.random.SeedSequence([seed, rep, 0]))
        ratio_rng = np.random.default_rng(np.random.SeedSequence([seed, rep, 1]))
        attack_seed = _child_seed(seed, rep, 2)
        eval_mask = np.zeros(n, dtype=bool)
        if folds is None:
            eval_mask[finite] = stratified_split(strata[finite], eval_fraction, rng)
            splits = [(finite & ~eval_mask, eval_mask)]
        else:  # cross-fitting: every finite row is evaluated once, by the model of the other folds
            from lightning_mia.attacks.crossfit import stratified_folds

            assign = np.full(n, -1, dtype=np.int64)
            assign[finite] = stratified_folds(strata[finite], folds, _child_seed(seed, rep, 3))
            eval_mask[finite] = True
            splits = [(finite & (assign != f), assign == f) for f in range(folds)]
        if rep == 0:
            fold[finite] = eval_mask[finite].astype(np.int64)

        # Fit groups: one over all rows, or one per slice.
        groups = {s: slice_masks[s] for s in slices} if fit_per_slice else {"*": np.ones(n, dtype=bool)}
        group_out = {}
        for g, gmask in groups.items():
            sc, pr, fitted_any = np.full(n, np.nan), np.zeros(n, dtype=bool), False
            for train_mask, ev_mask in splits:
                s_k, p_k, fitted = _fit_and_score(
                    proto, X2, member, labels_arr if per_class else None,
                    np.flatnonzero(train_mask & gmask), np.flatnonzero(ev_mask & gmask),
                    balance, rng, attack_seed, min_train_per_class,
                )
                done = ~np.isnan(s_k)
                sc[done], pr[done], fitted_any = s_k[done], p_k[done], fitted_any or fitted
            group_out[g] = (sc, pr, fitted_any)

        for s in slices:
            g = s if fit_per_slice else "*"
            sc_full, pr_full, fitted = group_out[g]
            ev = eval_mask & slice_masks[s]
            scored = ev & ~np.isnan(sc_full)
            if rep == 0:
                slice_scores[s][scored] = sc_full[scored]
                slice_pred[s][scored] = pr_full[scored].astype(np.float64)
            y_sc = member[scored]
            fitted_count[s] += int(fitted)
            rec = slice_record(y_sc, sc_full[scored], pr_full[scored], member[ev], correct_arr[ev], fitted,
                               confidence, delta)
            rec["n_unscored"] = float(ev.sum() - scored.sum())
            for r in ratios:
                sub = resample_to_ratio(y_sc, r, ratio_rng) if fitted else None
                if sub is None:
                    rm = {v: float("nan") for v in RATIO_METRICS.values()}
                    zp = float("nan")
                else:
                    rm = binary_metrics(y_sc[sub], pr_full[scored][sub])
                    zp = zeror_baseline(y_sc[sub])["precision_member"]
                for prefix, key in RATIO_METRICS.items():
                    rec[ratio_key(prefix, r)] = rm[key]
                rec[ratio_key("zeror_precision", r)] = zp
            per_slice[s].append(rec)

    rows = []
    for s in slices:
        sm = slice_masks[s]
        row: Dict[str, Any] = {
            "slice": s,
            "n_members": int((sm & member).sum()),
            "n_nonmembers": int((sm & ~member).sum()),
            "n_nonfinite": int((sm & ~finite).sum()),
            "repeats": fitted_count[s],
        }
        recs = per_slice[s]
        for k in ("n_eval_members", "n_eval_nonmembers", "n_unscored"):
            row[k] = float(np.mean([r[k] for r in recs]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ratio_keys = [ratio_key(p, r) for r in ratios for p in RATIO_METRICS]
            row.update(mean_std(recs, list(METRIC_KEYS) + ratio_keys))
            base_keys = [p + k for p in ("naive_", "zeror_") for k in BASELINE_KEYS]
            row.update(nanmean_keys(recs, base_keys + [ratio_key("zeror_precision", r) for r in ratios]))
        rows.append(row)

    scores, pred = combine_slice_scores(slices, slice_scores, slice_pred, n)
    return ProtocolResult(
        rows=rows, scores=scores, fold=fold, pred=pred,
        slice_scores=slice_scores, slice_pred=slice_pred, seconds=time.perf_counter() - t0,
    )


def evaluate_scores(
    scores: Any,
    preds: Any,
    is_member: Any,
    correct: Any,
    slices: Sequence[str] = SLICES,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> ProtocolResult:
    """Metrics of scores that needed no fitting on the pool (reference-model attacks: LiRA, RMIA), on every
    sample with a finite score, per slice. ``preds`` are the attack's own decisions (e.g. likelihood ratio > 1).

    Example:
        >>> y = np.r_[np.ones(50, bool), np.zeros(50, bool)]
        >>> s = np.r_[np.linspace(1, 2, 50), np.linspace(0, 1.2, 50)]
        >>> evaluate_scores(s, s > 1, y, np.ones(100, bool), slices=["all"]).rows[0]["auc"] > 0.9
        True
    """
    t0 = time.perf_counter()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    member = _bool_array(is_member, "is_member", n)
    correct_arr = _bool_array(correct, "correct", n)
    pred = _bool_array(preds, "preds", n)
    slices, _ = check_split_options(0.5, 1, slices, ())
    finite = np.isfinite(s)
    slice_masks = {"all": np.ones(n, dtype=bool), "correct": correct_arr, "misclassified": ~correct_arr}
    rows, slice_scores, slice_pred = [], {}, {}
    for name in slices:
        sm = slice_masks[name]
        ok = sm & finite
        rec = slice_record(member[ok], s[ok], pred[ok], member[sm], correct_arr[sm], bool(ok.any()), confidence, delta)
        rows.append({"slice": name, "n_members": int((sm & member).sum()), "n_nonmembers": int((sm & ~member).sum()),
                     "n_nonfinite": int((sm & ~finite).sum()), "repeats": 1, "n_unscored": float((sm & ~finite).sum()),
                     **{k: float(v) for k, v in rec.items()}, **{f"{k}_std": 0.0 for k in METRIC_KEYS}})
        slice_scores[name] = np.where(sm & finite, s, np.nan)
        slice_pred[name] = np.where(sm & finite, pred.astype(np.float64), np.nan)
    return ProtocolResult(rows=rows, scores=np.where(finite, s, np.nan), fold=np.where(finite, 1, -1).astype(np.int64),
                          pred=np.where(finite, pred.astype(np.float64), np.nan), slice_scores=slice_scores,
                          slice_pred=slice_pred, seconds=time.perf_counter() - t0)


def slice_record(member_scored: np.ndarray, scores: np.ndarray, preds: np.ndarray, member_eval: np.ndarray,
                 correct_eval: np.ndarray, fitted: bool = True, confidence: float = 0.95,
                 delta: float = 0.0) -> Dict[str, float]:
    """One slice's record of one split: every attack metric on the scored rows (NaN when no attack could be
    fitted; ``confidence``/``delta`` of the intervals and epsilon bound), their counts, and the naive / ZeroR
    baselines on all evaluation rows of the slice."""
    if fitted:
        m = attack_metrics(member_scored, scores, preds, confidence, delta)
    else:
        m = nan_metrics(int(member_scored.sum()), int((~member_scored).sum()))
    rec: Dict[str, float] = {k: m[k] for k in METRIC_KEYS}
    rec["n_eval_members"] = float(member_scored.sum())
    rec["n_eval_nonmembers"] = float((~member_scored).sum())
    naive = naive_baseline(member_eval, correct_eval)  # the authors' "blind" attack
    zeror = zeror_baseline(member_eval)
    for k in BASELINE_KEYS:
        rec["naive_" + k] = naive[k]
        rec["zeror_" + k] = zeror[k]
    return rec


def nanmean_keys(recs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> Dict[str, float]:
    """Mean of each key over the repeats, ignoring NaN (NaN when no repeat has a finite value)."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in recs], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def combine_slice_scores(slices: Sequence[str], slice_scores: Mapping[str, np.ndarray],
                         slice_pred: Mapping[str, np.ndarray], n: int) -> Tuple[np.ndarray, np.ndarray]:
    """One score and prediction per sample: the ``all`` slice's model when evaluated, else each sample's own
    slice's model (the slices are then disjoint)."""
    if "all" in slices:
        return slice_scores["all"], slice_pred["all"]
    scores, pred = np.full(n, np.nan), np.full(n, np.nan)
    for s in slices:
        fill = np.isnan(scores) & ~np.isnan(slice_scores[s])
        scores[fill] = slice_scores[s][fill]
        pred[fill] = slice_pred[s][fill]
    return scores, pred


def _fit_and_score(
    proto: Attack,
    X: np.ndarray,
    member: np.ndarray,
    labels: Optional[np.ndarray],
    train_idx: np.ndarray,
    eval_idx: np.ndarray,
    balance: str,
    rng: np.random.Generator,
    attack_seed: int,
    min_train: int,
) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Fit on ``train_idx`` (per class when ``labels``), score ``eval_idx``.

    Returns full-length (n,) score (NaN where unscored) and prediction arrays, and whether any
    attack could be fitted.
    """
    n = X.shape[0]
    scores = np.full(n, np.nan)
    preds = np.zeros(n, dtype=bool)
    if labels is None:
        parts = [(train_idx, eval_idx)]
    else:
        parts = [(train_idx[labels[train_idx] == c], eval_idx[labels[eval_idx] == c]) for c in np.unique(labels[eval_idx])]
    fitted = False
    for tr, ev in parts:
        if ev.size == 0:
            continue
        y = member[tr]
        if int(y.sum()) < min_train or int((~y).sum()) < min_train:
            continue  # too small to fit: these rows stay unscored (NaN)
        idx, w = balance_training_set(y, balance, rng)
        attack = proto.spawn(attack_seed)
        try:
            attack.fit(X[tr][idx], y[idx], sample_weight=w)
        except ValueError as err:  # degenerate training data: report NaN rather than abort the audit
            warnings.warn(f"attack {proto.name!r} could not be fitted ({err}); its rows are left unscored")
            continue
        scores[ev] = attack.score(X[ev])
        preds[ev] = attack.predict(X[ev])
        fitted = True
    return scores, preds, fitted
