"""Evaluation protocol and paper preset: splits, slices, balancing, ratios, baselines, NaN handling."""
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from lightning_mia.attacks import Attack, build_attack, evaluate, evaluate_paper
from lightning_mia.attacks.paper import paper_attack_spec, preset_for_feature, sample_training_rows
from lightning_mia.attacks.protocol import (
    balance_training_set,
    ratio_key,
    resample_to_ratio,
    stratified_split,
)
from lightning_mia.metrics import METRIC_KEYS

ALL = ["threshold", "logistic_regression", "mlp", "random_forest", "xgboost"]


def _noise_pool(n, member_share=0.5, d=3, ordered=False, seed=0):
    rng = np.random.default_rng(seed)
    member = rng.random(n) < member_share
    labels = rng.integers(0, 3, n)
    correct = rng.random(n) < np.where(member, 0.9, 0.7)
    X = rng.normal(size=(n, d))
    if ordered:  # rows sorted by membership, then class, then correctness: order must not leak
        order = np.lexsort((correct, labels, ~member))
        member, labels, correct = member[order], labels[order], correct[order]
    return X, member, correct, labels


def _bal_sigma(m, k):
    """Upper bound on the std of the balanced accuracy of a label-independent predictor."""
    return math.sqrt(0.25 / m + 0.25 / k) / 2


def _nan_equal_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), k
            else:
                assert va == vb, k


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def test_stratified_split_keeps_every_stratum_share():
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 7, 3000)
    mask = stratified_split(strata, 0.2, np.random.default_rng(1))
    for k in range(7):
        size = int((strata == k).sum())
        assert int(mask[strata == k].sum()) in (math.floor(0.2 * size), math.ceil(0.2 * size))
    # A singleton stratum is sometimes held out (stochastic rounding), not always trained on.
    held = [stratified_split(np.array([0]), 0.2, np.random.default_rng(s))[0] for s in range(200)]
    assert 10 < sum(held) < 70


@pytest.mark.parametrize("mode", ["undersample", "oversample", "class_weight", "none"])
def test_balance_training_set_counts(mode):
    y = np.r_[np.ones(70, bool), np.zeros(30, bool)]
    idx, w = balance_training_set(y, mode, np.random.default_rng(0))
    pos, neg = int(y[idx].sum()), int((~y[idx]).sum())
    if mode == "undersample":
        assert pos == neg == 30 and len(set(idx.tolist())) == 60
        assert set(np.flatnonzero(~y)) <= set(idx.tolist())  # the smaller class is kept whole
    elif mode == "oversample":
        assert pos == neg == 70
        assert set(np.flatnonzero(y)) <= set(idx.tolist()) and len(set(idx[y[idx]].tolist())) == 70
    elif mode == "class_weight":
        assert sorted(idx.tolist()) == list(range(100))
        assert w[y[idx]].sum() == pytest.approx(w[~y[idx]].sum())
    else:
        assert sorted(idx.tolist()) == list(range(100)) and w is None
    if mode != "class_weight":
        assert w is None
    assert not np.array_equal(idx, np.sort(idx))  # shuffled: no order to learn from


def test_resample_to_ratio():
    y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    rng = np.random.default_rng(0)
    for r, (m, k) in {5: (100, 20), 1: (100, 100), 0.2: (20, 100), 0.5: (50, 100)}.items():
        sub = resample_to_ratio(y, r, rng)
        assert (int(y[sub].sum()), int((~y[sub]).sum())) == (m, k)
    assert resample_to_ratio(np.ones(5, bool), 1.0, rng) is None
    assert resample_to_ratio(np.r_[np.ones(1, bool), np.zeros(1, bool)], 5.0, rng) is None  # would need 0.2 non-members
    assert ratio_key("precision", 0.2) == "precision_at_ratio_0.2" and ratio_key("far", 5.0) == "far_at_ratio_5"


# --------------------------------------------------------------------------------------------------
# signal / no signal
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["threshold", "logistic_regression"])
def test_planted_signal_through_protocol(name):
    delta = 1.0
    rng = np.random.default_rng(2)
    member = rng.random(6000) < 0.5
    X = rng.normal(size=(6000, 1)) + delta * member[:, None]
    res = evaluate(X, member, np.ones(6000, bool), None, name, repeats=2, seed=0)
    row = res.row("all")
    target = norm.cdf(delta / 2)
    assert abs(row["balanced_accuracy"] - target) < 3 * _bal_sigma(600, 600)
    assert row["repeats"] == 2 and row["balanced_accuracy_std"] >= 0
    assert row["auc"] == pytest.approx(norm.cdf(delta / math.sqrt(2)), abs=0.03)  # AUC of two unit Gaussians


@pytest.mark.parametrize("scenario", ["shuffled", "ordered", "imbalanced"])
@pytest.mark.parametrize("name", ALL)
def test_pure_noise_is_coin_toss_for_every_attack_and_slice(name, scenario):
    X, member, correct, labels = _noise_pool(
        2000, member_share=5 / 6 if scenario == "imbalanced" else 0.5, d=1 if name == "threshold" else 3,
        ordered=scenario == "ordered", seed={"shuffled": 0, "ordered": 1, "imbalanced": 2}[scenario],
    )
    spec = {"name": name, "n_estimators": 30} if name in ("random_forest", "xgboost") else name
    res = evaluate(X, member, correct, labels, spec, repeats=1, seed=1)
    for row in res.rows:
        m, k = row["n_eval_members"], row["n_eval_nonmembers"]
        assert abs(row["balanced_accuracy"] - 0.5) <= 3 * _bal_sigma(m, k), (row["slice"], row["balanced_accuracy"])


def test_pure_noise_per_class_and_per_slice_and_balance_modes():
    X, member, correct, labels = _noise_pool(3000, member_share=0.75, ordered=True, seed=3)
    for kw in ({"per_class": True}, {"fit_per_slice": True}, {"balance": "oversample"}, {"balance": "class_weight"}):
        res = evaluate(X, member, correct, labels, "logistic_regression", seed=2, **kw)
        for row in res.rows:
            sigma = _bal_sigma(row["n_eval_members"], row["n_eval_nonmembers"])
            assert abs(row["balanced_accuracy"] - 0.5) <= 3 * sigma, (kw, row["slice"])


def test_table2_precision_follows_ratio_while_balanced_accuracy_and_far_do_not():
    """Rezaei & Liu Table 2: one attack, eval sets at 5:1, 1:1, 1:5 members:non-members."""
    rng = np.random.default_rng(5)
    n = 12000
    member = rng.random(n) < 0.5
    X = rng.normal(size=(n, 1)) + 1.0 * member[:, None]
    res = evaluate(X, member, np.ones(n, bool), None, "threshold", eval_ratios=[5, 1, 0.2], seed=0)
    row = res.row("all")
    tpr, far = row["tpr"], row["far"]
    prec = [row[ratio_key("precision", r)] for r in (5, 1, 0.2)]
    assert prec[0] > prec[1] + 0.1 > prec[2] + 0.2  # falls steeply with the ratio
    for r, p in zip((5, 1, 0.2), prec):
        assert p == pytest.approx(r * tpr / (r * tpr + far), abs=0.05)  # Bayes' rule with fixed TPR/FAR
        small = min(row["n_eval_members"], row["n_eval_nonmembers"]) * min(r, 1 / r)
        sigma = math.sqrt(0.25 / small)
        assert abs(row[ratio_key("far", r)] - far) <= 3 * sigma
        assert abs(row[ratio_key("balanced_accuracy", r)] - row["balanced_accuracy"]) <= 3 * sigma
        assert row[ratio_key("zeror_precision", r)] == pytest.approx(r / (1 + r), abs=0.01)


# --------------------------------------------------------------------------------------------------
# slices, per-class, per-slice fitting
# --------------------------------------------------------------------------------------------------
def test_per_class_recovers_class_dependent_signal():
    rng = np.random.default_rng(7)
    n = 4000
    member = rng.random(n) < 0.5
    labels = rng.integers(0, 2, n)
    sign = np.where(labels == 0, 1.0, -1.0)  # members shift up in class 0, down in class 1
    X = rng.normal(size=(n, 1)) + 2.0 * sign[:, None] * member[:, None]
    correct = np.ones(n, bool)
    glob = evaluate(X, member, correct, labels, "logistic_regression", seed=0).row("all")
    per = evaluate(X, member, correct, labels, "logistic_regression", per_class=True, seed=0).row("all")
    assert abs(glob["balanced_accuracy"] - 0.5) < 0.1
    assert per["balanced_accuracy"] == pytest.approx(norm.cdf(1.0), abs=0.04)


def test_fit_per_slice_vs_one_model():
    rng = np.random.default_rng(8)
    n = 6000
    member = rng.random(n) < 0.5
    correct = rng.random(n) < 0.75
    # Correct rows: members shifted up; misclassified rows: non-members shifted up (leakage reverses).
    X = rng.normal(size=(n, 1)) + 2.0 * (member == correct)[:, None]
    one = evaluate(X, member, correct, None, "threshold", seed=0)
    sep = evaluate(X, member, correct, None, "threshold", fit_per_slice=True, seed=0)
    assert one.row("misclassified")["balanced_accuracy"] < 0.3  # the shared model points the wrong way
    for s in ("correct", "misclassified"):
        assert sep.row(s)["balanced_accuracy"] == pytest.approx(norm.cdf(1.0), abs=0.05)
    # Per-slice scores come from the slice's own model.
    mis = (sep.fold == 1) & ~correct
    assert np.isfinite(sep.slice_scores["misclassified"][mis]).all()
    assert not np.allclose(sep.slice_scores["misclassified"][mis], sep.slice_scores["all"][mis])


def test_empty_and_one_sided_slices_give_nan_with_counts():
    X, member, _, labels = _noise_pool(400, seed=9)
    res = evaluate(X, member, np.ones(400, bool), labels, "logistic_regression", seed=0)
    mis = res.row("misclassified")
    assert (mis["n_members"], mis["n_nonmembers"]) == (0, 0)
    assert all(math.isnan(mis[k]) for k in METRIC_KEYS)
    assert math.isnan(mis["naive_balanced_accuracy"])
    # Misclassified rows are all non-members: two-class metrics NaN, FAR still defined.
    correct = member | (np.arange(400) % 3 > 0)
    for fps in (False, True):
        row = evaluate(X, member, correct, labels, "logistic_regression", fit_per_slice=fps, seed=0).row("misclassified")
        assert row["n_members"] == 0 and row["n_nonmembers"] == int((~correct).sum())
        for k in ("balanced_accuracy", "tpr", "auc", "advantage"):
            assert math.isnan(row[k]), k
        if fps:  # no members to train on: nothing fitted
            assert row["repeats"] == 0 and math.isnan(row["far"])
        else:
            assert 0 <= row["far"] <= 1


def test_slice_too_small_to_train_gives_nan():
    X, member, _, _ = _noise_pool(400, seed=10)
    correct = np.ones(400, bool)
    correct[np.flatnonzero(member)[0]] = False  # one misclassified member
    correct[np.flatnonzero(~member)[:30]] = False
    row = evaluate(X, member, correct, None, "logistic_regression", fit_per_slice=True, repeats=3, seed=0).row("misclassified")
    assert row["repeats"] == 0 and math.isnan(row["balanced_accuracy"])
    assert (row["n_members"], row["n_nonmembers"]) == (1, 30)


def test_balancing_wired_into_training_sets():
    class Spy(Attack):
        calls = []
        name = "spy"

        def _fit(self, X, y, w):
            Spy.calls.append((int(y.sum()), int((~y).sum()), None if w is None else (w[y].sum(), w[~y].sum())))

        def _score(self, X):
            return X[:, 0]

    X, member, correct, labels = _noise_pool(1000, member_share=0.8, seed=11)
    for mode in ("undersample", "oversample", "class_weight", "none"):
        Spy.calls.clear()
        res = evaluate(X, member, correct, labels, Spy(), balance=mode, slices=["all"], seed=0)
        n_pos = int((member & (res.fold == 0)).sum())
        n_neg = int((~member & (res.fold == 0)).sum())
        pos, neg, w = Spy.calls[0]
        expected = {"undersample": (n_neg, n_neg), "oversample": (n_pos, n_pos)}.get(mode, (n_pos, n_neg))
        assert (pos, neg) == expected, mode
        if mode == "class_weight":
            assert w[0] == pytest.approx(w[1])
        else:
            assert w is None


# --------------------------------------------------------------------------------------------------
# outputs, determinism, non-finite rows, validation
# --------------------------------------------------------------------------------------------------
def test_outputs_recompute_with_sklearn():
    rng = np.random.default_rng(12)
    n = 2000
    member = rng.random(n) < 0.6
    correct = rng.random(n) < np.where(member, 0.95, 0.7)
    X = rng.normal(size=(n, 2)) + 0.7 * member[:, None]
    res = evaluate(X, member, correct, None, "logistic_regression", seed=0)
    ev = res.fold == 1
    assert set(np.unique(res.fold)) == {0, 1}
    assert np.isfinite(res.scores[ev]).all() and np.isnan(res.scores[~ev]).all()
    pool = {"all": np.ones(n, bool), "correct": correct, "misclassified": ~correct}
    for s, in_slice in pool.items():
        row = res.row(s)
        mask = ev & in_slice
        assert row["auc"] == pytest.approx(roc_auc_score(member[mask], res.scores[mask]))
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(member[mask], res.pred[mask] == 1))
        assert row["naive_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(member[mask], correct[mask]))
        assert row["n_eval_members"] == member[mask].sum()
        assert (row["n_members"], row["n_nonmembers"]) == (int((member & in_slice).sum()), int((~member & in_slice).sum()))
    assert ev.mean() == pytest.approx(0.2, abs=0.01)


def test_determinism_by_seed():
    X, member, correct, labels = _noise_pool(800, seed=13)
    kw = dict(repeats=2, per_class=True, eval_ratios=[2, 0.5])
    a = evaluate(X, member, correct, labels, "mlp", seed=3, **kw)
    b = evaluate(X, member, correct, labels, "mlp", seed=3, **kw)
    _nan_equal_rows(a.rows, b.rows)
    assert np.array_equal(a.fold, b.fold) and np.array_equal(a.scores, b.scores, equal_nan=True)
    c = evaluate(X, member, correct, labels, "mlp", seed=4, **kw)
    assert not np.array_equal(a.fold, c.fold)


def test_non_finite_rows_are_dropped_and_counted():
    X, member, correct, labels = _noise_pool(500, seed=14)
    X[:25, 1] = np.inf
    X[25:30, 0] = np.nan
    res = evaluate(X, member, correct, labels, "xgboost", seed=0)
    assert res.row("all")["n_nonfinite"] == 30
    assert res.row("correct")["n_nonfinite"] + res.row("misclassified")["n_nonfinite"] == 30
    assert (res.fold[:30] == -1).all() and np.isnan(res.scores[:30]).all()
    assert np.isfinite(res.row("all")["balanced_accuracy"])


@pytest.mark.parametrize(
    "kw",
    [
        {"balance": "smote"},
        {"slices": ["all", "wrong"]},
        {"slices": []},
        {"eval_ratios": [0]},
        {"eval_fraction": 1.0},
        {"repeats": 0},
        {"per_class": True, "labels": None},
    ],
)
def test_validation(kw):
    X, member, correct, labels = _noise_pool(100, seed=15)
    labels = kw.pop("labels", labels)
    with pytest.raises(ValueError):
        evaluate(X, member, correct, labels, "logistic_regression", **kw)


def test_validation_attack_and_shapes():
    X, member, correct, labels = _noise_pool(100, seed=15)
    with pytest.raises(ValueError, match="single feature column"):
        evaluate(X, member, correct, labels, "threshold")
    with pytest.raises(KeyError):
        evaluate(X, member, correct, labels, "svm")
    with pytest.raises(ValueError):
        evaluate(X, member[:50], correct, labels, "logistic_regression")
    # threshold with an explicit column works on multi-column X.
    res = evaluate(X, member, correct, labels, {"name": "threshold", "column": 1}, seed=0)
    assert len(res.rows) == 3


# --------------------------------------------------------------------------------------------------
# paper preset
# --------------------------------------------------------------------------------------------------
def _paper_pool(seed=0):
    """3 classes in dataset order; class 2 has only 12 members (below the confidence threshold 15)."""
    rng = np.random.default_rng(seed)
    counts = {0: (40, 30), 1: (40, 30), 2: (12, 30)}
    member, labels = [], []
    for c, (m, k) in counts.items():
        member += [True] * m + [False] * k
        labels += [c] * (m + k)
    member, labels = np.array(member), np.array(labels)
    order = rng.permutation(member.size)  # interleave classes; relative order defines "dataset order"
    member, labels = member[order], labels[order]
    correct = np.ones(member.size, bool)
    correct[np.flatnonzero(labels != 2)[::7]] = False  # a few misclassified rows in classes 0 and 1
    X = rng.normal(size=(member.size, 2)) + 1.5 * member[:, None]
    return X, member, correct, labels


def test_paper_confidence_preset_skips_small_classes_and_splits_in_order():
    X, member, correct, labels = _paper_pool()
    res = evaluate_paper(X, member, correct, labels, preset="confidence", attack="mlp", seed=0)
    assert [r["slice"] for r in res.rows] == ["all", "correct", "misclassified"]
    row = res.row("all")
    assert row["n_classes"] == 2 and row["skipped_classes"] == [2]
    assert (res.fold[labels == 2] == -1).all()
    for c in (0, 1):
        for side in (True, False):
            idx = np.flatnonzero((labels == c) & (member == side))
            k = int(idx.size * 0.8)  # the attacker knows the first 80% in dataset order
            assert (res.fold[idx[:k]] == 0).all() and (res.fold[idx[k:]] == 1).all()
    # Mean and std across classes of per-class sklearn metrics.
    per = []
    for c in (0, 1):
        ev = (res.fold == 1) & (labels == c)
        per.append(balanced_accuracy_score(member[ev], res.pred[ev] == 1))
    assert row["balanced_accuracy"] == pytest.approx(np.mean(per))
    assert row["balanced_accuracy_std"] == pytest.approx(np.std(per))
    assert row["balanced_accuracy"] > 0.6  # planted signal


def test_paper_distance_preset_per_slice_lr_and_non_finite():
    X, member, correct, labels = _paper_pool(seed=1)
    X = X[:, :1].copy()
    X[3, 0] = np.inf  # authors: nan_to_num(posinf=1e5)
    res = evaluate_paper(X, member, correct, labels, preset="distance", seed=0)
    assert [r["slice"] for r in res.rows] == ["correct", "misclassified"]
    assert res.row("correct")["n_classes"] == 3  # 12 >= 10 members of class 2 are all correct
    assert res.row("misclassified")["n_classes"] == 0  # fewer than 10 misclassified per side
    assert res.row("misclassified")["skipped_classes"] == [0, 1, 2]
    assert math.isnan(res.row("misclassified")["balanced_accuracy"])
    assert np.isfinite(res.row("correct")["balanced_accuracy"])


def test_paper_threshold_overrides_and_tree_attacks():
    X, member, correct, labels = _paper_pool(seed=2)
    res = evaluate_paper(X, member, correct, labels, preset="confidence", attack="logistic_regression", min_per_side=10)
    assert res.row("all")["n_classes"] == 3
    rf = {"search_iter": 2, "param_distributions": {"n_estimators": [5, 10], "max_depth": [2, None]}}
    res = evaluate_paper(X, member, correct, labels, attack="random_forest", attack_options=rf, seed=0)
    assert res.row("all")["n_classes"] == 2 and np.isfinite(res.row("all")["balanced_accuracy"])
    xgb = {"search_iter": 2, "n_estimators": 10, "param_distributions": {"max_depth": [2, 3]}}
    res = evaluate_paper(X, member, correct, labels, preset="intermediate", attack="xgboost",
                         attack_options=xgb, min_per_side=12, sampling="undersampling", seed=0)
    assert res.row("all")["n_classes"] == 3


def test_paper_sampling_and_specs():
    yes, no = np.arange(10), np.arange(100, 104)
    a, b = sample_training_rows(yes, no, "undersampling")
    assert a.tolist() == [0, 1, 2, 3] and b.tolist() == no.tolist()  # first rows kept
    a, b = sample_training_rows(yes, no, "oversampling")
    assert a.tolist() == yes.tolist() and b.tolist() == np.tile(no, 2).tolist()  # int(10 / 4) = 2 copies
    assert sample_training_rows(yes, no, "none")[0].tolist() == yes.tolist()
    for attack in ("mlp", "random_forest", "xgboost", "logistic_regression"):
        build_attack(paper_attack_spec(attack, "intermediate"))
    assert paper_attack_spec("mlp")["batch_size"] == 32
    assert paper_attack_spec("xgboost", "intermediate")["search_cv"] == 5
    assert preset_for_feature("boundary_distance") == "distance"
    with pytest.raises(KeyError):
        preset_for_feature("pixels")
    X, member, correct, labels = _paper_pool()
    for bad in ({"preset": "pixels"}, {"attack": "svm"}, {"sampling": "smote"}, {"attacker_knowledge": 0.95}):
        with pytest.raises(ValueError):
            evaluate_paper(X, member, correct, labels, **bad)
