"""``paper`` preset: the evaluation of Rezaei & Liu (CVPR 2021) as done in the authors' code.

Source: github.com/shrezaei/MI-Attack -- ``attacks/confidence_based_attack.py`` (confidence),
``attacks/intermediate_layer_attack.py`` (intermediate layers), ``fit_model_to_distance.py``
(distance to the boundary) and ``fit_model_to_gradient.py`` (gradient norms).  What it mirrors:

* one attack model per true class j: members = training-set rows of class j, non-members =
  test-set rows of class j; a class is skipped when either side has fewer than ``min_per_side``
  rows (15 confidence, 20 intermediate, 10 distance and gradients);
* the attacker knows the **first** 80% of each side in dataset order (``attacker_knowledge``);
  the rest is the evaluation set.  Rows must therefore be passed in dataset order;
* no rebalancing by default (the authors' ``--sampling none``); ``undersampling`` keeps the first
  rows of the larger side, ``oversampling`` tiles the smaller side ``int(large / small)`` times;
* confidence / intermediate: one model per class, evaluated on the class's held-out rows overall and
  on its correctly classified / misclassified part; distance / gradients: a separate
  class-balanced logistic regression per class *and* per slice (correct, misclassified), non-finite
  values replaced by +-1e5 (``np.nan_to_num(posinf=100000, neginf=-100000)``);
* attack models: MLP 128-64 ReLU + sigmoid, Adam, 30 epochs, batch 32, no feature scaling (Keras
  defaults: no L2 penalty); random forest with a 100-draw randomised search, 2-fold CV, accuracy
  scoring, over the authors' grid; XGBoost with a 50-draw randomised search scored by balanced
  accuracy with repeated stratified 2-fold x 2 CV (5-fold x 2 for intermediate layers);
* per-slice metrics averaged over the evaluated classes, ``_std`` = std across classes (``np.std``).

Deliberate differences: members are the positive class everywhere (the authors' distance/gradient
scripts label *non-members* 1); a 0/0 metric (e.g. precision with no predicted members, or any
two-class metric on a slice with one class) is NaN and left out of the class average, where
scikit-learn returned 0 or a one-class score; searches are seeded by ``seed``; the live attacks'
sklearn/xgboost versions differ from the authors' (``max_features='auto'`` is ``'sqrt'`` today).

Example:
    >>> import numpy as np
    >>> from lightning_mia.attacks.paper import evaluate_paper
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, 600); member = rng.random(600) < 0.6
    >>> X = rng.normal(size=(600, 1)) + member[:, None]; correct = rng.random(600) < 0.9
    >>> res = evaluate_paper(X, member, correct, labels, preset="distance", seed=0)
    >>> [r["slice"] for r in res.rows], res.row("correct")["n_classes"]
    (['correct', 'misclassified'], 3)
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from lightning_mia.attacks.base import as_2d, build_attack, check_choice, check_int
from lightning_mia.attacks.protocol import (
    BASELINE_KEYS,
    ProtocolResult,
    _bool_array,
    combine_slice_scores,
    nanmean_keys,
    slice_record,
)
from lightning_mia.metrics import METRIC_KEYS, mean_std

__all__ = [
    "PAPER_PRESETS",
    "PAPER_ATTACKS",
    "FEATURE_PRESETS",
    "PAPER_RF_GRID",
    "PAPER_XGB_GRID",
    "paper_attack_spec",
    "sample_training_rows",
    "preset_for_feature",
    "evaluate_paper",
]

# shrezaei/MI-Attack, attacks/confidence_based_attack.py (RF branch).  The authors' 'auto' equals 'sqrt'
# for classifiers and was removed in scikit-learn 1.3; it is kept as a second 'sqrt' so the draws keep
# the authors' probabilities.
PAPER_RF_GRID: Dict[str, list] = {
    "n_estimators": [500, 800, 1500, 2500, 5000],
    "max_features": ["sqrt", "sqrt"],
    "max_depth": [20, 30, 40, 50, None],
    "min_samples_split": [2, 5, 10, 15, 20],
    "min_samples_leaf": [1, 2, 5, 10, 15],
}
# shrezaei/MI-Attack, attacks/confidence_based_attack.py (XGBoost branch).
PAPER_XGB_GRID: Dict[str, list] = {
    "scale_pos_weight": [1, 5, 10, 50, 100],
    "min_child_weight": [1, 5, 10, 15],
    "subsample": [0.6, 0.8, 1.0],
    "colsample_bytree": [0.6, 0.8, 1.0],
    "max_depth": [3, 6, 9, 12],
}

#: Per feature family: skip threshold per side, per-slice fitting, default attack, XGBoost CV folds,
#: non-finite handling.  Sources: the authors' scripts named in the module docstring.
PAPER_PRESETS: Dict[str, Dict[str, Any]] = {
    "confidence": {"min_per_side": 15, "fit_per_slice": False, "attack": "mlp", "xgb_cv": 2, "nan_to_num": False},
    "intermediate": {"min_per_side": 20, "fit_per_slice": False, "attack": "mlp", "xgb_cv": 5, "nan_to_num": False},
    "distance": {"min_per_side": 10, "fit_per_slice": True, "attack": "logistic_regression", "xgb_cv": 2, "nan_to_num": True},
    "gradient": {"min_per_side": 10, "fit_per_slice": True, "attack": "logistic_regression", "xgb_cv": 2, "nan_to_num": True},
}
PAPER_ATTACKS = ("mlp", "random_forest", "xgboost", "logistic_regression")
#: Registered feature names -> paper preset.
FEATURE_PRESETS = {
    "confidence": "confidence",
    "softmax": "confidence",
    "true_class_prob": "confidence",
    "loss": "confidence",
    "entropy": "confidence",
    "modified_entropy": "confidence",
    "logit_scaled_confidence": "confidence",
    "intermediate": "intermediate",
    "boundary_distance": "distance",
    "gradient_norms": "gradient",
}
SAMPLING = ("none", "undersampling", "oversampling")


def preset_for_feature(feature_name: str) -> str:
    """The paper preset of a registered feature name (``"boundary_distance"`` -> ``"distance"``)."""
    try:
        return FEATURE_PRESETS[feature_name]
    except KeyError:
        raise KeyError(f"No paper preset for feature {feature_name!r}; known: {sorted(FEATURE_PRESETS)}") from None


def paper_attack_spec(attack: str, preset: str = "confidence") -> Dict[str, Any]:
    """Attack spec (for :func:`~lightning_mia.attacks.build_attack`) matching the authors' model."""
    check_choice("attack", attack, PAPER_ATTACKS)
    check_choice("preset", preset, tuple(PAPER_PRESETS))
    if attack == "mlp":
        # Keras Sequential Dense(128, relu), Dense(64, relu), Dense(1, sigmoid); adam; epochs=30; batch_size=32.
        return {"name": "mlp", "hidden_layer_sizes": (128, 64), "max_iter": 30, "batch_size": 32,
                "learning_rate_init": 1e-3, "alpha": 0.0, "n_iter_no_change": None, "standardize": False}
    if attack == "random_forest":
        # RandomizedSearchCV(RandomForestClassifier(), grid, n_iter=100, cv=2) with default (accuracy) scoring.
        return {"name": "random_forest", "search_iter": 100, "search_cv": 2, "search_repeats": 1,
                "search_scoring": None, "param_distributions": PAPER_RF_GRID}
    if attack == "xgboost":
        # RandomizedSearchCV(XGBClassifier(), grid, n_iter=50, cv=RepeatedStratifiedKFold(n_splits=2 or 5,
        # n_repeats=2), scoring='balanced_accuracy').
        return {"name": "xgboost", "search_iter": 50, "search_cv": PAPER_PRESETS[preset]["xgb_cv"],
                "search_repeats": 2, "search_scoring": "balanced_accuracy", "param_distributions": PAPER_XGB_GRID}
    # LogisticRegression(class_weight='balanced') with sklearn defaults, raw features.
    return {"name": "logistic_regression", "class_weight": "balanced", "max_iter": 100, "standardize": False}


def sample_training_rows(idx_yes: np.ndarray, idx_no: np.ndarray, sampling: str):
    """The authors' deterministic under/over-sampling of the attack training rows."""
    ny, nn = idx_yes.size, idx_no.size
    if sampling == "undersampling":
        if ny > nn:
            idx_yes = idx_yes[:nn]
        else:
            idx_no = idx_no[:ny]
    elif sampling == "oversampling" and ny and nn:
        if ny > nn:
            idx_no = np.tile(idx_no, ny // nn)
        else:
            idx_yes = np.tile(idx_yes, nn // ny)
    return idx_yes, idx_no


def evaluate_paper(
    X: Any,
    is_member: Any,
    correct: Any,
    labels: Any,
    *,
    preset: str = "confidence",
    attack: Optional[str] = None,
    attack_options: Optional[Mapping[str, Any]] = None,
    sampling: str = "none",
    attacker_knowledge: float = 0.8,
    min_per_side: Optional[int] = None,
    fit_per_slice: Optional[bool] = None,
    classes: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> ProtocolResult:
    """Per-class attack evaluation as in the authors' code (module docstring).

    Args:
        X, is_member, correct, labels: as for :func:`~lightning_mia.attacks.protocol.evaluate`;
            rows in dataset order (members first in the training set's order, etc.).
        preset: ``confidence``, ``intermediate``, ``distance`` or ``gradient`` (see
            :func:`preset_for_feature`).
        attack: ``mlp``, ``random_forest``, ``xgboost`` or ``logistic_regression``; default per preset.
        attack_options: overrides of the attack spec (e.g. ``{"search_iter": 2}`` for quick runs).
        sampling: ``none``, ``undersampling`` or ``oversampling`` of the attack training rows.
        attacker_knowledge: share of each side used to train the attack (authors: 0.8, in [0.1, 0.9]).
        min_per_side: skip a class (or class x slice) with fewer members or non-members; default per preset.
        fit_per_slice: fit separate models on correct / misclassified rows; default per preset.
        classes: classes to attack (default: all present); the authors' ``--number_of_target_classes``.
        seed: seed of the attack models and searches.

    Returns:
        :class:`~lightning_mia.attacks.protocol.ProtocolResult`; rows have ``n_classes`` (classes
        evaluated for the slice), ``skipped_classes`` and ``_std`` across classes; ``repeats`` = 1.
    """
    t0 = time.perf_counter()
    check_choice("preset", preset, tuple(PAPER_PRESETS))
    cfg = PAPER_PRESETS[preset]
    attack = cfg["attack"] if attack is None else attack
    check_choice("attack", attack, PAPER_ATTACKS)
    check_choice("sampling", sampling, SAMPLING)
    if isinstance(attacker_knowledge, bool) or not isinstance(attacker_knowledge, (int, float)) or not 0.1 <= attacker_knowledge <= 0.9:
        raise ValueError(f"attacker_knowledge must be in [0.1, 0.9] (as in the authors' code), got {attacker_knowledge!r}")
    min_side = cfg["min_per_side"] if min_per_side is None else check_int("min_per_side", min_per_side, 1)
    per_slice = cfg["fit_per_slice"] if fit_per_slice is None else fit_per_slice
    if not isinstance(per_slice, bool):
        raise ValueError(f"fit_per_slice must be True, False or None, got {fit_per_slice!r}")
    check_int("seed", seed, 0)
    spec = {**paper_attack_spec(attack, preset), **dict(attack_options or {})}
    build_attack(spec, seed=seed)  # validate options up front

    X2 = as_2d(X)
    n = X2.shape[0]
    if cfg["nan_to_num"]:
        X2 = np.nan_to_num(X2, posinf=100000.0, neginf=-100000.0)  # authors' fit_model_to_*.py
    member = _bool_array(is_member, "is_member", n)
    correct_arr = _bool_array(correct, "correct", n)
    if labels is None:
        raise ValueError("the paper preset attacks each true class separately: labels are required")
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries but X has {n} rows")
    class_list = np.unique(lab) if classes is None else np.asarray(list(classes))

    slices = ("correct", "misclassified") if per_slice else ("all", "correct", "misclassified")
    slice_masks = {"all": np.ones(n, dtype=bool), "correct": correct_arr, "misclassified": ~correct_arr}
    fold = np.full(n, -1, dtype=np.int64)
    slice_scores = {s: np.full(n, np.nan) for s in slices}
    slice_pred = {s: np.full(n, np.nan) for s in slices}
    per_class: Dict[str, List[Dict[str, float]]] = {s: [] for s in slices}
    skipped: Dict[str, List[int]] = {s: [] for s in slices}

    def fit_group(group: np.ndarray):
        """Split one class (x slice) group, fit, return (eval indices, scores, preds) or None."""
        yes = np.flatnonzero(group & member)
        no = np.flatnonzero(group & ~member)
        if yes.size < min_side or no.size < min_side:
            return None
        ky, kn = int(yes.size * attacker_knowledge), int(no.size * attacker_knowledge)
        tr_yes, tr_no = sample_training_rows(yes[:ky], no[:kn], sampling)
        fold[yes[:ky]] = 0
        fold[no[:kn]] = 0
        ev = np.r_[yes[ky:], no[kn:]]
        fold[ev] = 1
        tr = np.r_[tr_yes, tr_no]
        model = build_attack(spec, seed=seed)
        try:
            model.fit(X2[tr], member[tr])
        except ValueError as err:
            warnings.warn(f"paper preset: attack could not be fitted ({err}); class skipped")
            return None
        return ev, model.score(X2[ev]), model.predict(X2[ev])

    def record(s: str, ev: np.ndarray, sc: np.ndarray, pr: np.ndarray) -> None:
        rows_s = ev[slice_masks[s][ev]]
        if rows_s.size == 0:  # authors: metrics only `if np.sum(indexes) > 0`
            return
        sel = slice_masks[s][ev]
        slice_scores[s][rows_s] = sc[sel]
        slice_pred[s][rows_s] = pr[sel].astype(np.float64)
        per_class[s].append(slice_record(member[rows_s], sc[sel], pr[sel], member[rows_s], correct_arr[rows_s]))

    for c in class_list:
        in_class = lab == c
        if per_slice:
            for s in slices:
                out = fit_group(in_class & slice_masks[s])
                if out is None:
                    skipped[s].append(c.item() if hasattr(c, "item") else c)
                    continue
                record(s, *out)
        else:
            out = fit_group(in_class)
            if out is None:
                for s in slices:
                    skipped[s].append(c.item() if hasattr(c, "item") else c)
                continue
            for s in slices:
                record(s, *out)

    rows = []
    for s in slices:
        recs = per_class[s]
        sm = slice_masks[s]
        row: Dict[str, Any] = {
            "slice": s,
            "n_members": int((sm & member).sum()),
            "n_nonmembers": int((sm & ~member).sum()),
            "n_nonfinite": 0,
            "repeats": 1,
            "n_classes": len(recs),
            "skipped_classes": skipped[s],
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row["n_eval_members"] = float(np.sum([r["n_eval_members"] for r in recs])) if recs else 0.0
            row["n_eval_nonmembers"] = float(np.sum([r["n_eval_nonmembers"] for r in recs])) if recs else 0.0
            row["n_unscored"] = 0.0
            row.update(mean_std(recs, METRIC_KEYS))
            row.update(nanmean_keys(recs, [p + b for p in ("naive_", "zeror_") for b in BASELINE_KEYS]))
        rows.append(row)

    scores, pred = combine_slice_scores(slices, slice_scores, slice_pred, n)
    return ProtocolResult(rows=rows, scores=scores, fold=fold, pred=pred, slice_scores=slice_scores,
                          slice_pred=slice_pred, seconds=time.perf_counter() - t0)
