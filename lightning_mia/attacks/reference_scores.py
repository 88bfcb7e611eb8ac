"""Reference-model membership scores (LiRA, RMIA): pure numpy/scipy, scores only.

The reference ("shadow") models are trained elsewhere; these functions take their outputs on the
audited examples and return one attack score per example.  Conventions: **higher score = more
likely member**; an example whose score is undefined (no IN reference for an online attack, no OUT
reference, missing inputs) gets NaN -- never a made-up value.

* :func:`logit_scaled_confidence` -- LiRA's per-example statistic
  ``phi = log p_y - log sum_{j != y} p_j`` (Carlini et al., S&P 2022, "logit scaling" of the
  confidence, Sec. IV; their ``research/mi_lira_2021/score.py``).
* :func:`lira_scores` -- the Likelihood Ratio Attack, online and offline, per-example or fixed
  variance (Carlini et al. 2022, Algorithm 1; reference code ``generate_ours`` and
  ``generate_ours_offline`` in ``tensorflow/privacy`` ``research/mi_lira_2021/plot.py``).
* :func:`rmia_scores` -- the Relative Membership Inference Attack (Zarifzadeh, Liu, Cheng & Shokri,
  ICML 2024, "Low-Cost High-Power Membership Inference Attacks"; reference code ``run_rmia`` in
  ``privacytrustlab/ml_privacy_meter`` ``attacks.py`` and ``modules/mia/attacks/rmia.py``).

Example:
    >>> import numpy as np
    >>> from lightning_mia.attacks.reference_scores import lira_scores
    >>> ref = np.array([[2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [0.0, 4.0], [1.0, 5.0], [2.0, 6.0]])
    >>> ref_in = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], bool)
    >>> s = lira_scores(np.array([3.0, 1.0]), ref, ref_in)   # example 0 looks IN, example 1 OUT
    >>> bool(s[0] > 0 > s[1])
    True
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
from scipy import stats
from scipy.special import logsumexp

__all__ = ["logit_scaled_confidence", "lira_scores", "rmia_scores"]

_CENTERS = ("median", "mean")
_OFFLINE_TESTS = ("one_sided", "neg_logpdf")


def _real_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    return a.astype(np.float64)


def _bool_mask(x: Any, name: str, shape: tuple) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isin(a, (0, 1))):
            raise ValueError(f"{name} must be boolean or 0/1")
        a = a.astype(bool)
    return a


# --------------------------------------------------------------------------------------------------
# logit-scaled confidence
# --------------------------------------------------------------------------------------------------
def logit_scaled_confidence(probs_or_logits: Any, labels: Any, from_logits: bool = True) -> np.ndarray:
    """LiRA's logit-scaled confidence ``phi = log p_y - log(sum_{j != y} p_j)``.

    Carlini et al. (S&P 2022, Sec. IV) apply ``phi(p) = log(p / (1 - p))`` to the true-class
    probability so that the per-example confidence distributions are close to Gaussian; their
    ``score.py`` computes ``1 - p_y`` as the *sum of the other classes' probabilities*, which is what
    is done here.  From logits ``z`` this is exactly ``z_y - logsumexp_{j != y} z_j`` (the softmax
    normaliser cancels), evaluated in float64 with ``scipy.special.logsumexp`` -- stable even when
    ``p_y`` rounds to 1 in floating point, where ``log(1 - p_y)`` would be ``-inf``.

    Args:
        probs_or_logits: ``(..., C)`` logits (default) or probabilities, ``C >= 2`` classes.
        labels: integer true labels, broadcastable (numpy rules) to ``probs_or_logits.shape[:-1]``,
            e.g. ``labels[:, None]`` for ``(n, q, C)`` inputs with ``q`` augmented queries per example.
        from_logits: ``True`` if the last axis holds logits, ``False`` for probabilities in [0, 1].

    Returns:
        float64 array of shape ``probs_or_logits.shape[:-1]``.  Rows containing a non-finite logit or
        probability are NaN.  From probabilities, ``p_y = 0`` gives ``-inf`` and ``sum_{j != y} p_j
        = 0`` gives ``+inf`` (the exact value of the formula; pass logits to avoid it).

    Raises:
        ValueError: on a non-numeric input, fewer than 2 classes, labels out of range or not
            broadcastable, or probabilities outside [0, 1].

    Example:
        >>> import numpy as np
        >>> z = np.array([[2.0, 0.0, 0.0], [0.0, 50.0, -50.0]])
        >>> logit_scaled_confidence(z, np.array([0, 1])).round(4).tolist()
        [1.3069, 50.0]
        >>> p = np.exp(z[:1]) / np.exp(z[:1]).sum()
        >>> round(float(logit_scaled_confidence(p, [0], from_logits=False)[0]), 4)
        1.3069
    """
    x = _real_array(probs_or_logits, "probs_or_logits")
    if x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"probs_or_logits needs a last axis of >= 2 classes, got shape {x.shape}")
    lab = np.asarray(labels)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.number):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
        raise ValueError("labels must be whole numbers")
    lead = x.shape[:-1]
    try:
        lab = np.broadcast_to(lab.astype(np.int64), lead)
    except ValueError:
        raise ValueError(f"labels of shape {np.shape(labels)} do not broadcast to {lead}") from None
    n_cls = x.shape[-1]
    if np.any(lab < 0) or np.any(lab >= n_cls):
        raise ValueError(f"labels must be in [0, {n_cls}), got range [{lab.min()}, {lab.max()}]")
    bad_row = ~np.all(np.isfinite(x), axis=-1)
    if not from_logits:
        finite = x[np.isfinite(x)]
        if np.any(finite < 0) or np.any(finite > 1):
            raise ValueError("probabilities must lie in [0, 1] (pass from_logits=True for logits)")
    onehot = np.arange(n_cls) == lab[..., None]
    xs = np.where(bad_row[..., None], 0.0, x)  # placeholder values; those rows become NaN below
    target = np.take_along_axis(xs, lab[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        if from_logits:
            rest = logsumexp(np.where(onehot, -np.inf, xs), axis=-1)
            phi = target - rest
        else:
            rest = np.sum(np.where(onehot, 0.0, xs), axis=-1)
            phi = np.log(target) - np.log(rest)
    return np.where(bad_row, np.nan, phi)


# --------------------------------------------------------------------------------------------------
# LiRA
# --------------------------------------------------------------------------------------------------
def _group_stats(values: np.ndarray, mask: np.ndarray, center: str):
    """Per-example (and per-query) location and population std of the references in ``mask``.

    ``values``: (K, n, q); ``mask``: (K, n).  Non-finite reference values count as missing.
    Returns (loc, std, count) with shapes (n, q), (n, q), (n, q).
    """
    sel = mask[:, :, None] & np.isfinite(values)
    v = np.where(sel, values, np.nan)
    count = sel.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, handled by count
        loc = np.nanmedian(v, axis=0) if center == "median" else np.nanmean(v, axis=0)
        std = np.nanstd(v, axis=0)  # ddof=0, as np.std in the reference code
    return loc, std, count, v


def lira_scores(
    target_phi: Any,
    ref_phi: Any,
    ref_in: Any,
    online: bool = True,
    fix_variance: bool = False,
    center: str = "median",
    offline_test: str = "one_sided",
) -> np.ndarray:
    """LiRA membership scores from reference-model confidences (Carlini et al., S&P 2022).

    For every example ``x`` (and every augmented query, fitted separately) fit Gaussians to the
    reference models' logit-scaled confidences: ``N(mu_in, sd_in)`` over the references trained on
    ``x`` and ``N(mu_out, sd_out)`` over those that were not (Algorithm 1).  Then

    * **online**: ``score = mean_q [log N(phi_q; mu_in, sd_in) - log N(phi_q; mu_out, sd_out)]`` --
      the log likelihood ratio of Algorithm 1 (online); identical to ``generate_ours`` in
      ``research/mi_lira_2021/plot.py``, which computes ``-logpdf_in + logpdf_out`` with
      ``scipy.stats.norm.logpdf`` and ranks by its negative, and averages over queries (``.mean(1)``);
    * **offline** (``offline_test="one_sided"``, default): ``score = mean_q [-log Pr(Z > phi_q)]``,
      ``Z ~ N(mu_out, sd_out)`` (``-norm.logsf``) -- the paper's one-sided test (Algorithm 1,
      offline: ``Lambda = 1 - Pr[Z > conf_obs]``; for one query ``-log Pr(Z > phi)`` is a monotone
      transform of ``Lambda``, with more resolution in the tail);
    * **offline** (``offline_test="neg_logpdf"``): ``score = mean_q [-log N(phi_q; mu_out, sd_out)]``,
      which is what the reference code's ``generate_ours_offline`` actually ranks by (it returns
      ``norm.logpdf`` and the ROC uses its negative).  This is a *two-sided* test: unusually *low*
      confidences also score as members.  Offered to reproduce the repository's numbers.

    **Estimators.** ``center="median"`` (default) uses the per-example median of the references, as
    the reference code does (``np.median(dat_in, 1)``); ``center="mean"`` uses the mean, as written in
    Algorithm 1.  Standard deviations are population (``ddof=0``) standard deviations, as ``np.std``.
    ``fix_variance=True`` replaces the per-example std by one global std per group: the std of *all*
    IN values (all examples, references and queries) for ``sd_in``, of all OUT values for ``sd_out``
    (the paper's "fixed variance" variant; ``np.std(dat_in)`` in the code).  The reference code's online
    fixed-variance branch sets ``std_out = np.std(dat_in)`` -- the IN values -- which looks like a typo
    (its offline branch uses ``np.std(dat_out)``); here ``sd_out`` comes from the OUT values.
    The reference code truncates every example to the same number of IN/OUT references (the minimum
    over examples); here every available reference is used.

    **Undefined (NaN).** Non-finite ``target_phi``; fewer than 1 IN (online only) or 1 OUT reference;
    with per-example variance, fewer than 2 references in a group or a zero std (the reference code
    adds ``1e-30`` to the std, turning this into ``+-inf``).  Non-finite reference values are ignored.

    Args:
        target_phi: ``(n,)`` or ``(n, q)`` target-model confidences (e.g. :func:`logit_scaled_confidence`).
        ref_phi: ``(K, n)`` or ``(K, n, q)`` the same statistic from ``K`` reference models.
        ref_in: ``(K, n)`` bool, ``ref_in[k, i]`` = example ``i`` was in reference ``k``'s training set.
        online: use IN and OUT references (True) or OUT only (False).
        fix_variance: one global std per group instead of per-example stds.
        center: ``"median"`` (reference code) or ``"mean"`` (paper).
        offline_test: ``"one_sided"`` (paper) or ``"neg_logpdf"`` (reference code); offline only.

    Returns:
        ``(n,)`` float64 scores, higher = more likely member, NaN where undefined.

    Example:
        >>> import numpy as np
        >>> ref = np.array([[1.0], [2.0], [3.0], [5.0], [6.0], [7.0]])   # K = 6 references, n = 1
        >>> ref_in = np.array([[0], [0], [0], [1], [1], [1]], bool)
        >>> from scipy.stats import norm
        >>> sd = np.std([1.0, 2.0, 3.0])
        >>> float(lira_scores(np.array([4.0]), ref, ref_in)[0])          # equal distance: LR = 1
        0.0
        >>> s = lira_scores(np.array([4.0]), ref, ref_in, online=False)[0]
        >>> bool(np.isclose(s, -norm.logsf(4.0, 2.0, sd)))
        True
    """
    if center not in _CENTERS:
        raise ValueError(f"center must be one of {_CENTERS}, got {center!r}")
    if offline_test not in _OFFLINE_TESTS:
        raise ValueError(f"offline_test must be one of {_OFFLINE_TESTS}, got {offline_test!r}")
    t = _real_array(target_phi, "target_phi")
    r = _real_array(ref_phi, "ref_phi")
    if t.ndim not in (1, 2):
        raise ValueError(f"target_phi must be (n,) or (n, q), got shape {t.shape}")
    if t.ndim == 1:
        t = t[:, None]
        if r.ndim != 2:
            raise ValueError(f"ref_phi must be (K, n) for a (n,) target_phi, got shape {r.shape}")
        r = r[:, :, None]
    elif r.ndim != 3:
        raise ValueError(f"ref_phi must be (K, n, q) for a (n, q) target_phi, got shape {r.shape}")
    n, q = t.shape
    if r.shape[1:] != (n, q) or r.shape[0] < 1:
        raise ValueError(f"ref_phi shape {r.shape} does not match target_phi (n={n}, q={q}) with K >= 1")
    k = r.shape[0]
    m_in = _bool_mask(ref_in, "ref_in", (k, n))

    groups = [(~m_in, "out")] if not online else [(m_in, "in"), (~m_in, "out")]
    fitted = {}
    for mask, name in groups:
        loc, std, count, v = _group_stats(r, mask, center)
        if fix_variance:
            pooled = v[np.isfinite(v)]
            g = float(np.std(pooled)) if pooled.size >= 2 else np.nan
            std = np.full((n, q), g)
            ok = count >= 1
        else:
            ok = count >= 2
        ok = ok & (std > 0) & np.isfinite(std)
        fitted[name] = (np.where(ok, loc, np.nan), np.where(ok, std, np.nan))

    mu_out, sd_out = fitted["out"]
    with np.errstate(invalid="ignore", divide="ignore"):
        if online:
            mu_in, sd_in = fitted["in"]
            per_query = stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)
        elif offline_test == "one_sided":
            per_query = -stats.norm.logsf(t, mu_out, sd_out)
        else:
            per_query = -stats.norm.logpdf(t, mu_out, sd_out)
    per_query = np.where(np.isfinite(t), per_query, np.nan)
    # mean over augmented queries (generate_ours: score.mean(1)); any undefined query -> NaN
    return per_query.mean(axis=1)


# --------------------------------------------------------------------------------------------------
# RMIA
# --------------------------------------------------------------------------------------------------
def rmia_scores(
    target_p_x: Any,
    ref_p_x: Any,
    target_p_z: Any,
    ref_p_z: Any,
    ref_in_x: Optional[Any] = None,
    a: float = 0.3,
    gamma: float = 1.0,
    online: bool = False,
) -> np.ndarray:
    """RMIA scores (Zarifzadeh et al., ICML 2024) from true-label probabilities.

    ``p(x | theta)`` is the model's probability of the true label of ``x``.  RMIA compares each
    audited example ``x`` with population samples ``z`` (never trained on by the target) through the
    pairwise likelihood ratio

        ``LR(x, z) = [p(x | theta) / p(x)] / [p(z | theta) / p(z)]``   (paper Eq. for LR_theta(x, z))

    and scores ``x`` by the fraction of population samples it dominates,
    ``score(x) = (1/m) sum_z 1[LR(x, z) > gamma]`` (the paper writes ``Pr_z(LR >= gamma)``; the
    strict ``>`` follows the reference code, ``np.average(ratios > 1.0, axis=1)`` / ``score > gamma``).
    ``p(x)``, the probability of ``x`` under models trained without knowing whether ``x`` is in, is
    estimated from reference models:

    * **online**: ``p(x) = (P_IN(x) + P_OUT(x)) / 2``, the means over the IN and OUT references of
      ``x`` (ML Privacy Meter ``documentation/mia.md``: ``P(x) = 0.5 P_IN + 0.5 P_OUT``; the research
      code ``research/2024_rmia/main.py`` takes equally many IN and OUT references and averages them).
      Needs ``ref_in_x``; an example without an IN or an OUT reference gets NaN.
    * **offline**: only OUT references, with ``P_IN`` approximated by ``a * P_OUT + (1 - a)``, so
      ``p(x) = ((1 + a) P_OUT(x) + (1 - a)) / 2`` -- exactly ``mean_x = (1 + offline_a) / 2 *
      mean_out_x + (1 - offline_a) / 2`` in ML Privacy Meter's ``run_rmia``.  ``ref_in_x=None`` means no
      reference was trained on ``x``.  ``a`` defaults to 0.3, the default ``offline_a`` of
      ``modules/mia/attacks/rmia.py`` and of the paper's CIFAR-10 configs; the authors tune it on a
      reference model (``tune_offline_a``: grid 0, 0.1, ..., 1 by AUC).

    ``p(z)`` is the mean over all ``K`` references (population samples are OUT for every reference,
    as ``run_rmia`` assumes with ``population_memberships = zeros``), with the same ``a`` correction in
    offline mode (as ``run_rmia`` applies to ``mean_z``).  Since ``score(x)`` is the empirical CDF of
    the ``z`` ratios evaluated at ``x``'s ratio over ``gamma``, the *ranking* of the ``x`` (hence AUC
    and TPR at any FPR) depends on ``p(z)`` only through ties.

    Not included: the research code's trimmed means over references, augmented-query majority voting
    and top-k nearest population samples.

    **Semantics of degenerate ratios** follow IEEE arithmetic, as in the reference double loop: a
    population sample with ``p(z | theta) / p(z)`` infinite or undefined is never dominated.  ``x``
    gets NaN when its own inputs are missing (NaN) or its ratio is ``0/0`` / has no usable reference.

    Args:
        target_p_x: ``(n,)`` target-model true-label probabilities of the audited examples.
        ref_p_x: ``(K, n)`` the same from ``K`` reference models (NaN entries are ignored).
        target_p_z: ``(m,)`` target-model true-label probabilities of population samples.
        ref_p_z: ``(K, m)`` the same from the reference models (must be finite).
        ref_in_x: ``(K, n)`` bool membership of ``x`` in each reference, or None (all OUT; offline only).
        a: offline coefficient in [0, 1].
        gamma: likelihood-ratio threshold, ``> 0`` (paper default 1).
        online: online (IN and OUT references) or offline (OUT only).

    Returns:
        ``(n,)`` float64 scores in [0, 1], higher = more likely member, NaN where undefined.

    Example:
        >>> import numpy as np
        >>> ref_x = np.array([[0.5, 0.5], [0.5, 0.5]])
        >>> ref_z = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
        >>> rmia_scores(np.array([0.9, 0.2]), ref_x, np.array([0.3, 0.6, 0.8]), ref_z, a=1.0).tolist()
        [1.0, 0.0]
    """
    px = _real_array(target_p_x, "target_p_x")
    rx = _real_array(ref_p_x, "ref_p_x")
    pz = _real_array(target_p_z, "target_p_z")
    rz = _real_array(ref_p_z, "ref_p_z")
    if px.ndim != 1 or pz.ndim != 1:
        raise ValueError(f"target_p_x and target_p_z must be 1-D, got shapes {px.shape} and {pz.shape}")
    n, m = px.size, pz.size
    if m < 1:
        raise ValueError("need at least one population sample z")
    if rx.ndim != 2 or rx.shape[1] != n or rx.shape[0] < 1:
        raise ValueError(f"ref_p_x must be (K, n={n}) with K >= 1, got shape {rx.shape}")
    k = rx.shape[0]
    if rz.shape != (k, m):
        raise ValueError(f"ref_p_z must be (K={k}, m={m}), got shape {rz.shape}")
    for arr, name in ((px, "target_p_x"), (rx, "ref_p_x"), (pz, "target_p_z"), (rz, "ref_p_z")):
        fin = arr[np.isfinite(arr)]
        if np.any(fin < 0) or np.any(fin > 1) or np.any(np.isinf(arr)):
            raise ValueError(f"{name} must hold probabilities in [0, 1]")
    if not (np.all(np.isfinite(pz)) and np.all(np.isfinite(rz))):
        raise ValueError("target_p_z and ref_p_z must be finite: the population defines the reference")
    try:
        a_ = float(a)
        g_ = float(gamma)
    except (TypeError, ValueError):
        raise ValueError("a and gamma must be numbers") from None
    if not (0.0 <= a_ <= 1.0):
        raise ValueError(f"a must be in [0, 1], got {a!r}")
    if not (np.isfinite(g_) and g_ > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    if online and ref_in_x is None:
        raise ValueError("online RMIA needs ref_in_x to separate IN and OUT references")
    m_in = np.zeros((k, n), bool) if ref_in_x is None else _bool_mask(ref_in_x, "ref_in_x", (k, n))

    fin = np.isfinite(rx)

    def _mean(mask: np.ndarray) -> np.ndarray:
        sel = mask & fin
        cnt = sel.sum(axis=0)
        tot = np.where(sel, rx, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)

    if online:
        p_x = 0.5 * (_mean(m_in) + _mean(~m_in))
        p_z = rz.mean(axis=0)
    else:
        p_x = 0.5 * ((1.0 + a_) * _mean(~m_in) + (1.0 - a_))
        p_z = 0.5 * ((1.0 + a_) * rz.mean(axis=0) + (1.0 - a_))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_x = px / p_x
        ratio_z = pz / p_z
    # LR(x, z) = ratio_x / ratio_z > gamma  <=>  ratio_z < ratio_x / gamma for finite ratio_z >= 0,
    # and is False (as in IEEE arithmetic) for infinite or NaN ratio_z; so count the finite ratio_z
    # strictly below ratio_x / gamma with one sort, instead of the n x m comparison matrix.
    zs = np.sort(ratio_z[np.isfinite(ratio_z)])
    thr = ratio_x / g_
    counts = np.searchsorted(zs, np.where(np.isnan(thr), 0.0, thr), side="left")
    return np.where(np.isnan(ratio_x), np.nan, counts / m)
