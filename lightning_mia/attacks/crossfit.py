"""Cross-fitted attack scores: every row scored by an attack model that never saw it.

A learned attack (logistic regression, MLP, boosted trees on per-example features) that is fitted and
scored on the same audit pool reports its own memorisation of the pool, not the target model's
leakage.  Cross-fitting -- K-fold sample splitting, as in the cross-fitting of Chernozhukov et al.
(Econometrics J. 2018, "double/debiased machine learning", Sec. 3) -- gives every row an
out-of-fold score so the whole pool can still be used both to train the attack and to evaluate it.

Example:
    >>> import numpy as np
    >>> from lightning_mia.attacks.crossfit import crossfit_scores
    >>> X = np.arange(20.0)[:, None]
    >>> y = np.arange(20) % 2 == 0
    >>> mean_gap = lambda Xt, yt, Xe: Xe[:, 0] - Xt[yt == 1, 0].mean()
    >>> s, fold = crossfit_scores(X, y, mean_gap, folds=4, seed=0)
    >>> sorted(np.bincount(fold).tolist()), bool(np.isfinite(s).all())
    ([5, 5, 5, 5], True)
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np

__all__ = ["crossfit_scores", "stratified_folds"]

FitScore = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


def stratified_folds(groups: np.ndarray, folds: int, seed: Optional[int] = 0) -> np.ndarray:
    """Seeded stratified fold ids: each group is shuffled and dealt round-robin over the folds.

    Groups are dealt in increasing code order and the dealing *continues* across groups (group
    ``g`` starts at the fold after the last one used by the previous group), so the rows of any run of
    consecutive codes form one contiguous stretch of the round-robin cycle.  Hence the fold sizes
    differ by at most one within every group (the stratification property of sklearn's
    ``StratifiedKFold``), within every run of consecutive codes, and in total.

    Args:
        groups: ``(n,)`` integer group codes (e.g. membership x strata).
        folds: number of folds, ``>= 2``.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(n,)`` int64 fold ids in ``[0, folds)``.

    Example:
        >>> f = stratified_folds(np.array([0, 0, 0, 1, 1, 1, 1]), folds=2, seed=1)
        >>> sorted(np.bincount(f[:3], minlength=2).tolist()), np.bincount(f[3:], minlength=2).tolist()
        ([1, 2], [2, 2])
    """
    g = np.asarray(groups)
    rng = np.random.default_rng(seed)
    fold = np.empty(g.size, dtype=np.int64)
    offset = 0
    for code in np.unique(g):
        idx = np.flatnonzero(g == code)
        idx = idx[rng.permutation(idx.size)]
        fold[idx] = (offset + np.arange(idx.size)) % folds
        offset += idx.size
    return fold


def crossfit_scores(
    X: Any,
    is_member: Any,
    fit_score: FitScore,
    folds: int = 5,
    seed: Optional[int] = 0,
    strata: Optional[Any] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Out-of-fold attack scores by stratified K-fold cross-fitting.

    Rows are split into ``folds`` folds stratified by membership -- and by ``strata`` (e.g. the
    true class, or the epoch at which a row was audited) when given, i.e. by every (membership,
    stratum) pair -- with a seeded shuffle (:func:`stratified_folds`).  For each fold ``f``,
    ``fit_score(X[train], y[train], X[fold f])`` fits an attack on the other folds and scores fold
    ``f``, so any attack plugs in.  ``y`` is passed as int64 0/1 (member = 1).

    Rows with any non-finite feature are neither used for fitting nor scored: their score is NaN
    and their fold id -1.

    Args:
        X: ``(n,)`` or ``(n, ...)`` attack features, one row per audited example.
        is_member: ``(n,)`` bool or 0/1 membership labels.
        fit_score: ``fit_score(X_train, y_train, X_eval) -> (len(X_eval),)`` real scores, higher =
            more likely member.
        folds: number of folds, ``>= 2``; each membership class needs at least ``folds`` finite
            rows, so every evaluation fold holds both classes and every training split does too.
        seed: seed of the fold shuffle.
        strata: optional ``(n,)`` labels to stratify on as well.

    Returns:
        ``(scores, fold_ids)``: ``(n,)`` float64 out-of-fold scores (NaN for dropped rows) and
        ``(n,)`` int64 fold ids (-1 for dropped rows).

    Raises:
        ValueError: on mismatched shapes, non-binary labels, ``folds < 2``, too few rows of a class,
            or a ``fit_score`` that returns the wrong number of scores.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(40, 2)); X[3, 1] = np.nan
        >>> y = np.arange(40) % 2
        >>> s, f = crossfit_scores(X, y, lambda Xt, yt, Xe: Xe @ np.ones(2), folds=3)
        >>> bool(np.isnan(s[3])), int(f[3]), int(np.isfinite(s).sum())
        (True, -1, 39)
    """
    x = np.asarray(X)
    if x.ndim < 1:
        raise ValueError("X must have one row per example")
    n = x.shape[0]
    y = np.asarray(is_member)
    if y.shape != (n,):
        raise ValueError(f"is_member must have shape ({n},), got {y.shape}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isin(y, (0, 1))):
            raise ValueError("is_member must be boolean or 0/1")
    y = y.astype(bool)
    if not callable(fit_score):
        raise ValueError("fit_score must be callable: fit_score(X_train, y_train, X_eval) -> scores")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if strata is not None:
        st = np.asarray(strata)
        if st.shape != (n,):
            raise ValueError(f"strata must have shape ({n},), got {st.shape}")
        _, st_code = np.unique(st, return_inverse=True)
        st_code = st_code.reshape(n)
    else:
        st_code = np.zeros(n, dtype=np.int64)
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"X must be real-valued, got dtype {x.dtype}")
    finite = np.isfinite(x.reshape(n, -1)).all(axis=1) if n else np.zeros(0, bool)

    n_mem = int((y & finite).sum())
    n_non = int((~y & finite).sum())
    if min(n_mem, n_non) < folds:
        raise ValueError(
            f"each class needs at least folds={folds} rows with finite features, "
            f"got {n_mem} members and {n_non} non-members"
        )

    scores = np.full(n, np.nan)
    fold_ids = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(finite)
    # group code = membership * n_strata + stratum: stratify on both at once.  Codes of one
    # membership class are consecutive, so each class is dealt as one contiguous stretch of the
    # cycle and every fold gets floor or ceil of (class size / folds) rows of it -- at least one,
    # as each class has >= folds rows.  (Interleaving (stratum, class) codes instead could send
    # every member of several small strata to the same fold.)
    n_strata = int(st_code.max()) + 1 if n else 1
    groups = y[rows].astype(np.int64) * n_strata + st_code[rows]
    fold_ids[rows] = stratified_folds(groups, folds, seed)
    y_int = y.astype(np.int64)
    for f in range(folds):
        ev = rows[fold_ids[rows] == f]
        tr = rows[fold_ids[rows] != f]
        out = np.asarray(fit_score(x[tr], y_int[tr], x[ev]), dtype=np.float64)
        if out.shape != (ev.size,):
            out = out.reshape(-1) if out.size == ev.size else out
            if out.shape != (ev.size,):
                raise ValueError(f"fit_score returned {np.shape(out)} scores for {ev.size} evaluation rows")
        scores[ev] = out
    return scores, fold_ids
