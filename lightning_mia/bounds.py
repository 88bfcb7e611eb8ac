"""Confidence bounds for membership-inference audits: pure numpy/scipy functions.

Conventions: **member = positive class (1)**, higher attack score = more likely member, and a
threshold ``t`` calls every sample with ``score >= t`` a member.  Where a quantity is undefined (an
empty class, a pool too small to resolve the requested operating point, no guess made) the result is
NaN -- never a silent 0 -- and the dict-returning functions say why in ``reason``.

Contents
--------
* :func:`clopper_pearson` -- exact binomial confidence interval (Clopper & Pearson, Biometrika 1934).
* :func:`tpr_at_fpr_interval` -- best TPR at an FPR budget, with a Clopper-Pearson interval on that TPR.
* :func:`epsilon_lower_bound` -- statistical (epsilon, delta)-DP lower bound from attack scores, the
  Clopper-Pearson construction of Jagielski, Ullman & Oprea (NeurIPS 2020, arXiv:2006.07709) and Nasr
  et al. (IEEE S&P 2021, arXiv:2101.04535), as implemented in TensorFlow Privacy's
  ``tensorflow_privacy/privacy/privacy_tests/epsilon_lower_bound.py`` (``BoundMethod.CLOPPER_PEARSON``).
* :func:`one_run_epsilon_bound`, :func:`one_run_audit` -- the one-training-run audit of Steinke, Nasr
  & Jagielski (NeurIPS 2023, arXiv:2305.08846), Algorithm 1 and the p-value of their Appendix D.

Example:
    >>> import numpy as np
    >>> from lightning_mia.bounds import clopper_pearson, epsilon_lower_bound
    >>> lo, hi = clopper_pearson(0, 10)
    >>> float(lo), round(float(hi), 4)          # textbook: hi = 1 - 0.025 ** (1 / 10)
    (0.0, 0.3085)
    >>> y = np.r_[np.ones(500), np.zeros(500)]
    >>> round(epsilon_lower_bound(y, y, confidence=0.99)["epsilon"], 2)   # Jagielski et al.'s 4.54
    4.54
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple, Union

import numpy as np
from scipy import stats
from scipy.special import expit

__all__ = [
    "clopper_pearson",
    "tpr_at_fpr_interval",
    "epsilon_lower_bound",
    "one_run_p_value",
    "one_run_epsilon_bound",
    "one_run_audit",
]

ArrayOrFloat = Union[float, np.ndarray]
_SIDES = ("two-sided", "lower", "upper")


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _check_confidence(confidence: float) -> float:
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}") from None
    if not (0.0 < c < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _check_unit(name: str, value: Any) -> float:
    """A number in [0, 1] (a rate or a delta)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_delta(delta: float) -> float:
    return _check_unit("delta", delta)


def _as_count_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be numeric counts, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if np.any(a != np.round(a)):
        raise ValueError(f"{name} must be whole numbers (counts)")
    if np.any(a < 0):
        raise ValueError(f"{name} must be >= 0")
    return a


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got a bool")
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {x!r}") from None
    if not math.isfinite(f) or f != round(f):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    return int(round(f))


def _binary_labels_and_scores(y_true: Any, scores: Any) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores must have the same length, got {y.shape[0]} and {s.shape[0]}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"y_true must be boolean or 0/1, got dtype {y.dtype}")
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError("y_true must contain only 0/1 (member = 1)")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (drop or impute NaN/inf scores before bounding)")
    return y.astype(bool), s


def _confusion_counts(y: np.ndarray, s: np.ndarray, thresholds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """TP(t), FP(t) = members / non-members with score >= t, for every t in ``thresholds``."""
    mem = np.sort(s[y])
    non = np.sort(s[~y])
    tp = mem.size - np.searchsorted(mem, thresholds, side="left")
    fp = non.size - np.searchsorted(non, thresholds, side="left")
    return tp.astype(np.int64), fp.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Clopper-Pearson
# --------------------------------------------------------------------------------------------------
def clopper_pearson(
    k: Any, n: Any, confidence: float = 0.95, side: str = "two-sided"
) -> Tuple[ArrayOrFloat, ArrayOrFloat]:
    """Exact (Clopper-Pearson) confidence interval for a binomial proportion ``k / n``.

    The interval inverts two one-sided binomial tests (Clopper & Pearson, Biometrika 26(4), 1934):
    ``lo`` solves ``P[Bin(n, lo) >= k] = tail`` and ``hi`` solves ``P[Bin(n, hi) <= k] = tail``, which in
    beta-quantile form (the binomial/beta tail identity) reads, with
    ``alpha = 1 - confidence``,

    * ``side="two-sided"``: ``lo = Beta.ppf(alpha/2; k, n-k+1)``, ``hi = Beta.ppf(1-alpha/2; k+1, n-k)``;
    * ``side="lower"``: one-sided lower bound ``lo = Beta.ppf(alpha; k, n-k+1)``, ``hi = 1``;
    * ``side="upper"``: one-sided upper bound ``lo = 0``, ``hi = Beta.ppf(1-alpha; k+1, n-k)``.

    By convention ``lo = 0`` when ``k = 0`` and ``hi = 1`` when ``k = n`` (the beta quantile is not
    defined there).  ``n = 0`` gives ``(nan, nan)``: no trial, no information.

    Args:
        k: number of successes (scalar or array; whole numbers, ``0 <= k <= n``).
        n: number of trials (scalar or array, broadcast against ``k``).
        confidence: coverage in (0, 1).
        side: ``"two-sided"``, ``"lower"`` or ``"upper"``.

    Returns:
        ``(lo, hi)``: floats for scalar inputs, otherwise arrays of the broadcast shape.

    Raises:
        ValueError: on non-integral, negative or ``k > n`` counts, a confidence outside (0, 1) or an
            unknown ``side``.

    Example:
        >>> lo, hi = clopper_pearson(0, 10)
        >>> float(lo), round(float(hi), 6), round(1 - 0.025 ** 0.1, 6)
        (0.0, 0.308497, 0.308497)
        >>> lo, hi = clopper_pearson([10, 0], [10, 0], side="lower")    # n = 0: no information
        >>> lo.round(4).tolist(), hi.tolist()
        ([0.7411, nan], [1.0, nan])
    """
    c = _check_confidence(confidence)
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    k_arr = _as_count_array(k, "k")
    n_arr = _as_count_array(n, "n")
    try:
        k_arr, n_arr = np.broadcast_arrays(k_arr, n_arr)
    except ValueError:
        raise ValueError(
            f"k and n cannot be broadcast together: shapes {np.shape(k)} and {np.shape(n)}"
        ) from None
    if np.any(k_arr > n_arr):
        raise ValueError("k must be <= n")
    alpha = 1.0 - c
    tail = alpha / 2.0 if side == "two-sided" else alpha

    # Safe shape parameters where the quantile is replaced by its limit (k = 0 or k = n).
    a_lo = np.where(k_arr > 0, k_arr, 1.0)
    b_lo = n_arr - k_arr + 1.0
    a_hi = k_arr + 1.0
    b_hi = np.where(n_arr - k_arr > 0, n_arr - k_arr, 1.0)
    if side == "upper":
        lo = np.zeros(k_arr.shape)
    else:
        lo = np.where(k_arr > 0, stats.beta.ppf(tail, a_lo, b_lo), 0.0)
    if side == "lower":
        hi = np.ones(k_arr.shape)
    else:
        hi = np.where(k_arr < n_arr, stats.beta.ppf(1.0 - tail, a_hi, b_hi), 1.0)
    empty = n_arr == 0
    lo = np.where(empty, np.nan, lo).astype(np.float64)
    hi = np.where(empty, np.nan, hi).astype(np.float64)
    if np.ndim(k) == 0 and np.ndim(n) == 0:
        return float(lo), float(hi)
    return lo, hi


# --------------------------------------------------------------------------------------------------
# TPR at a fixed FPR
# --------------------------------------------------------------------------------------------------
def tpr_at_fpr_interval(y_true: Any, scores: Any, fpr: float, confidence: float = 0.95) -> Dict[str, Any]:
    """Highest empirical TPR over thresholds whose empirical FPR is ``<= fpr``, with an exact CI.

    Every distinct score value is a candidate threshold ``t`` (plus ``t = +inf``, which admits
    nothing); a threshold calls **all** samples with ``score >= t`` members, so tied scores are never
    split (no randomised operating points, unlike the interpolated TPR of ROC-curve libraries).  The
    reported TPR is ``max {TP(t) / n_members : FP(t) / n_nonmembers <= fpr}`` and the interval is the
    two-sided Clopper-Pearson interval on ``TP / n_members`` (:func:`clopper_pearson`).  The interval
    treats the threshold as fixed; it does not account for having chosen it on the same data.

    Undefined cases give NaN ``tpr``/``lo``/``hi``/``threshold`` (counts are still reported):

    * a class is missing;
    * ``fpr < 1 / n_nonmembers``: the only admissible operating point would have zero false
      positives, i.e. the requested FPR is finer than the non-member pool can resolve (Carlini et
      al., S&P 2022, argue for reporting TPR at *low* FPR -- which needs enough non-members).

    Args:
        y_true: (n,) 0/1 or bool membership labels (member = 1).
        scores: (n,) finite attack scores, higher = more likely member.
        fpr: FPR budget in [0, 1].
        confidence: coverage of the interval on the TPR.

    Returns:
        dict with ``tpr``, ``lo``, ``hi``, ``threshold`` (the largest threshold attaining ``tpr``;
        ``inf`` when ``tpr == 0``), ``fpr_achieved`` (its empirical FPR), ``n_members``,
        ``n_nonmembers``, ``reason`` (None, or why the values are NaN).

    Example:
        >>> import numpy as np
        >>> y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        >>> s = np.array([9, 8, 7, 1, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0.])
        >>> r = tpr_at_fpr_interval(y, s, fpr=0.1)
        >>> r["tpr"], r["threshold"], r["fpr_achieved"], round(r["lo"], 4)
        (0.75, 7.0, 0.0, 0.1941)
        >>> bool(np.isnan(tpr_at_fpr_interval(y, s, fpr=0.05)["tpr"]))     # 0.05 < 1 / 10 non-members
        True
    """
    y, s = _binary_labels_and_scores(y_true, scores)
    c = _check_confidence(confidence)
    f = _check_unit("fpr", fpr)
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    out: Dict[str, Any] = {
        "tpr": math.nan,
        "lo": math.nan,
        "hi": math.nan,
        "threshold": math.nan,
        "fpr_achieved": math.nan,
        "n_members": n1,
        "n_nonmembers": n0,
        "reason": None,
    }
    if n1 == 0 or n0 == 0:
        out["reason"] = "needs both members and non-members"
        return out
    if f < 1.0 / n0:
        out["reason"] = f"fpr={f:g} is below 1/n_nonmembers={1.0 / n0:g}: the pool cannot resolve it"
        return out
    thresholds = np.append(np.unique(s), np.inf)
    tp, fp = _confusion_counts(y, s, thresholds)
    admissible = fp / n0 <= f  # the empirical FPR as a float ratio, exactly as the definition reads
    tp_best = int(tp[admissible].max())
    # TP is non-increasing in t, so the largest admissible threshold with TP == tp_best has the
    # fewest false positives among the operating points attaining tp_best.
    idx = np.flatnonzero(admissible & (tp == tp_best))[-1]
    lo, hi = clopper_pearson(tp_best, n1, c, "two-sided")
    out.update(
        tpr=tp_best / n1,
        lo=float(lo),
        hi=float(hi),
        threshold=float(thresholds[idx]),
        fpr_achieved=float(fp[idx] / n0),
    )
    return out


# --------------------------------------------------------------------------------------------------
# (epsilon, delta) lower bound from scores (Jagielski et al. 2020 / Nasr et al. 2021)
# --------------------------------------------------------------------------------------------------
def epsilon_lower_bound(
    y_true: Any,
    scores: Any,
    confidence: float = 0.95,
    delta: float = 0.0,
    threshold_correction: bool = False,
) -> Dict[str, Any]:
    """Statistical lower bound on the DP epsilon implied by a membership attack's scores.

    **Inequalities.** If training is (eps, delta)-DP, every test that calls ``score >= t`` "member"
    satisfies both ``TPR <= e^eps FPR + delta`` and ``TNR <= e^eps FNR + delta`` (the hypothesis-
    testing view of DP, Kairouz, Oh & Viswanath, ICML 2015; used for auditing by Jagielski et al.
    2020 and Nasr et al. 2021).  Hence, at each threshold,

    * ``"tpr/fpr"`` side: ``eps >= log((TPR_lo - delta) / FPR_hi)``,
    * ``"tnr/fnr"`` side: ``eps >= log((TNR_lo - delta) / FNR_hi)``,

    where ``TPR_lo`` is a one-sided Clopper-Pearson lower bound on ``TP / n_members`` and ``FPR_hi`` a
    one-sided upper bound on ``FP / n_nonmembers``.  Because the Clopper-Pearson interval is symmetric
    (``TNR_lo = 1 - FPR_hi`` and ``FNR_hi = 1 - TPR_lo`` at the same level), both sides rest on the
    same two events, so no extra correction is needed for using both.

    **Confidence correction (as TF Privacy).** The two one-sided bounds are each taken at level
    ``alpha/2`` (``alpha = 1 - confidence``): a union (Bonferroni) bound over the two binomial
    estimates, so that at a *fixed* threshold the bound holds with probability ``>= confidence``.
    This matches TF Privacy's ``RatioBound._bound_clopper_pearson`` (``proportion_confint(...,
    alpha, method='beta')`` spends ``alpha/2`` on each tail) and jax_privacy's
    ``epsilon_clopper_pearson`` (``significance / 2`` per bound), and reproduces Jagielski et al.'s
    value ``eps >= 4.54`` for 500/500 perfectly separated canaries at 99% confidence (the number in
    TF Privacy's ``epsilon_lower_bound_test.py``).  TF Privacy does not support ``delta``; the
    ``- delta`` in the numerators follows Jagielski et al.'s (eps, delta) form and jax_privacy.

    **Max over thresholds.** The result is the maximum over all thresholds that split the pool
    (every distinct score but the smallest) and both sides, floored at 0.  As in TF Privacy, the
    maximum is *not* corrected for the choice of threshold by default, so it is a "best threshold"
    bound (strictly valid only when the threshold is chosen on separate data, as Jagielski et al. do).
    ``threshold_correction=True`` applies jax_privacy's default ``Bonferroni()`` strategy instead:
    ``alpha`` is divided by the number of candidate thresholds, which makes the maximum a valid
    ``confidence``-level bound.

    **Undefined cases (NaN, with a reason).** A missing class, or a pool so small that even a
    perfectly separating attack (``TP = n_members, FP = 0``) would not certify ``eps > 0`` at this
    confidence (``max_certifiable <= 0``): then the bound cannot distinguish this attack from
    chance, and 0 would be misleading.  Otherwise a bound that no threshold lifts above 0 is reported
    as ``0.0`` ("consistent with eps = 0").

    Args:
        y_true: (n,) 0/1 or bool membership labels (member = 1).
        scores: (n,) finite attack scores, higher = more likely member.
        confidence: overall confidence in (0, 1).
        delta: the DP delta in [0, 1].
        threshold_correction: divide ``alpha`` by the number of candidate thresholds (Bonferroni).

    Returns:
        dict with ``epsilon`` (float, NaN when undefined), ``threshold`` and ``side`` of the best
        bound (NaN / None when ``epsilon`` is 0 or NaN), ``tpr_lo`` and ``fpr_hi`` at that threshold,
        ``max_certifiable`` (the bound a perfect attack would get on this pool), ``n_members``,
        ``n_nonmembers``, ``alpha_per_bound`` (the level each one-sided bound was taken at) and
        ``reason`` (None when ``epsilon > 0``).

    Example:
        >>> import numpy as np
        >>> y = np.r_[np.ones(20), np.zeros(20)]
        >>> r = epsilon_lower_bound(y, y)         # perfect separation, 20 + 20 samples
        >>> round(r["epsilon"], 4), r["side"]
        (1.5968, 'tpr/fpr')
        >>> round(float(np.log(0.025 ** (1 / 20) / (1 - 0.025 ** (1 / 20)))), 4)
        1.5968
        >>> bool(np.isnan(epsilon_lower_bound([1, 0], [1.0, 0.0])["epsilon"]))   # 1 + 1: hopeless
        True
    """
    y, s = _binary_labels_and_scores(y_true, scores)
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    out: Dict[str, Any] = {
        "epsilon": math.nan,
        "threshold": math.nan,
        "side": None,
        "tpr_lo": math.nan,
        "fpr_hi": math.nan,
        "max_certifiable": math.nan,
        "n_members": n1,
        "n_nonmembers": n0,
        "alpha_per_bound": math.nan,
        "reason": None,
    }
    if n1 == 0 or n0 == 0:
        out["reason"] = "needs both members and non-members"
        return out
    # Candidate thresholds: every distinct score except the smallest, i.e. every cut that leaves at
    # least one sample on each side (the all-member / no-member cuts can never give eps > 0).
    thresholds = np.unique(s)[1:]
    n_thr = max(int(thresholds.size), 1)
    alpha = 1.0 - c
    alpha_bound = alpha / 2.0 / (n_thr if threshold_correction else 1)
    out["alpha_per_bound"] = alpha_bound
    conf_bound = 1.0 - alpha_bound

    def _eps(tpr_lo: np.ndarray, fpr_hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            e1 = np.where(tpr_lo > d, np.log(np.maximum(tpr_lo - d, 1e-300)) - np.log(fpr_hi), -np.inf)
            tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
            # fnr_hi = 1 - tpr_lo > 0 always (a one-sided lower bound on a proportion is < 1)
            e2 = np.where(tnr_lo > d, np.log(np.maximum(tnr_lo - d, 1e-300)) - np.log(fnr_hi), -np.inf)
        return e1, e2

    # What a perfect attack could certify on this pool: TPR_lo(n1, n1) and FPR_hi(0, n0).
    p_lo, _ = clopper_pearson(n1, n1, conf_bound, "lower")
    _, p_hi = clopper_pearson(0, n0, conf_bound, "upper")
    pe1, pe2 = _eps(np.array([p_lo]), np.array([p_hi]))
    max_cert = float(max(pe1[0], pe2[0]))
    out["max_certifiable"] = max_cert
    if not max_cert > 0:
        out["reason"] = (
            f"pool too small: even a perfectly separating attack on {n1} members / {n0} non-members "
            f"could not certify eps > 0 at confidence {c:g} (delta={d:g})"
        )
        return out
    if thresholds.size == 0:
        out["epsilon"] = 0.0
        out["reason"] = "all scores are equal: no threshold splits the pool (consistent with eps = 0)"
        return out

    tp, fp = _confusion_counts(y, s, thresholds)
    tpr_lo, _ = clopper_pearson(tp, np.full_like(tp, n1), conf_bound, "lower")
    _, fpr_hi = clopper_pearson(fp, np.full_like(fp, n0), conf_bound, "upper")
    e1, e2 = _eps(tpr_lo, fpr_hi)
    i1, i2 = int(np.argmax(e1)), int(np.argmax(e2))
    # Prefer the tpr/fpr side on (rounding-level) ties: both sides coincide for a balanced pool.
    if e1[i1] >= e2[i2] - 1e-12:
        best, idx, side = float(e1[i1]), i1, "tpr/fpr"
    else:
        best, idx, side = float(e2[i2]), i2, "tnr/fnr"
    if best > 0:
        out.update(
            epsilon=best,
            threshold=float(thresholds[idx]),
            side=side,
            tpr_lo=float(tpr_lo[idx]),
            fpr_hi=float(fpr_hi[idx]),
        )
    else:
        out["epsilon"] = 0.0
        out["reason"] = f"no threshold certifies eps > 0 at confidence {c:g} (consistent with eps = 0)"
    return out


# --------------------------------------------------------------------------------------------------
# One training run (Steinke, Nasr & Jagielski, NeurIPS 2023)
# --------------------------------------------------------------------------------------------------
def _guess_counts(guesses_correct: Any, guesses_made: Any, m: Any) -> Tuple[int, int, int]:
    """``(correct, made, m)`` as integers with ``0 <= correct <= made <= m``."""
    v, r, m_ = _as_int(guesses_correct, "guesses_correct"), _as_int(guesses_made, "guesses_made"), _as_int(m, "m")
    if not (0 <= v <= r <= m_):
        raise ValueError(f"need 0 <= guesses_correct <= guesses_made <= m, got {v}, {r}, {m_}")
    return v, r, m_


def one_run_p_value(
    guesses_correct: int, guesses_made: int, m: int, epsilon: float, delta: float = 0.0
) -> float:
    """P-value of observing ``>= v`` correct guesses out of ``r`` under an (eps, delta)-DP null.

    Steinke, Nasr & Jagielski (NeurIPS 2023, arXiv:2305.08846): each of the ``m`` canaries is
    included by an independent fair coin; the auditor makes ``r`` guesses (abstaining on the rest).
    Under (eps, 0)-DP the number of correct guesses is stochastically dominated by
    ``Binomial(r, q)``, ``q = e^eps / (1 + e^eps)`` (randomised-response accuracy), so the p-value is
    ``beta = P[Binomial(r, q) >= v]``.  For ``delta > 0`` their Appendix D adds
    ``2 * m * delta * max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i`` (capped at 1); this is
    the same expression as the authors' ``p_value_DP_audit`` and jax_privacy's ``_one_run_p_value``.

    Args:
        guesses_correct: ``v``, number of correct guesses.
        guesses_made: ``r``, number of (non-abstaining) guesses, ``v <= r <= m``.
        m: number of randomised canaries.
        epsilon: the null hypothesis' epsilon (``>= 0``).
        delta: the null hypothesis' delta in [0, 1].

    Returns:
        The p-value in [0, 1].

    Example:
        >>> round(one_run_p_value(10, 10, 100, 0.0), 6)    # 10/10 correct by coin flips: 2**-10
        0.000977
    """
    v, r, m_ = _guess_counts(guesses_correct, guesses_made, m)
    eps = float(epsilon)
    if not (eps >= 0) or math.isnan(eps):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    d = _check_delta(delta)
    return _p_value(m_, r, v, eps, d)


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    q = float(expit(eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # cumulative P[v - i <= X <= v - 1] for i = 1..v (Appendix D's running ``sum``)
    partial = np.cumsum(stats.binom.pmf(v - i, r, q))
    alpha = max(0.0, float(np.max(partial / i)))
    return min(beta + alpha * delta * 2.0 * m, 1.0)


def one_run_epsilon_bound(
    guesses_correct: int, guesses_made: int, m: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest epsilon rejected by the one-run audit test at the given confidence.

    Implements ``get_eps_audit`` of Steinke, Nasr & Jagielski (NeurIPS 2023, Appendix D): with
    ``p = 1 - confidence``, return the supremum of the ``eps`` whose (eps, delta) null is rejected,
    i.e. whose :func:`one_run_p_value` is ``< p``.  Like the reference code, the search keeps
    ``p_value(eps_lo) < p <= p_value(eps_hi)``, growing ``eps_hi`` by 1 from 1 and then bisecting
    (here to 1e-10 instead of 30 halvings, so results agree with the reference to ~1e-9).
    ``delta > 0`` is supported exactly (Appendix D's p-value).

    Returns 0.0 when the observed guesses do not reject eps = 0, and NaN when nothing could be
    certified whatever the outcome: no guess made (``guesses_made == 0``), or too few guesses for
    even an all-correct outcome to reject eps = 0 (e.g. fewer than 5 guesses at 95%, since
    ``2**-4 > 0.05``) -- there a 0 would look like evidence of privacy when it is only a lack of data.

    Args:
        guesses_correct: ``v``, number of correct guesses.
        guesses_made: ``r = k_plus + k_minus``, number of non-abstaining guesses.
        m: number of randomised canaries (only matters when ``delta > 0``).
        delta: the DP delta in [0, 1].
        confidence: in (0, 1); ``p = 1 - confidence`` is the test's significance.

    Returns:
        The epsilon lower bound (float; 0.0 or NaN as above).

    Example:
        >>> round(one_run_epsilon_bound(90, 100, 1000), 3)
        1.631
        >>> import numpy as np
        >>> bool(np.isnan(one_run_epsilon_bound(4, 4, 1000)))     # 4/4 correct still has p = 1/16
        True
    """
    v, r, m_ = _guess_counts(guesses_correct, guesses_made, m)
    d = _check_delta(delta)
    p = 1.0 - _check_confidence(confidence)
    if r == 0 or not _p_value(m_, r, r, 0.0, d) < p:
        return math.nan
    if not _p_value(m_, r, v, 0.0, d) < p:
        return 0.0
    # Same search as the reference: eps_lo = 0 stays put while eps_hi grows by 1, then bisection on
    # [0, eps_hi] (identical results when the p-value is monotone in eps, as it is in practice).
    lo, hi = 0.0, 1.0
    while _p_value(m_, r, v, hi, d) < p:  # terminates: p_value -> 1 as eps -> inf
        hi += 1.0
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        if _p_value(m_, r, v, mid, d) < p:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(
    scores: Any,
    included: Any,
    k_plus: int,
    k_minus: int,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> Dict[str, Any]:
    """One-training-run audit (Steinke, Nasr & Jagielski, NeurIPS 2023, Algorithm 1) on canary scores.

    The ``m = len(scores)`` canaries were each included in training by an independent fair coin
    (``included``).  The auditor guesses "in" for the ``k_plus`` highest scores, "out" for the
    ``k_minus`` lowest, and abstains on the rest; the bound is :func:`one_run_epsilon_bound` of the
    number of correct guesses out of ``r = k_plus + k_minus``.

    ``k_plus`` and ``k_minus`` are arguments, not tuned here: the paper's guarantee is for guess
    counts fixed before looking at the outcome (Algorithm 1 takes them as parameters).  Taking the
    best of several ``(k_plus, k_minus)`` on the same scores inflates the confidence; if you search a
    grid of ``g`` settings, run each at ``confidence = 1 - (1 - c) / g`` (Bonferroni) or choose the
    counts on a separate run.  Ties in ``scores`` are broken by position (stable sort); break them at
    random beforehand if they matter.

    Args:
        scores: (m,) finite canary scores, higher = more likely included.
        included: (m,) bool or 0/1, whether each canary was in the training set.
        k_plus: number of "in" guesses (``>= 0``).
        k_minus: number of "out" guesses (``>= 0``, ``k_plus + k_minus <= m``).
        delta: the DP delta in [0, 1].
        confidence: in (0, 1).

    Returns:
        dict with ``epsilon``, ``guesses_made``, ``guesses_correct``, ``precision`` (correct / made),
        ``m``, ``k_plus``, ``k_minus`` and ``reason`` (None unless ``epsilon`` is 0 or NaN).

    Example:
        >>> import numpy as np
        >>> inc = np.arange(1000) % 2 == 0
        >>> s = np.where(inc, 1.0, 0.0) + np.linspace(0, 0.5, 1000)   # perfectly separating
        >>> r = one_run_audit(s, inc, k_plus=50, k_minus=50)
        >>> r["guesses_correct"], round(r["epsilon"], 3)
        (100, 3.493)
    """
    s = np.asarray(scores)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.shape != s.shape:
        raise ValueError(f"scores and included must be 1-D of the same length, got {s.shape} and {inc.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if inc.dtype != bool:
        if not np.issubdtype(inc.dtype, np.number) or not np.all(np.isin(inc, (0, 1))):
            raise ValueError("included must be boolean or 0/1")
        inc = inc.astype(bool)
    m = int(s.size)
    kp = _as_int(k_plus, "k_plus")
    km = _as_int(k_minus, "k_minus")
    if kp < 0 or km < 0 or kp + km > m:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={m}, got {kp}, {km}")
    order = np.argsort(-s, kind="stable")  # descending; ties by position
    guess_in = order[:kp]
    guess_out = order[m - km:] if km > 0 else order[:0]
    correct = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
    r = kp + km
    eps = one_run_epsilon_bound(correct, r, m, delta, confidence)
    reason = None
    if math.isnan(eps):
        reason = (
            "no guesses made" if r == 0 else
            f"too few guesses: even {r}/{r} correct would not reject eps = 0 at confidence {confidence:g}"
        )
    elif eps == 0.0:
        reason = f"{correct}/{r} correct guesses do not reject eps = 0 at confidence {confidence:g}"
    return {
        "epsilon": eps,
        "guesses_made": r,
        "guesses_correct": correct,
        "precision": correct / r if r else math.nan,
        "m": m,
        "k_plus": kp,
        "k_minus": km,
        "reason": reason,
    }
