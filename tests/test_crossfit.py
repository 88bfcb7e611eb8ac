"""Tests for lightning_mia.attacks.crossfit: partition, stratification, equality with a manual
fold loop, NaN rows, and a pure-noise control that an in-sample fit would fail."""
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lightning_mia.attacks.crossfit import crossfit_scores, stratified_folds


def _logreg(Xt, yt, Xe):
    return LogisticRegression(max_iter=200).fit(Xt, yt).decision_function(Xe)


def _one_nn(Xt, yt, Xe):
    """A pure memoriser: the label of the nearest training row (ties impossible with normal data)."""
    d = ((Xe[:, None, :] - Xt[None, :, :]) ** 2).sum(-1)
    return yt[np.argmin(d, axis=1)].astype(float)


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, Xt, yt, Xe):
        self.calls.append((Xt.copy(), yt.copy(), Xe.copy()))
        return self.fn(Xt, yt, Xe)


def _data(seed, n=300, d=3, nan_rows=()):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    X[:, 0] = np.arange(n)                 # column 0 identifies the row
    y = rng.random(n) < 0.4
    for r in nan_rows:
        X[r, 1 + r % (d - 1)] = np.nan if r % 2 else np.inf
    return X, y


def test_partition_every_finite_row_scored_exactly_once_by_a_model_not_fitted_on_it():
    X, y = _data(0, nan_rows=(5, 17, 200))
    rec = _Recorder(lambda Xt, yt, Xe: Xe[:, 0] * 0.0 + len(Xt))
    s, fold = crossfit_scores(X, y, rec, folds=5, seed=3)
    finite = np.isfinite(X).all(1)
    assert len(rec.calls) == 5
    seen = np.concatenate([c[2][:, 0] for c in rec.calls]).astype(int)
    assert sorted(seen.tolist()) == np.flatnonzero(finite).tolist()          # each finite row once
    for Xt, yt, Xe in rec.calls:
        tr, ev = set(Xt[:, 0].astype(int)), set(Xe[:, 0].astype(int))
        assert not tr & ev                                                     # never fitted on itself
        assert tr | ev == set(np.flatnonzero(finite).tolist())                 # the rest is training
        assert np.array_equal(yt, y[Xt[:, 0].astype(int)].astype(int)) and yt.dtype == np.int64
        assert np.isfinite(Xt).all() and np.isfinite(Xe).all()
    assert np.isnan(s[~finite]).all() and (fold[~finite] == -1).all()
    assert np.isfinite(s[finite]).all() and set(fold[finite].tolist()) == set(range(5))


def test_equals_manual_loop_over_returned_folds():
    X, y = _data(1, nan_rows=(9,))
    s, fold = crossfit_scores(X, y, _logreg, folds=4, seed=7)
    manual = np.full(len(y), np.nan)
    for f in range(4):
        tr, ev = fold >= 0, fold == f
        tr &= ~ev
        manual[ev] = _logreg(X[tr], y[tr].astype(int), X[ev])
    assert np.allclose(s, manual, equal_nan=True)


@pytest.mark.parametrize("folds", [2, 3, 5, 10])
def test_stratification_by_membership_and_strata(folds):
    rng = np.random.default_rng(folds)
    n = 403
    X = rng.normal(size=(n, 2))
    y = rng.random(n) < 0.3
    strata = rng.integers(0, 7, size=n)
    _, fold = crossfit_scores(X, y, lambda Xt, yt, Xe: np.zeros(len(Xe)), folds=folds, seed=1, strata=strata)
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for cls in (False, True):
        c = np.bincount(fold[y == cls], minlength=folds)
        assert c.max() - c.min() <= 1 and c.min() >= 1
        for g in range(7):
            cg = np.bincount(fold[(y == cls) & (strata == g)], minlength=folds)
            assert cg.max() - cg.min() <= 1                                     # StratifiedKFold property


def test_many_tiny_strata_still_give_both_classes_in_every_fold():
    # One member and one non-member per stratum: interleaved dealing would send all members to one
    # fold; every training split and every evaluation fold must still hold both classes.
    n_strata, folds = 10, 2
    strata = np.repeat(np.arange(n_strata), 2)
    y = np.tile([False, True], n_strata)
    X = np.random.default_rng(0).normal(size=(2 * n_strata, 2))
    rec = _Recorder(lambda Xt, yt, Xe: np.zeros(len(Xe)))
    _, fold = crossfit_scores(X, y, rec, folds=folds, seed=0, strata=strata)
    for Xt, yt, Xe in rec.calls:
        assert set(yt.tolist()) == {0, 1}
    for f in range(folds):
        assert set(y[fold == f].tolist()) == {False, True}


def test_seeding_is_reproducible_and_seed_dependent():
    X, y = _data(2)
    f = lambda Xt, yt, Xe: Xe[:, 1]  # noqa: E731
    a = crossfit_scores(X, y, f, seed=5)[1]
    assert np.array_equal(a, crossfit_scores(X, y, f, seed=5)[1])
    assert not np.array_equal(a, crossfit_scores(X, y, f, seed=6)[1])
    g = np.r_[np.zeros(50, int), np.ones(30, int)]
    assert np.array_equal(stratified_folds(g, 4, seed=1), stratified_folds(g, 4, seed=1))


def test_pure_noise_control_auc_is_chance_while_in_sample_is_not():
    rng = np.random.default_rng(123)
    n = 1000
    X = rng.normal(size=(n, 5))
    y = rng.random(n) < 0.5
    sd = math.sqrt((n + 1) / (12 * y.sum() * (~y).sum()))
    in_sample = _one_nn(X, y.astype(int), X)             # memorises: AUC = 1 on pure noise
    assert roc_auc_score(y, in_sample) == 1.0
    for fit in (_one_nn, _logreg):
        s, _ = crossfit_scores(X, y, fit, folds=5, seed=0)
        assert abs(roc_auc_score(y, s) - 0.5) < 3 * sd


def test_one_dimensional_features_and_column_output_are_accepted():
    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    x[3] = np.nan
    y = np.arange(60) % 3 == 0
    s, fold = crossfit_scores(x, y, lambda Xt, yt, Xe: (Xe - Xt[yt == 0].mean())[:, None], folds=3)
    assert s.shape == (60,) and np.isnan(s[3]) and fold[3] == -1 and np.isfinite(np.delete(s, 3)).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"folds": 1},
        {"folds": 2.0},
        {"folds": True},
        {"fit_score": lambda Xt, yt, Xe: np.zeros(len(Xe) + 1)},
        {"fit_score": "logreg"},
        {"is_member": np.full(40, 2)},
        {"is_member": np.zeros(39, bool)},
        {"strata": np.zeros(39)},
        {"folds": 25},                      # 20 rows per class < 25 folds
        {"X": np.array([["a"]] * 40)},
    ],
)
def test_rejects_bad_input(kw):
    args = dict(X=np.random.default_rng(0).normal(size=(40, 2)), is_member=np.arange(40) % 2 == 0,
                fit_score=lambda Xt, yt, Xe: np.zeros(len(Xe)), folds=3)
    args.update(kw)
    with pytest.raises(ValueError):
        crossfit_scores(**args)
