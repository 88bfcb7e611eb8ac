"""Tests for lightning_mia.bounds against independent references.

References used here are deliberately *not* the module's own code paths: scipy.stats.beta/binom
called directly, the tail-probability definition of Clopper-Pearson, plain Python loops over
thresholds, sklearn.metrics.roc_curve, closed forms, and the published values of TF Privacy's
epsilon_lower_bound_test.py (Jagielski et al. 2020's 4.54).
"""
import math

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.special import expit, logit
from sklearn.metrics import roc_curve

from lightning_mia.bounds import (
    clopper_pearson,
    epsilon_lower_bound,
    one_run_audit,
    one_run_epsilon_bound,
    one_run_p_value,
    tpr_at_fpr_interval,
)


# ------------------------------------------------------------------------------------------------
# clopper_pearson
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy_beta(conf):
    a = 1 - conf
    for n in (1, 2, 7, 50):
        for k in range(n + 1):
            lo, hi = clopper_pearson(k, n, conf)
            exp_lo = 0.0 if k == 0 else stats.beta.ppf(a / 2, k, n - k + 1)
            exp_hi = 1.0 if k == n else stats.beta.ppf(1 - a / 2, k + 1, n - k)
            assert lo == pytest.approx(exp_lo, abs=1e-12)
            assert hi == pytest.approx(exp_hi, abs=1e-12)
            lo1, one = clopper_pearson(k, n, conf, "lower")
            zero, hi1 = clopper_pearson(k, n, conf, "upper")
            assert one == 1.0 and zero == 0.0
            assert lo1 == pytest.approx(0.0 if k == 0 else stats.beta.ppf(a, k, n - k + 1), abs=1e-12)
            assert hi1 == pytest.approx(1.0 if k == n else stats.beta.ppf(1 - a, k + 1, n - k), abs=1e-12)


def test_clopper_pearson_textbook_values():
    # k = 0: the upper limit solves (1 - p)^n = alpha/2; k = n: the lower limit solves p^n = alpha/2.
    lo, hi = clopper_pearson(0, 10, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-12)
    lo, hi = clopper_pearson(10, 10, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), rel=1e-12)
    # one-sided "rule of three" neighbourhood: k = 0, n = 100, 95% upper = 1 - 0.05^(1/100)
    assert clopper_pearson(0, 100, 0.95, "upper")[1] == pytest.approx(1 - 0.05 ** 0.01, rel=1e-12)


def test_clopper_pearson_tail_definition():
    # Clopper & Pearson's definition: P[Bin(n, lo) >= k] = alpha/2 and P[Bin(n, hi) <= k] = alpha/2.
    n = 40
    for k in (1, 5, 20, 39):
        lo, hi = clopper_pearson(k, n, 0.95)
        assert stats.binom.sf(k - 1, n, lo) == pytest.approx(0.025, rel=1e-8)
        assert stats.binom.cdf(k, n, hi) == pytest.approx(0.025, rel=1e-8)


def test_clopper_pearson_exact_coverage_is_at_least_nominal():
    n = 30
    ks = np.arange(n + 1)
    lo, hi = clopper_pearson(ks, np.full(n + 1, n), 0.95)
    for p in np.linspace(0.001, 0.999, 199):
        cover = stats.binom.pmf(ks, n, p)[(lo <= p) & (p <= hi)].sum()
        assert cover >= 0.95 - 1e-12


def test_clopper_pearson_vectorised_and_nan_for_empty():
    lo, hi = clopper_pearson(np.array([[0, 0], [2, 0]]), np.array([4, 0])[None, :] * np.ones((2, 1), int))
    assert lo.shape == hi.shape == (2, 2)
    assert np.isnan(lo[:, 1]).all() and np.isnan(hi[:, 1]).all()
    assert lo[0, 0] == 0.0 and lo[1, 0] == pytest.approx(stats.beta.ppf(0.025, 2, 3))
    assert isinstance(clopper_pearson(3, 9)[0], float)
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))


@pytest.mark.parametrize(
    "k,n,kw",
    [(3, 2, {}), (-1, 5, {}), (1.5, 5, {}), (1, 5, {"confidence": 1.0}), (1, 5, {"confidence": 0}),
     (1, 5, {"side": "both"}), (np.nan, 5, {}), ([1, 2], [3, 4, 5], {})],
)
def test_clopper_pearson_rejects_bad_input(k, n, kw):
    with pytest.raises(ValueError):
        clopper_pearson(k, n, **kw)


# ------------------------------------------------------------------------------------------------
# tpr_at_fpr
# ------------------------------------------------------------------------------------------------
def _naive_tpr_at_fpr(y, s, fpr):
    n1, n0 = int(sum(y)), len(y) - int(sum(y))
    best = None
    for t in sorted(set(s.tolist())) + [math.inf]:
        tp = sum(1 for yi, si in zip(y, s) if yi == 1 and si >= t)
        fp = sum(1 for yi, si in zip(y, s) if yi == 0 and si >= t)
        if fp / n0 <= fpr and (best is None or tp > best[0] or (tp == best[0] and t > best[1])):
            best = (tp, t)
    return best[0] / n1, best[1]


@pytest.mark.parametrize("seed", range(5))
def test_tpr_at_fpr_matches_naive_loop_and_roc_curve(seed):
    rng = np.random.default_rng(seed)
    n = 120
    y = (rng.random(n) < 0.4).astype(int)
    # rounded scores create many ties, which must never be split
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)
    n0 = int((y == 0).sum())
    fpr_grid, tpr_grid, _ = roc_curve(y, s, drop_intermediate=False)
    for target in (1.0 / n0, 0.05, 0.1, 0.25, 0.5, 1.0):
        r = tpr_at_fpr_interval(y, s, target)
        tpr_ref, thr_ref = _naive_tpr_at_fpr(y, s, target)
        assert r["tpr"] == pytest.approx(tpr_ref, abs=1e-15)
        assert r["threshold"] == thr_ref
        assert r["tpr"] == pytest.approx(tpr_grid[fpr_grid <= target].max(), abs=1e-15)
        tp, n1 = round(r["tpr"] * r["n_members"]), r["n_members"]
        assert r["lo"] == pytest.approx(0.0 if tp == 0 else stats.beta.ppf(0.025, tp, n1 - tp + 1), abs=1e-12)
        hi_ref = 1.0 if tp == n1 else stats.beta.ppf(0.975, tp + 1, n1 - tp)
        assert r["hi"] == pytest.approx(hi_ref, abs=1e-12)
        assert r["lo"] <= r["tpr"] <= r["hi"]
        assert r["fpr_achieved"] <= target


def test_tpr_at_fpr_tie_semantics():
    # a member tied with two non-members at the top score: a threshold admits the whole tie, so
    # the member cannot be had for one false positive (no splitting of ties / randomisation).
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([5.0, 5.0, 5.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    r = tpr_at_fpr_interval(y, s, fpr=0.125)    # 8 non-members: one false positive allowed, the tie costs two
    assert r["tpr"] == 0.0 and r["threshold"] == math.inf and r["fpr_achieved"] == 0.0
    r = tpr_at_fpr_interval(y, s, fpr=0.25)
    assert r["tpr"] == 1.0 and r["threshold"] == 4.0 and r["fpr_achieved"] == 0.25


def test_tpr_at_fpr_nan_when_unresolvable_or_one_class():
    y = np.r_[np.ones(10), np.zeros(50)]
    s = np.arange(60.0)
    r = tpr_at_fpr_interval(y, s, fpr=0.01)      # 0.01 < 1/50
    assert math.isnan(r["tpr"]) and math.isnan(r["lo"]) and math.isnan(r["hi"])
    assert r["n_nonmembers"] == 50 and r["n_members"] == 10 and "resolve" in r["reason"]
    assert not math.isnan(tpr_at_fpr_interval(y, s, fpr=0.02)["tpr"])
    r = tpr_at_fpr_interval(np.ones(5), np.arange(5.0), 0.5)
    assert math.isnan(r["tpr"]) and r["n_nonmembers"] == 0


@pytest.mark.parametrize(
    "y,s,f",
    [([1, 0], [0.1, np.nan], 0.5), ([1, 2], [0.1, 0.2], 0.5), ([1, 0], [0.1], 0.5), ([1, 0], [0.1, 0.2], 1.5),
     ([1, 0], [0.1, 0.2], -0.1)],
)
def test_tpr_at_fpr_rejects_bad_input(y, s, f):
    with pytest.raises(ValueError):
        tpr_at_fpr_interval(np.array(y), np.array(s), f)


# ------------------------------------------------------------------------------------------------
# epsilon_lower_bound
# ------------------------------------------------------------------------------------------------
def _hand_eps(y, s, conf, delta=0.0, correction=1):
    """Every cut, both inequalities, with one-sided C-P bounds at (1 - conf) / 2 each (scipy.beta)."""
    a = (1 - conf) / 2 / correction
    n1, n0 = int(sum(y)), len(y) - int(sum(y))
    best = -math.inf
    for t in sorted(set(s))[1:]:
        tp = sum(1 for yi, si in zip(y, s) if yi and si >= t)
        fp = sum(1 for yi, si in zip(y, s) if not yi and si >= t)
        tn, fn = n0 - fp, n1 - tp
        tpr_lo = 0.0 if tp == 0 else stats.beta.ppf(a, tp, n1 - tp + 1)
        fpr_hi = 1.0 if fp == n0 else stats.beta.ppf(1 - a, fp + 1, n0 - fp)
        tnr_lo = 0.0 if tn == 0 else stats.beta.ppf(a, tn, n0 - tn + 1)
        fnr_hi = 1.0 if fn == n1 else stats.beta.ppf(1 - a, fn + 1, n1 - fn)
        if tpr_lo > delta:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
        if tnr_lo > delta:
            best = max(best, math.log((tnr_lo - delta) / fnr_hi))
    return max(best, 0.0)


def test_epsilon_lower_bound_hand_computation_tiny():
    y = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    s = [9, 8, 8, 7, 7, 6, 3, 1, 5, 4, 3, 2, 2, 1, 0, 0, -1, -2]
    for conf in (0.8, 0.9, 0.95):
        for delta in (0.0, 0.05):
            r = epsilon_lower_bound(np.array(y), np.array(s, float), confidence=conf, delta=delta)
            assert r["epsilon"] == pytest.approx(_hand_eps(y, s, conf, delta), abs=1e-10)
    r = epsilon_lower_bound(np.array(y), np.array(s, float), confidence=0.8)
    assert r["epsilon"] > 0 and r["side"] in ("tpr/fpr", "tnr/fnr") and r["reason"] is None


def test_epsilon_lower_bound_threshold_correction_matches_hand():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60, int), np.zeros(60, int)]
    s = np.round(rng.normal(size=120) + 1.5 * y, 1)
    n_thr = len(set(s.tolist())) - 1
    plain = epsilon_lower_bound(y, s)
    corr = epsilon_lower_bound(y, s, threshold_correction=True)
    assert plain["epsilon"] == pytest.approx(_hand_eps(y.tolist(), s.tolist(), 0.95), abs=1e-10)
    ref_corr = _hand_eps(y.tolist(), s.tolist(), 0.95, correction=n_thr)
    assert corr["epsilon"] == pytest.approx(ref_corr, abs=1e-10)
    assert corr["alpha_per_bound"] == pytest.approx(0.025 / n_thr)
    assert 0 < corr["epsilon"] < plain["epsilon"]


@pytest.mark.parametrize("n1,n0,conf", [(20, 20, 0.95), (100, 100, 0.95), (50, 200, 0.9), (300, 40, 0.99)])
def test_epsilon_lower_bound_perfect_separation_closed_form(n1, n0, conf):
    half = (1 - conf) / 2
    l1, l0 = half ** (1 / n1), half ** (1 / n0)   # C-P lower bound of n/n; 1 - l is the upper of 0/n
    expected = max(math.log(l1 / (1 - l0)), math.log(l0 / (1 - l1)))
    y = np.r_[np.ones(n1), np.zeros(n0)]
    s = np.r_[np.linspace(1, 2, n1), np.linspace(-2, 0, n0)]
    r = epsilon_lower_bound(y, s, confidence=conf)
    assert r["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert r["max_certifiable"] == pytest.approx(expected, rel=1e-12)
    assert r["threshold"] == 1.0


def test_epsilon_lower_bound_tf_privacy_reference_value():
    # TF Privacy epsilon_lower_bound_test.py::test_epsilon_bound_clopper_pearson: tp=tn=500,
    # fp=fn=0, alpha=0.01 -> 4.54 (Jagielski et al. 2020's example), both ratios.
    y = np.r_[np.ones(500), np.zeros(500)]
    r = epsilon_lower_bound(y, y.copy(), confidence=0.99)
    assert round(r["epsilon"], 2) == 4.54


def test_epsilon_lower_bound_chance_is_consistent_with_zero():
    zeros = 0
    seeds = range(30)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        y = np.r_[np.ones(200), np.zeros(200)]
        r = epsilon_lower_bound(y, rng.normal(size=400))
        assert r["epsilon"] >= 0
        zeros += r["epsilon"] == 0.0
    assert zeros >= 0.85 * len(seeds)


def test_epsilon_lower_bound_delta_monotone():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300), np.zeros(300)]
    s = rng.normal(size=600) + 2.0 * y
    e = [epsilon_lower_bound(y, s, delta=d)["epsilon"] for d in (0.0, 1e-3, 1e-2, 0.1)]
    assert e[0] > 0 and all(a >= b for a, b in zip(e, e[1:]))


def test_epsilon_lower_bound_nan_cases():
    r = epsilon_lower_bound(np.ones(10), np.arange(10.0))
    assert math.isnan(r["epsilon"]) and "both" in r["reason"]
    # 2 + 2 samples: even a perfect split gives log(0.025^(1/2) / (1 - 0.025^(1/2))) < 0
    r = epsilon_lower_bound(np.array([1, 1, 0, 0]), np.array([3.0, 2.0, 1.0, 0.0]))
    assert math.isnan(r["epsilon"]) and "too small" in r["reason"] and r["max_certifiable"] < 0
    # delta so large that no TPR lower bound exceeds it
    y = np.r_[np.ones(30), np.zeros(30)]
    assert math.isnan(epsilon_lower_bound(y, y, delta=0.99)["epsilon"])
    # constant scores on a resolvable pool: a real 0, not NaN
    r = epsilon_lower_bound(y, np.zeros(60))
    assert r["epsilon"] == 0.0 and r["reason"]


@pytest.mark.parametrize(
    "kw", [{"confidence": 1.0}, {"delta": -0.1}, {"delta": 2.0}, {"confidence": "high"}],
)
def test_epsilon_lower_bound_rejects_bad_args(kw):
    with pytest.raises(ValueError):
        epsilon_lower_bound(np.array([1, 0]), np.array([1.0, 0.0]), **kw)


# ------------------------------------------------------------------------------------------------
# one-run audit (Steinke, Nasr & Jagielski 2023)
# ------------------------------------------------------------------------------------------------
def _ref_eps_delta0(v, r, p):
    """delta = 0: solve P[Bin(r, expit(eps)) >= v] = p with brentq (independent of the module)."""
    f = lambda e: stats.binom.sf(v - 1, r, expit(e)) - p  # noqa: E731
    if f(0.0) >= 0:
        return 0.0
    return optimize.brentq(f, 0.0, 50.0, xtol=1e-13)


def _ref_p_value(m, r, v, eps, delta):
    """Appendix D's p-value, written with binomial CDF differences (as jax_privacy does)."""
    q = expit(eps)
    beta = stats.binom.sf(v - 1, r, q)
    alpha = 0.0
    for i in range(1, v + 1):
        window = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - 1 - i, r, q)  # P[v-i <= X < v]
        alpha = max(alpha, window / i)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("v,r", [(90, 100), (60, 100), (45, 50), (10, 10), (300, 400), (1000, 1000)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_one_run_delta0_matches_binomial_root(v, r, conf):
    got = one_run_epsilon_bound(v, r, m=5000, delta=0.0, confidence=conf)
    assert got == pytest.approx(_ref_eps_delta0(v, r, 1 - conf), abs=1e-8)


@pytest.mark.parametrize(
    "m,r,v,delta",
    [(1000, 100, 90, 1e-5), (1000, 200, 170, 1e-4), (10000, 500, 420, 1e-5), (200, 60, 55, 1e-3)],
)
def test_one_run_delta_positive_matches_reference_p_value(m, r, v, delta):
    p = 0.05
    # p-value itself
    for eps in (0.0, 0.5, 1.3):
        ref_p = _ref_p_value(m, r, v, eps, delta)
        assert one_run_p_value(v, r, m, eps, delta) == pytest.approx(ref_p, rel=1e-9)
    # the bound: root of the (monotone here) reference p-value, found by brentq
    f = lambda e: _ref_p_value(m, r, v, e, delta) - p  # noqa: E731
    ref = optimize.brentq(f, 0.0, 20.0, xtol=1e-10) if f(0.0) < 0 else 0.0
    got = one_run_epsilon_bound(v, r, m, delta=delta, confidence=1 - p)
    assert got == pytest.approx(ref, abs=1e-7)
    assert got <= one_run_epsilon_bound(v, r, m, delta=0.0, confidence=1 - p)


def test_one_run_paper_relationships():
    # (i) the bound never exceeds the point estimate logit(precision) (randomised response accuracy);
    # (ii) at fixed precision it grows with the number of guesses and approaches logit(precision);
    # (iii) delta > 0 costs epsilon, more so with more canaries m (the 2 m delta term).
    prec = 0.9
    bounds = [one_run_epsilon_bound(int(prec * r), r, m=10 ** 6) for r in (50, 200, 1000, 10000, 100000)]
    assert all(b < logit(prec) for b in bounds)
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert logit(prec) - bounds[-1] < 0.05
    e_m = [one_run_epsilon_bound(180, 200, m=m, delta=1e-5) for m in (200, 2000, 20000)]
    assert all(a > b for a, b in zip(e_m, e_m[1:]))
    assert e_m[0] < one_run_epsilon_bound(180, 200, m=200, delta=0.0)


def test_one_run_nan_and_zero_cases():
    assert math.isnan(one_run_epsilon_bound(0, 0, 100))          # no guesses
    assert math.isnan(one_run_epsilon_bound(4, 4, 100))          # 1/16 > 0.05 even if all correct
    assert one_run_epsilon_bound(5, 5, 100) > 0                  # 1/32 < 0.05
    assert one_run_epsilon_bound(30, 60, 100) == 0.0             # chance-level precision: a real 0
    assert one_run_p_value(10, 10, 100, 0.0) == pytest.approx(2.0 ** -10)


@pytest.mark.parametrize("args", [(5, 4, 100), (-1, 4, 100), (3, 4, 2), (2.5, 4, 100), (True, 4, 100)])
def test_one_run_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        one_run_epsilon_bound(*args)
    with pytest.raises(ValueError):
        one_run_epsilon_bound(3, 4, 100, delta=1.5)


def test_one_run_audit_guessing_rule_and_bound():
    rng = np.random.default_rng(7)
    m = 1000
    inc = rng.random(m) < 0.5
    s = rng.normal(size=m) + 1.5 * inc
    r = one_run_audit(s, inc, k_plus=100, k_minus=60)
    order = np.argsort(s)
    correct = int(inc[order[-100:]].sum() + (~inc[order[:60]]).sum())
    assert r["guesses_correct"] == correct and r["guesses_made"] == 160 and r["m"] == m
    assert r["epsilon"] == pytest.approx(_ref_eps_delta0(correct, 160, 0.05), abs=1e-8)
    assert r["precision"] == correct / 160 and r["reason"] is None
    # k_minus = 0 (only "in" guesses) is allowed, as in jax_privacy's epsilon_one_run (k- = 0)
    r0 = one_run_audit(s, inc, k_plus=50, k_minus=0)
    assert r0["guesses_correct"] == int(inc[order[-50:]].sum())
    # chance: independent scores -> consistent with 0 in most draws
    zeros = sum(one_run_audit(rng.normal(size=m), inc, 100, 100)["epsilon"] == 0.0 for _ in range(20))
    assert zeros >= 17


def test_one_run_audit_validation_and_nan():
    s, inc = np.arange(10.0), np.arange(10) % 2 == 0
    with pytest.raises(ValueError):
        one_run_audit(s, inc, 6, 5)
    with pytest.raises(ValueError):
        one_run_audit(s, inc[:5], 2, 2)
    with pytest.raises(ValueError):
        one_run_audit(np.r_[s[:9], np.nan], inc, 2, 2)
    r = one_run_audit(s, inc, 2, 1)
    assert math.isnan(r["epsilon"]) and "too few" in r["reason"]
    r = one_run_audit(s, inc, 0, 0)
    assert math.isnan(r["epsilon"]) and math.isnan(r["precision"])
