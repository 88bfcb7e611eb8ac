"""Metrics vs scikit-learn references, on random and adversarial inputs."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from lightning_mia.metrics import (
    BINARY_METRIC_KEYS,
    METRIC_KEYS,
    SCORE_METRIC_KEYS,
    INTERVAL_KEYS,
    attack_metrics,
    binary_metrics,
    mean_std,
    naive_baseline,
    roc_points,
    score_metrics,
    tpr_at_fpr,
    zeror_baseline,
)


def _nan_eq(a, b, tol=1e-12):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol


def _sk_binary(y, p):
    """Reference values from scikit-learn (NaN for 0/0 ratios)."""
    nan = np.nan
    both = y.any() and (~y).any()
    ref = {
        "accuracy": skm.accuracy_score(y, p) if y.size else nan,
        "precision_member": skm.precision_score(y, p, pos_label=1, zero_division=nan),
        "precision_nonmember": skm.precision_score(y, p, pos_label=0, zero_division=nan),
        "recall_member": skm.recall_score(y, p, pos_label=1, zero_division=nan),
        "recall_nonmember": skm.recall_score(y, p, pos_label=0, zero_division=nan),
        "f1": skm.f1_score(y, p, pos_label=1, zero_division=nan),
        "f1_nonmember": skm.f1_score(y, p, pos_label=0, zero_division=nan),
    }
    ref["tpr"] = ref["recall_member"]
    ref["tnr"] = ref["recall_nonmember"]
    ref["far"] = 1.0 - ref["recall_nonmember"] if (~y).any() else nan
    ref["balanced_accuracy"] = skm.balanced_accuracy_score(y, p) if both else nan
    ref["advantage"] = ref["tpr"] - ref["far"] if both else nan
    return {k: float(v) for k, v in ref.items()}


def _sk_scores(y, s):
    if not (y.any() and (~y).any()):
        return {k: np.nan for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "tpr_at_0.01pct_fpr")}
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    n_non = int((~y).sum())
    # an FPR budget finer than 1 / n_nonmembers cannot be resolved: NaN, not the TPR at FPR 0
    low = {k: tpr[fpr <= a].max() if a >= 1 / n_non else np.nan
           for k, a in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001), ("tpr_at_0.01pct_fpr", 1e-4))}
    return {"auc": skm.roc_auc_score(y, s), **low}


def _check_against_sklearn(y, s, p):
    ours = attack_metrics(y, s, p)
    ref = {**_sk_binary(y, p), **_sk_scores(y, s)}
    assert set(METRIC_KEYS) <= set(ours)
    # intervals and the epsilon bound have their own references (scipy.stats.beta) below
    assert set(METRIC_KEYS) - set(ref) == set(INTERVAL_KEYS) | {"epsilon_lb"}
    for k in ref:
        assert _nan_eq(ours[k], float(ref[k])), (k, ours[k], ref[k])
    assert ours["n_members"] == int(y.sum())
    assert ours["n_nonmembers"] == int((~y).sum())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize("seed", range(40))
def test_random_inputs_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y = rng.random(n) < rng.uniform(0.05, 0.95)
    # Coarse scores create ties; predictions from a threshold or independent coin flips.
    s = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 3)))
    p = s >= np.median(s) if seed % 2 else rng.random(n) < 0.5
    _check_against_sklearn(y, s, p)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize(
    "y,s,p",
    [
        ([1, 0], [0.5, 0.5], [1, 1]),  # tied scores, all predicted member
        ([1, 0], [0.5, 0.5], [0, 0]),  # all predicted non-member
        ([1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]),  # constant score
        ([1, 0, 0, 0, 1], [0.1, 0.9, 0.8, 0.7, 0.2], [0, 1, 1, 1, 0]),  # perfectly wrong
        ([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0]),  # perfect
        ([0, 1], [np.inf, -np.inf], [1, 0]),  # infinite scores are orderable
    ],
)
def test_adversarial_inputs_match_sklearn(y, s, p):
    y, s, p = np.array(y, bool), np.array(s, float), np.array(p, bool)
    if np.isinf(s).any():
        ours = score_metrics(y, s)
        finite = score_metrics(y, np.clip(s, -1e300, 1e300))
        assert ours.keys() == finite.keys() and all(_nan_eq(ours[k], finite[k]) for k in ours)
        assert ours["auc"] == skm.roc_auc_score(y, np.clip(s, -1e300, 1e300)) == 0.0
    else:
        _check_against_sklearn(y, s, p)


def test_single_class_and_empty_give_nan_with_counts():
    only_members = attack_metrics(np.ones(5, bool), np.arange(5.0), np.array([1, 1, 0, 1, 0], bool))
    for k in ("balanced_accuracy", "far", "tnr", "advantage", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "recall_nonmember"):
        assert math.isnan(only_members[k]), k
    assert only_members["tpr"] == 0.6 and only_members["accuracy"] == 0.6  # still well defined
    assert only_members["precision_member"] == 1.0
    assert math.isnan(only_members["precision_nonmember"]) is False  # 0 TN / 2 predicted non-members
    assert only_members["precision_nonmember"] == 0.0
    assert (only_members["n_members"], only_members["n_nonmembers"]) == (5, 0)

    only_nonmembers = attack_metrics(np.zeros(4, bool), np.arange(4.0), np.zeros(4, bool))
    assert only_nonmembers["far"] == 0.0 and only_nonmembers["tnr"] == 1.0
    for k in ("tpr", "balanced_accuracy", "precision_member", "f1", "advantage", "auc"):
        assert math.isnan(only_nonmembers[k]), k

    empty = attack_metrics(np.zeros(0, bool), np.zeros(0), np.zeros(0, bool))
    assert all(math.isnan(empty[k]) for k in METRIC_KEYS)
    assert (empty["n_members"], empty["n_nonmembers"]) == (0, 0)


def test_hand_computed_example():
    # TP=2 FN=1 FP=1 TN=1.
    y = np.array([1, 1, 1, 0, 0], bool)
    p = np.array([1, 1, 0, 1, 0], bool)
    m = binary_metrics(y, p)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["tpr"] == pytest.approx(2 / 3)
    assert m["far"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["precision_member"] == pytest.approx(2 / 3)
    assert m["precision_nonmember"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["advantage"] == pytest.approx(2 / 3 - 1 / 2)


def test_tpr_at_low_fpr_is_interpolation_free():
    # 1000 non-members, 100 members; the 10 highest non-member scores sit above all but 30 members.
    y = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    s = np.r_[np.linspace(10, 20, 70), np.linspace(0, 1, 30), np.linspace(-5, 1.5, 990), np.linspace(5, 6, 10)]
    m = score_metrics(y, s)
    # FPR <= 1% allows the 10 top non-members (FPR = 0.01 exactly): TPR = 70/100; <= 0.1% allows 1: still 70.
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.70)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(0.70)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert m["tpr_at_1pct_fpr"] == tpr[fpr <= 0.01].max()
    assert tpr_at_fpr(y, s, 0.0) == pytest.approx(0.70)
    f, t = roc_points(y, s)
    assert f[0] == 0 and t[0] == 0 and f[-1] == 1 and t[-1] == 1
    assert np.all(np.diff(f) >= 0) and np.all(np.diff(t) >= 0)
    with pytest.raises(ValueError):
        tpr_at_fpr(y, s, 1.5)


def test_constant_scores_give_auc_half_and_zero_low_fpr_tpr():
    y = np.r_[np.ones(50, bool), np.zeros(100, bool)]
    m = score_metrics(y, np.full(150, 0.3))
    assert m["auc"] == 0.5 == skm.roc_auc_score(y, np.full(150, 0.3))
    assert m["tpr_at_1pct_fpr"] == 0.0  # only (0,0) and (1,1) on the ROC
    assert math.isnan(m["tpr_at_0.1pct_fpr"])  # 0.1% of 100 non-members cannot be resolved
    assert m["epsilon_lb"] == 0.0


def test_low_fpr_intervals_and_epsilon_match_independent_references():
    """Clopper-Pearson interval from scipy.stats.beta; the epsilon bound from the TF Privacy form by hand."""
    from scipy.stats import beta

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(300, bool), np.zeros(500, bool)]
    s = np.round(rng.normal(size=800) + 1.5 * y, 1)  # < 256 distinct scores: the exact maximum
    assert len(np.unique(s)) < 256
    m = score_metrics(y, s)
    k = int(round(m["tpr_at_1pct_fpr"] * 300))
    assert m["tpr_at_1pct_fpr_lo"] == pytest.approx(beta.ppf(0.025, k, 300 - k + 1))
    assert m["tpr_at_1pct_fpr_hi"] == pytest.approx(beta.ppf(0.975, k + 1, 300 - k))
    assert m["tpr_at_1pct_fpr_lo"] <= m["tpr_at_1pct_fpr"] <= m["tpr_at_1pct_fpr_hi"]
    # epsilon: max over thresholds t of log(TPR_lo / FPR_hi), one-sided bounds at alpha/2 each
    best = 0.0
    for t in np.unique(s)[1:]:
        tp, fp = int((s[y] >= t).sum()), int((s[~y] >= t).sum())
        tpr_lo = beta.ppf(0.025, tp, 300 - tp + 1) if tp > 0 else 0.0
        fpr_hi = beta.ppf(0.975, fp + 1, 500 - fp) if fp < 500 else 1.0
        tnr_lo = beta.ppf(0.025, 500 - fp, fp + 1) if fp < 500 else 0.0
        fnr_hi = beta.ppf(0.975, 300 - tp + 1, tp) if tp > 0 else 1.0
        for num, den in ((tpr_lo, fpr_hi), (tnr_lo, fnr_hi)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    assert m["epsilon_lb"] == pytest.approx(best, rel=1e-9)
    # with more distinct scores the maximum over 256 quantile thresholds is a (slightly smaller) valid bound
    from lightning_mia.bounds import epsilon_lower_bound

    s2 = rng.normal(size=800) + 1.5 * y
    exact = epsilon_lower_bound(y, s2)["epsilon"]
    assert 0.9 * exact <= score_metrics(y, s2)["epsilon_lb"] <= exact


def test_nan_scores_give_nan_score_metrics():
    m = score_metrics(np.array([1, 0], bool), np.array([np.nan, 0.1]))
    assert all(math.isnan(m[k]) for k in SCORE_METRIC_KEYS)


def test_baselines():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.7
    correct = np.where(y, rng.random(300) < 0.95, rng.random(300) < 0.8)
    naive = naive_baseline(y, correct)
    assert naive["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, correct))
    assert naive["far"] == pytest.approx(1 - skm.recall_score(y, correct, pos_label=0))
    assert naive["auc"] == pytest.approx(skm.roc_auc_score(y, correct.astype(float)))
    zr = zeror_baseline(y)
    assert zr["precision_member"] == pytest.approx(y.mean())  # = member share (Table 2: 83.33% at 5:1)
    assert zr["recall_member"] == 1.0 and zr["far"] == 1.0 and zr["balanced_accuracy"] == 0.5
    assert math.isnan(zr["precision_nonmember"])  # never predicts non-member: 0/0
    assert zr["auc"] == 0.5
    # Table 2, ZeroR at 1:5: precision 16.66%.
    assert zeror_baseline(np.r_[np.ones(1, bool), np.zeros(5, bool)])["precision_member"] == pytest.approx(1 / 6)


def test_input_validation():
    with pytest.raises(ValueError):
        binary_metrics(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        binary_metrics(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        score_metrics(np.array([0, 1]), np.array([0.1]))


def test_key_sets_and_mean_std():
    assert set(BINARY_METRIC_KEYS) | set(SCORE_METRIC_KEYS) == set(METRIC_KEYS)
    out = mean_std([{"a": 1.0}, {"a": 3.0}, {"a": float("nan")}], ["a"])
    assert out["a"] == 2.0 and out["a_std"] == pytest.approx(np.std([1.0, 3.0]))
    assert math.isnan(mean_std([{"a": float("nan")}], ["a"])["a"])
