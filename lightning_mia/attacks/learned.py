"""Learned attacks: logistic regression, MLP, random forest and XGBoost (scikit-learn / xgboost).

Scores are the predicted member probability; ``predict`` is ``probability >= 0.5``.  Random forest
and XGBoost can run a seeded randomised hyper-parameter search on the attack's training split
(``search_iter > 0``), scored by balanced accuracy with stratified folds; it is off by default
because the audit refits attacks every few epochs.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from lightning_mia.attacks.base import ATTACKS, Attack, check_choice, check_int
from lightning_mia.threads import blas_limits

__all__ = [
    "LogisticRegressionAttack",
    "MLPAttack",
    "RandomForestAttack",
    "XGBoostAttack",
    "RF_SEARCH_SPACE",
    "XGB_SEARCH_SPACE",
]


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _check_n_jobs(name: str, value: Any) -> int:
    """sklearn/xgboost's worker count: a positive int or -1 (all cores)."""
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        raise ValueError(f"{name} must be a positive int or -1, got {value!r}")
    return value


def _check_blas_threads(value: Any) -> Optional[int]:
    if value is None:
        return None
    return check_int("blas_threads", value, 1)


class _ProbaAttack(Attack):
    """Shared plumbing: optional standardisation, probability score, quiet fixed-budget training.

    ``blas_threads`` caps the BLAS threads while fitting/scoring (``None`` = library default).  The
    attack matrices are small, and multi-threaded OpenBLAS on a busy 2-core machine made the MLP
    ~10x slower (measured: 14 s vs 1.2 s for 8k x 10 rows), so the default is 1; it also leaves no
    OpenBLAS worker busy-waiting after the fit (:mod:`lightning_mia.threads`).
    """

    def __init__(self, standardize: bool, seed: int, blas_threads: Optional[int] = 1) -> None:
        super().__init__(seed=seed)
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize must be True or False, got {standardize!r}")
        self.standardize = standardize
        self.blas_threads = _check_blas_threads(blas_threads)
        self.scaler_ = None
        self.model_ = None

    def _prepare(self, X: np.ndarray, fit: bool) -> np.ndarray:
        if not self.standardize:
            return X
        if fit:
            from sklearn.preprocessing import StandardScaler

            self.scaler_ = StandardScaler().fit(X)
        return self.scaler_.transform(X)

    def _blas(self):
        # one cached controller, and safe when Auditor(n_jobs > 1) fits attacks in overlapping threads
        return blas_limits(self.blas_threads)

    def _fit(self, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]) -> None:
        Xs = self._prepare(X, fit=True)
        model = self._make_model()
        with warnings.catch_warnings(), self._blas():
            # Fixed iteration budgets are deliberate (cheap per-epoch refits): do not spam warnings.
            from sklearn.exceptions import ConvergenceWarning

            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_ = self._fit_model(model, Xs, y.astype(np.int64), sample_weight)

    def _fit_model(self, model, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]):
        if sample_weight is None:
            return model.fit(X, y)
        return model.fit(X, y, sample_weight=sample_weight)

    def _score(self, X: np.ndarray) -> np.ndarray:
        with self._blas():
            proba = self.model_.predict_proba(self._prepare(X, fit=False))
        col = int(np.flatnonzero(np.asarray(self.model_.classes_) == 1)[0])
        return proba[:, col].astype(np.float64)

    def _make_model(self):
        raise NotImplementedError


@ATTACKS.register("logistic_regression")
class LogisticRegressionAttack(_ProbaAttack):
    """Standardised features + L2 logistic regression.

    Args:
        C: inverse regularisation strength.
        class_weight: ``None`` or ``"balanced"`` (the authors' choice for distance / gradient features).
        max_iter: L-BFGS iterations.
        standardize: z-score features with statistics of the training rows.
        blas_threads: BLAS thread cap while fitting/scoring (``None`` = library default).
        seed: random state.

    Example:
        >>> from lightning_mia.attacks import build_attack
        >>> build_attack({"name": "logistic_regression", "class_weight": "balanced"}).class_weight
        'balanced'
    """

    name = "logistic_regression"

    def __init__(
        self,
        C: float = 1.0,
        class_weight: Optional[str] = None,
        max_iter: int = 200,
        standardize: bool = True,
        blas_threads: Optional[int] = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(standardize=standardize, seed=seed, blas_threads=blas_threads)
        self.C = _check_positive("C", C)
        self.class_weight = check_choice("class_weight", class_weight, (None, "balanced"))
        self.max_iter = check_int("max_iter", max_iter, 1)

    def _make_model(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(
            C=self.C, class_weight=self.class_weight, max_iter=self.max_iter, random_state=self.seed
        )


@ATTACKS.register("mlp")
class MLPAttack(_ProbaAttack):
    """Fully connected network with hidden layers (128, 64), ReLU, Adam (sklearn ``MLPClassifier``).

    Rezaei & Liu (2021, Sec. 5): "a model with 2 hidden layers of size 128 and 64"; the authors'
    Keras model trains 30 epochs with batch size 32 and Adam (lr 1e-3).  The live default uses a
    larger batch (256) so a refit every epoch stays cheap; the paper preset sets 32.

    Args:
        hidden_layer_sizes: widths of the hidden layers.
        max_iter: epochs (passes over the data).
        batch_size: mini-batch size (clipped to the number of rows by sklearn).
        learning_rate_init: Adam step size.
        alpha: L2 penalty (sklearn default 1e-4; Keras default, used by the paper preset, is 0).
        n_iter_no_change: stop after this many epochs without loss improvement (``None``: run all
            ``max_iter`` epochs, like Keras' ``fit(epochs=...)``).
        standardize: z-score features with statistics of the training rows.
        blas_threads: BLAS thread cap while fitting/scoring (``None`` = library default).
        seed: initialisation and shuffling seed.

    Example:
        >>> from lightning_mia.attacks import MLPAttack
        >>> MLPAttack(max_iter=5).hidden_layer_sizes
        (128, 64)
    """

    name = "mlp"

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int] = (128, 64),
        max_iter: int = 30,
        batch_size: int = 256,
        learning_rate_init: float = 1e-3,
        alpha: float = 1e-4,
        n_iter_no_change: Optional[int] = 10,
        standardize: bool = True,
        blas_threads: Optional[int] = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(standardize=standardize, seed=seed, blas_threads=blas_threads)
        sizes = tuple(hidden_layer_sizes) if isinstance(hidden_layer_sizes, (list, tuple)) else None
        if not sizes or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in sizes):
            raise ValueError(f"hidden_layer_sizes must be a non-empty list of positive ints, got {hidden_layer_sizes!r}")
        self.hidden_layer_sizes = tuple(int(h) for h in sizes)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.learning_rate_init = _check_positive("learning_rate_init", learning_rate_init)
        self.alpha = _check_nonneg("alpha", alpha)
        self.n_iter_no_change = None if n_iter_no_change is None else check_int("n_iter_no_change", n_iter_no_change, 1)

    def _make_model(self):
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier(
            hidden_layer_sizes=self.hidden_layer_sizes,
            activation="relu",
            solver="adam",
            alpha=self.alpha,
            batch_size=self.batch_size,
            learning_rate_init=self.learning_rate_init,
            max_iter=self.max_iter,
            shuffle=True,
            random_state=self.seed,
            early_stopping=False,
            # More patience than epochs = always run max_iter epochs.
            n_iter_no_change=self.max_iter + 1 if self.n_iter_no_change is None else self.n_iter_no_change,
        )

    def _fit_model(self, model, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]):
        model.set_params(batch_size=min(self.batch_size, X.shape[0]))  # sklearn would clip with a warning
        return super()._fit_model(model, X, y, sample_weight)


# Live search spaces: small enough for per-epoch refits on 2 cores.
RF_SEARCH_SPACE: Dict[str, list] = {
    "n_estimators": [50, 100, 200],
    "max_depth": [5, 10, 20, None],
    "min_samples_split": [2, 5, 10],
    "min_samples_leaf": [1, 2, 5, 10],
    "max_features": ["sqrt", None],
}
# Same axes as the authors' XGBoost grid (shrezaei/MI-Attack, attacks/confidence_based_attack.py) without
# their scale_pos_weight axis, which only shifts the operating point on a balanced training set.
XGB_SEARCH_SPACE: Dict[str, list] = {
    "min_child_weight": [1, 5, 10, 15],
    "subsample": [0.6, 0.8, 1.0],
    "colsample_bytree": [0.6, 0.8, 1.0],
    "max_depth": [3, 6, 9, 12],
}


class _SearchAttack(_ProbaAttack):
    """Tree ensembles with an optional seeded ``RandomizedSearchCV`` on the training rows."""

    default_space: Dict[str, list] = {}

    def __init__(
        self,
        search_iter: int,
        search_cv: int,
        search_repeats: int,
        search_scoring: Optional[str],
        param_distributions: Optional[Mapping[str, Any]],
        search_n_jobs: int,
        seed: int,
    ) -> None:
        super().__init__(standardize=False, seed=seed)
        self.search_iter = check_int("search_iter", search_iter, 0)
        self.search_cv = check_int("search_cv", search_cv, 2)
        self.search_repeats = check_int("search_repeats", search_repeats, 1)
        if search_scoring is not None and not isinstance(search_scoring, str):
            raise ValueError(f"search_scoring must be a sklearn scorer name or None, got {search_scoring!r}")
        self.search_scoring = search_scoring
        if param_distributions is not None and not isinstance(param_distributions, Mapping):
            raise ValueError(f"param_distributions must be a mapping of option -> list, got {param_distributions!r}")
        self.param_distributions = None if param_distributions is None else dict(param_distributions)
        self.search_n_jobs = _check_n_jobs("search_n_jobs", search_n_jobs)
        self.best_params_: Optional[Dict[str, Any]] = None

    def _fit_model(self, model, X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray]):
        min_class = int(min(y.sum(), y.size - y.sum()))
        if self.search_iter == 0 or min_class < 2:
            # Fewer than 2 rows of a class cannot be split into stratified folds: fit the defaults.
            self.best_params_ = None
            return super()._fit_model(model, X, y, sample_weight)
        from sklearn.model_selection import RandomizedSearchCV, RepeatedStratifiedKFold, StratifiedKFold

        n_splits = min(self.search_cv, min_class)
        if self.search_repeats > 1:
            cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=self.search_repeats, random_state=self.seed)
        else:
            cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
        space = self.param_distributions if self.param_distributions is not None else self.default_space
        search = RandomizedSearchCV(
            model,
            param_distributions=space,
            n_iter=self.search_iter,
            scoring=self.search_scoring,
            cv=cv,
            random_state=self.seed,
            n_jobs=self.search_n_jobs,
            refit=True,
        )
        with warnings.catch_warnings():
            # n_iter larger than a finite grid: sklearn warns and searches the whole grid, which is fine.
            warnings.filterwarnings("ignore", message="The total space of parameters")
            if sample_weight is None:
                search.fit(X, y)
            else:
                search.fit(X, y, sample_weight=sample_weight)
        self.best_params_ = dict(search.best_params_)
        return search.best_estimator_


@ATTACKS.register("random_forest")
class RandomForestAttack(_SearchAttack):
    """Random forest (sklearn) with optional randomised search.

    Args:
        n_estimators, max_depth, min_samples_split, min_samples_leaf, max_features, class_weight:
            ``RandomForestClassifier`` options (the starting point and the non-searched values).
        n_jobs: trees fitted in parallel (1 by default: the audit shares 2 cores with training).
        search_iter: random-search draws (0 = no search).
        search_cv: stratified folds; search_repeats: repeats of those folds.
        search_scoring: sklearn scorer name (``"balanced_accuracy"``; ``None`` = accuracy).
        param_distributions: search space (default :data:`RF_SEARCH_SPACE`).
        search_n_jobs: parallel search jobs.
        seed: forest and search seed.

    Example:
        >>> from lightning_mia.attacks import build_attack
        >>> build_attack({"name": "random_forest", "search_iter": 4, "n_estimators": 20}).search_iter
        4
    """

    name = "random_forest"
    default_space = RF_SEARCH_SPACE

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: Optional[int] = None,
        min_samples_split: int = 2,
        min_samples_leaf: int = 1,
        max_features: Any = "sqrt",
        class_weight: Optional[str] = None,
        n_jobs: int = 1,
        search_iter: int = 0,
        search_cv: int = 2,
        search_repeats: int = 1,
        search_scoring: Optional[str] = "balanced_accuracy",
        param_distributions: Optional[Mapping[str, Any]] = None,
        search_n_jobs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(search_iter, search_cv, search_repeats, search_scoring, param_distributions, search_n_jobs, seed)
        self.n_estimators = check_int("n_estimators", n_estimators, 1)
        self.max_depth = None if max_depth is None else check_int("max_depth", max_depth, 1)
        self.min_samples_split = check_int("min_samples_split", min_samples_split, 2)
        self.min_samples_leaf = check_int("min_samples_leaf", min_samples_leaf, 1)
        if not (max_features in ("sqrt", "log2", None) or isinstance(max_features, (int, float)) and not isinstance(max_features, bool)):
            raise ValueError(f"max_features must be 'sqrt', 'log2', None, an int or a float, got {max_features!r}")
        self.max_features = max_features
        self.class_weight = check_choice("class_weight", class_weight, (None, "balanced", "balanced_subsample"))
        self.n_jobs = _check_n_jobs("n_jobs", n_jobs)

    def _make_model(self):
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            min_samples_split=self.min_samples_split,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            class_weight=self.class_weight,
            n_jobs=self.n_jobs,
            random_state=self.seed,
        )


@ATTACKS.register("xgboost")
class XGBoostAttack(_SearchAttack):
    """Gradient-boosted trees (xgboost, ``tree_method="hist"``) with optional randomised search.

    Args:
        n_estimators, max_depth, learning_rate, subsample, colsample_bytree, min_child_weight,
            scale_pos_weight: ``XGBClassifier`` options (xgboost defaults: depth 6, eta 0.3).
        n_jobs: threads (1 by default: the audit shares 2 cores with training).
        search_iter, search_cv, search_repeats, search_scoring, param_distributions, search_n_jobs:
            randomised search as for :class:`RandomForestAttack` (default space :data:`XGB_SEARCH_SPACE`).
        seed: booster and search seed.

    Example:
        >>> from lightning_mia.attacks import build_attack
        >>> build_attack({"name": "xgboost", "n_estimators": 10}).tree_method
        'hist'
    """

    name = "xgboost"
    default_space = XGB_SEARCH_SPACE
    tree_method = "hist"

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 6,
        learning_rate: float = 0.3,
        subsample: float = 1.0,
        colsample_bytree: float = 1.0,
        min_child_weight: float = 1.0,
        scale_pos_weight: float = 1.0,
        n_jobs: int = 1,
        search_iter: int = 0,
        search_cv: int = 2,
        search_repeats: int = 1,
        search_scoring: Optional[str] = "balanced_accuracy",
        param_distributions: Optional[Mapping[str, Any]] = None,
        search_n_jobs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(search_iter, search_cv, search_repeats, search_scoring, param_distributions, search_n_jobs, seed)
        self.n_estimators = check_int("n_estimators", n_estimators, 1)
        self.max_depth = check_int("max_depth", max_depth, 0)
        self.learning_rate = _check_positive("learning_rate", learning_rate)
        self.subsample = _check_positive("subsample", subsample)
        self.colsample_bytree = _check_positive("colsample_bytree", colsample_bytree)
        if self.subsample > 1 or self.colsample_bytree > 1:
            raise ValueError("subsample and colsample_bytree must be in (0, 1]")
        self.min_child_weight = _check_nonneg("min_child_weight", min_child_weight)
        self.scale_pos_weight = _check_positive("scale_pos_weight", scale_pos_weight)
        self.n_jobs = _check_n_jobs("n_jobs", n_jobs)

    def _make_model(self):
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            min_child_weight=self.min_child_weight,
            scale_pos_weight=self.scale_pos_weight,
            tree_method=self.tree_method,
            n_jobs=self.n_jobs,
            random_state=self.seed,
            verbosity=0,
        )
