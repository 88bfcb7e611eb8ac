"""Tests for lightning_mia.attacks.reference_scores against independent references.

LiRA: per-example loops with scipy.stats.norm, and an array re-statement of the reference code's
``generate_ours`` / ``generate_ours_offline`` (tensorflow/privacy research/mi_lira_2021/plot.py) on
balanced reference sets where its truncation is a no-op.  RMIA: an explicit double loop over
(x, z) pairs with p(x) computed reference by reference.  Both: a no-signal control (AUC ~ 0.5).
"""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from lightning_mia.attacks.reference_scores import logit_scaled_confidence, lira_scores, rmia_scores


def _auc_null_sd(n1, n0):
    # Mann-Whitney U variance under H0 (no ties): AUC sd = sqrt((n1 + n0 + 1) / (12 n1 n0))
    return math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))


# ------------------------------------------------------------------------------------------------
# logit_scaled_confidence
# ------------------------------------------------------------------------------------------------
def test_logit_scaled_confidence_matches_softmax_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(50, 7))
    y = rng.integers(0, 7, size=50)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p[np.arange(50), y]
    ref = np.log(py) - np.log1p(-py)                       # log(p / (1 - p)), Carlini et al. Sec. IV-B
    assert np.allclose(logit_scaled_confidence(z, y), ref, atol=1e-10)
    assert np.allclose(logit_scaled_confidence(p, y, from_logits=False), ref, atol=1e-9)
    # the score.py form: 1 - p_y computed as the sum of the other probabilities
    wrong = p.copy()
    wrong[np.arange(50), y] = 0
    assert np.allclose(logit_scaled_confidence(p, y, from_logits=False), np.log(py) - np.log(wrong.sum(1)))


def test_logit_scaled_confidence_is_stable_for_extreme_logits():
    z = np.array([[0.0, 800.0, -800.0], [-700.0, 0.0, 0.0], [30.0, 0.0, 0.0]], dtype=np.float32)
    phi = logit_scaled_confidence(z, np.array([1, 0, 0]))
    assert phi.dtype == np.float64
    assert phi[0] == pytest.approx(800.0)                 # p_y rounds to 1: naive log(1 - p) = -inf
    assert phi[1] == pytest.approx(-700.0 - np.log(2.0))
    assert phi[2] == pytest.approx(30.0 - np.log(2.0))


def test_logit_scaled_confidence_broadcasting_and_nan_rows():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 3, 5))        # (n, q, C): q augmented queries
    y = np.array([0, 1, 2, 4])
    phi = logit_scaled_confidence(z, y[:, None])
    assert phi.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            others = np.delete(z[i, j], y[i])
            assert phi[i, j] == pytest.approx(z[i, j, y[i]] - np.log(np.exp(others).sum()))
    z[2, 1, 3] = np.nan
    phi = logit_scaled_confidence(z, y[:, None])
    assert np.isnan(phi[2, 1]) and np.isfinite(np.delete(phi.ravel(), 2 * 3 + 1)).all()
    # probabilities: p_y = 0 -> -inf, others all 0 -> +inf (exact values of the formula)
    phi = logit_scaled_confidence(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 0], from_logits=False)
    assert phi.tolist() == [-np.inf, np.inf]


@pytest.mark.parametrize(
    "x,y,kw",
    [
        (np.zeros((3, 1)), [0, 0, 0], {}),
        (np.zeros((3, 4)), [0, 4, 0], {}),
        (np.zeros((3, 4)), [0, -1, 0], {}),
        (np.zeros((3, 4)), [0, 1], {}),
        (np.zeros((3, 4)), [0.5, 1, 0], {}),
        (np.full((2, 3), 1.2), [0, 1], {"from_logits": False}),
        (np.array([["a", "b"]]), [0], {}),
    ],
)
def test_logit_scaled_confidence_rejects_bad_input(x, y, kw):
    with pytest.raises(ValueError):
        logit_scaled_confidence(x, np.array(y), **kw)


# ------------------------------------------------------------------------------------------------
# LiRA
# ------------------------------------------------------------------------------------------------
def _loop_lira(t, ref, ref_in, online, fix, center="median", offline_test="one_sided"):
    """Per-example loops with scipy.stats.norm; t (n, q), ref (K, n, q)."""
    K, n, q = ref.shape
    loc = np.median if center == "median" else np.mean
    g_in = np.std(np.concatenate([ref[ref_in[:, i], i, :].ravel() for i in range(n)]))
    g_out = np.std(np.concatenate([ref[~ref_in[:, i], i, :].ravel() for i in range(n)]))
    out = np.empty(n)
    for i in range(n):
        vals = []
        for j in range(q):
            xin = ref[ref_in[:, i], i, j]
            xout = ref[~ref_in[:, i], i, j]
            sd_in = g_in if fix else np.std(xin)
            sd_out = g_out if fix else np.std(xout)
            if online:
                lp_in = stats.norm.logpdf(t[i, j], loc(xin), sd_in)
                vals.append(lp_in - stats.norm.logpdf(t[i, j], loc(xout), sd_out))
            elif offline_test == "one_sided":
                vals.append(-stats.norm.logsf(t[i, j], loc(xout), sd_out))
            else:
                vals.append(-stats.norm.logpdf(t[i, j], loc(xout), sd_out))
        out[i] = np.mean(vals)
    return out


def _random_reference_setup(seed, n=6, K=8, q=1, balanced=True):
    rng = np.random.default_rng(seed)
    if balanced:
        ref_in = np.zeros((K, n), bool)
        for i in range(n):
            ref_in[rng.permutation(K)[: K // 2], i] = True
    else:
        ref_in = rng.random((K, n)) < 0.5
        ref_in[0], ref_in[1] = True, False   # at least 1 in / 1 out per example...
        ref_in[2], ref_in[3] = True, False   # ...and 2 of each, so per-example variance exists
    mu = rng.normal(size=(n, q)) * 2
    ref = mu[None] + rng.normal(size=(K, n, q)) + 1.5 * ref_in[:, :, None]
    t = mu + rng.normal(size=(n, q)) + 1.5 * (rng.random((n, 1)) < 0.5)
    return t, ref, ref_in


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("q", [1, 3])
def test_lira_matches_per_example_norm_loops(online, fix, q):
    t, ref, ref_in = _random_reference_setup(seed=10 * q + fix, q=q, balanced=False)
    tq, rq = (t, ref) if q > 1 else (t[:, 0], ref[:, :, 0])    # (n,) / (K, n) form when q == 1
    got = lira_scores(tq, rq, ref_in, online=online, fix_variance=fix)
    assert np.allclose(got, _loop_lira(t, ref, ref_in, online, fix), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("center", ["median", "mean"])
@pytest.mark.parametrize("offline_test", ["one_sided", "neg_logpdf"])
def test_lira_center_and_offline_test_variants(center, offline_test):
    t, ref, ref_in = _random_reference_setup(seed=3, q=2)
    got = lira_scores(t, ref, ref_in, online=False, center=center, offline_test=offline_test)
    assert np.allclose(got, _loop_lira(t, ref, ref_in, False, False, center, offline_test), rtol=1e-12)
    got = lira_scores(t, ref, ref_in, online=True, center=center)
    assert np.allclose(got, _loop_lira(t, ref, ref_in, True, False, center), rtol=1e-12)


def test_lira_matches_reference_code_arrays_on_balanced_refs():
    # Array re-statement of generate_ours / generate_ours_offline (equal IN/OUT counts per example,
    # so the reference code's truncation to the minimum count changes nothing).
    t, ref, ref_in = _random_reference_setup(seed=5, n=9, K=10, q=4)
    keep, scores = ref_in, ref                                 # (K, n), (K, n, q)
    dat_in = np.stack([scores[keep[:, j], j, :] for j in range(ref.shape[1])])     # (n, K/2, q)
    dat_out = np.stack([scores[~keep[:, j], j, :] for j in range(ref.shape[1])])
    mean_in, mean_out = np.median(dat_in, 1), np.median(dat_out, 1)
    std_in, std_out = np.std(dat_in, 1), np.std(dat_out, 1)
    # online: prediction = -(pr_in - pr_out) with pr = -logpdf, averaged over queries
    online_ref = (stats.norm.logpdf(t, mean_in, std_in) - stats.norm.logpdf(t, mean_out, std_out)).mean(1)
    assert np.allclose(lira_scores(t, ref, ref_in), online_ref, rtol=1e-12)
    # offline as in the repository: the ROC ranks by -logpdf_out
    offline_ref = -stats.norm.logpdf(t, mean_out, std_out).mean(1)
    got = lira_scores(t, ref, ref_in, online=False, offline_test="neg_logpdf")
    assert np.allclose(got, offline_ref, rtol=1e-12)
    # offline fixed variance: std_out = np.std(dat_out) over everything
    offline_fix = -stats.norm.logpdf(t, mean_out, np.std(dat_out)).mean(1)
    got = lira_scores(t, ref, ref_in, online=False, fix_variance=True, offline_test="neg_logpdf")
    assert np.allclose(got, offline_fix, rtol=1e-12)


def test_lira_nan_when_a_group_is_missing_or_degenerate():
    ref = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0], [9.0, 9.0, 6.0]])
    ref_in = np.array([[0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0]], bool)
    t = np.array([2.0, 3.0, 4.0])
    on = lira_scores(t, ref, ref_in)
    # ex. 0: one IN ref -> per-example sd undefined; ex. 1: two IN refs; ex. 2: one IN ref
    assert np.isnan(on[0]) and np.isfinite(on[1]) and np.isnan(on[2])
    assert np.isfinite(lira_scores(t, ref, ref_in, fix_variance=True)).all()   # global sd: 1 ref is enough
    off = lira_scores(t, ref, ref_in, online=False)
    assert np.isfinite(off).all()
    # no IN reference at all for an example -> NaN online, fine offline
    ref_in2 = ref_in.copy()
    ref_in2[:, 0] = False
    assert np.isnan(lira_scores(t, ref, ref_in2, fix_variance=True)[0])
    assert np.isfinite(lira_scores(t, ref, ref_in2, online=False)[0])
    # zero spread -> NaN (reference code's 1e-30 would give +-inf); NaN target -> NaN
    ref3 = ref.copy()
    ref3[[0, 1], 1] = 7.0
    assert np.isnan(lira_scores(t, ref3, ref_in, online=False)[1])
    assert np.isnan(lira_scores(np.array([np.nan, 3.0, 4.0]), ref, ref_in, online=False)[0])
    # NaN reference values are ignored, not propagated
    ref4 = ref.copy()
    ref4[0, 0] = np.nan
    assert np.isfinite(lira_scores(t, ref4, ref_in, online=False)[0])


def test_lira_no_signal_control_auc_is_chance():
    rng = np.random.default_rng(11)
    n, K = 2000, 16
    ref_in = rng.random((K, n)) < 0.5
    mu = rng.normal(size=n) * 2
    ref = mu[None] + rng.normal(size=(K, n))           # IN and OUT references identical in law
    t = mu + rng.normal(size=n)
    member = rng.random(n) < 0.5                       # labels independent of everything
    sd = _auc_null_sd(member.sum(), (~member).sum())
    for kw in ({}, {"fix_variance": True}, {"online": False}):
        s = lira_scores(t, ref, ref_in, **kw)
        ok = np.isfinite(s)            # an example may, by chance, have < 2 IN references -> NaN
        assert ok.mean() > 0.99
        assert abs(roc_auc_score(member[ok], s[ok]) - 0.5) < 3 * sd
    # positive control: the same machinery finds a real shift
    ref_sig = ref + 1.0 * ref_in
    t_sig = t + 1.0 * member
    s = lira_scores(t_sig, ref_sig, ref_in)
    ok = np.isfinite(s)
    assert roc_auc_score(member[ok], s[ok]) > 0.65


@pytest.mark.parametrize(
    "args,kw",
    [
        ((np.zeros(3), np.zeros((4, 2)), np.zeros((4, 3), bool)), {}),
        ((np.zeros(3), np.zeros((4, 3)), np.zeros((4, 2), bool)), {}),
        ((np.zeros((3, 2)), np.zeros((4, 3)), np.zeros((4, 3), bool)), {}),
        ((np.zeros(3), np.zeros((4, 3)), np.full((4, 3), 2)), {}),
        ((np.zeros(3), np.zeros((4, 3)), np.zeros((4, 3), bool)), {"center": "mode"}),
        ((np.zeros(3), np.zeros((4, 3)), np.zeros((4, 3), bool)), {"offline_test": "cdf"}),
    ],
)
def test_lira_rejects_bad_input(args, kw):
    with pytest.raises(ValueError):
        lira_scores(*args, **kw)


# ------------------------------------------------------------------------------------------------
# RMIA
# ------------------------------------------------------------------------------------------------
def _loop_rmia(px, rx, pz, rz, ref_in, a, gamma, online):
    K, n = rx.shape
    m = pz.size
    pzs = []
    for j in range(m):
        mean_z = sum(rz[k, j] for k in range(K)) / K
        pzs.append(mean_z if online else ((1 + a) * mean_z + (1 - a)) / 2)
    out = np.empty(n)
    for i in range(n):
        ins = [rx[k, i] for k in range(K) if ref_in is not None and ref_in[k, i]]
        outs = [rx[k, i] for k in range(K) if ref_in is None or not ref_in[k, i]]
        if online:
            p_x = (sum(ins) / len(ins) + sum(outs) / len(outs)) / 2
        else:
            p_x = ((1 + a) * sum(outs) / len(outs) + (1 - a)) / 2
        ratio_x = px[i] / p_x
        wins = 0
        for j in range(m):
            if ratio_x / (pz[j] / pzs[j]) > gamma:   # LR(x, z) > gamma
                wins += 1
        out[i] = wins / m
    return out


def _rmia_setup(seed, n=40, m=60, K=6, signal=0.0):
    rng = np.random.default_rng(seed)
    hard_x = rng.normal(size=n)
    hard_z = rng.normal(size=m)
    ref_in = rng.random((K, n)) < 0.5
    ref_in[0], ref_in[1] = True, False
    member = rng.random(n) < 0.5
    sig = lambda h, extra: 1 / (1 + np.exp(-(h + extra)))  # noqa: E731
    rx = sig(hard_x[None] + 0.3 * rng.normal(size=(K, n)), signal * ref_in)
    rz = sig(hard_z[None] + 0.3 * rng.normal(size=(K, m)), 0.0)
    px = sig(hard_x + 0.3 * rng.normal(size=n), signal * member)
    pz = sig(hard_z + 0.3 * rng.normal(size=m), 0.0)
    return px, rx, pz, rz, ref_in, member


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("a,gamma", [(0.3, 1.0), (0.0, 1.0), (1.0, 2.0), (0.6, 0.5)])
def test_rmia_matches_naive_double_loop(online, a, gamma):
    px, rx, pz, rz, ref_in, _ = _rmia_setup(seed=int(10 * a + gamma), signal=1.0)
    got = rmia_scores(px, rx, pz, rz, ref_in_x=ref_in, a=a, gamma=gamma, online=online)
    assert np.array_equal(got, _loop_rmia(px, rx, pz, rz, ref_in, a, gamma, online))


def test_rmia_offline_without_membership_uses_all_references_as_out():
    px, rx, pz, rz, _, _ = _rmia_setup(seed=4)
    got = rmia_scores(px, rx, pz, rz, ref_in_x=None, a=0.3)
    assert np.array_equal(got, _loop_rmia(px, rx, pz, rz, None, 0.3, 1.0, False))
    with pytest.raises(ValueError):
        rmia_scores(px, rx, pz, rz, ref_in_x=None, online=True)


def test_rmia_ml_privacy_meter_formula():
    # run_rmia: mean_x = (1 + a)/2 * mean_out_x + (1 - a)/2; ratios = ratio_x[:, None] / ratio_z;
    # counts = np.average(ratios > 1.0, axis=1)
    px, rx, pz, rz, ref_in, _ = _rmia_setup(seed=8, signal=0.5)
    a = 0.4
    out = np.where(~ref_in, rx, np.nan)
    mean_x = (1 + a) / 2 * np.nanmean(out, 0) + (1 - a) / 2
    mean_z = (1 + a) / 2 * rz.mean(0) + (1 - a) / 2
    ratios = (px / mean_x)[:, None] / (pz / mean_z)[None, :]
    assert np.array_equal(rmia_scores(px, rx, pz, rz, ref_in, a=a), np.average(ratios > 1.0, axis=1))


def test_rmia_undefined_and_degenerate_cases():
    px, rx, pz, rz, ref_in, _ = _rmia_setup(seed=9, n=5, m=7)
    ref_in[:, 2] = True                 # example 2 has no OUT reference
    s = rmia_scores(px, rx, pz, rz, ref_in, online=False)
    assert np.isnan(s[2]) and np.isfinite(np.delete(s, 2)).all()
    s = rmia_scores(px, rx, pz, rz, ref_in, online=True)
    assert np.isnan(s[2])
    px2 = px.copy()
    px2[0] = np.nan
    assert np.isnan(rmia_scores(px2, rx, pz, rz, None)[0])
    # a = 1 and all references give 0: p(x) = 0 -> ratio inf (p(x|theta) > 0) dominates every z
    rx0 = rx.copy()
    rx0[:, 1] = 0.0
    s = rmia_scores(px, rx0, pz, rz, None, a=1.0)
    assert s[1] == 1.0
    px0 = px.copy()
    px0[1] = 0.0
    assert np.isnan(rmia_scores(px0, rx0, pz, rz, None, a=1.0)[1])     # 0/0: undefined


def test_rmia_no_signal_control_auc_is_chance():
    px, rx, pz, rz, ref_in, member = _rmia_setup(seed=21, n=3000, m=2000, K=8, signal=0.0)
    sd = _auc_null_sd(member.sum(), (~member).sum())
    for online in (False, True):
        s = rmia_scores(px, rx, pz, rz, ref_in, online=online)
        assert abs(roc_auc_score(member, s) - 0.5) < 3 * sd
    px, rx, pz, rz, ref_in, member = _rmia_setup(seed=21, n=3000, m=2000, K=8, signal=1.5)
    assert roc_auc_score(member, rmia_scores(px, rx, pz, rz, ref_in, online=True)) > 0.65


@pytest.mark.parametrize(
    "bad",
    [
        {"target_p_x": np.full(40, 1.5)},
        {"ref_p_z": np.full((6, 60), np.nan)},
        {"target_p_z": np.zeros(0), "ref_p_z": np.zeros((6, 0))},
        {"ref_p_x": np.full((6, 39), 0.5)},
        {"a": 1.5},
        {"gamma": 0.0},
        {"ref_in_x": np.zeros((6, 41), bool)},
    ],
)
def test_rmia_rejects_bad_input(bad):
    px, rx, pz, rz, ref_in, _ = _rmia_setup(seed=0)
    kw = dict(target_p_x=px, ref_p_x=rx, target_p_z=pz, ref_p_z=rz, ref_in_x=ref_in)
    kw.update(bad)
    with pytest.raises(ValueError):
        rmia_scores(**kw)
