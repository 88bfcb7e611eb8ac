"""Membership-inference attacks, their registry and the evaluation protocol.

Registered attacks (``ATTACKS``): ``threshold``, ``logistic_regression``, ``mlp``, ``random_forest``,
``xgboost``, and the reference-model attacks ``lira`` and ``rmia`` (scored, not fitted: :mod:`.reference`).
Build one with :func:`build_attack`; evaluate it on an audit pool with
:func:`~lightning_mia.attacks.protocol.evaluate`, or the authors' per-class set-up with
:func:`~lightning_mia.attacks.paper.evaluate_paper`.

Example:
    >>> import numpy as np
    >>> from lightning_mia.attacks import ATTACKS, build_attack
    >>> sorted(ATTACKS)
    ['lira', 'logistic_regression', 'mlp', 'random_forest', 'rmia', 'threshold', 'xgboost']
    >>> a = build_attack({"name": "threshold"}).fit(np.array([0., 1., 2., 3.]), np.array([0, 0, 1, 1]))
    >>> a.predict(np.array([0.5, 2.5])).tolist()
    [False, True]
"""
from lightning_mia.attacks.base import ATTACKS, Attack, build_attack
from lightning_mia.attacks.learned import LogisticRegressionAttack, MLPAttack, RandomForestAttack, XGBoostAttack
from lightning_mia.attacks.threshold import ThresholdAttack
from lightning_mia.attacks.reference import LiRAAttack, ReferenceSignals, RMIAAttack
from lightning_mia.attacks.protocol import ProtocolResult, evaluate
from lightning_mia.attacks.paper import evaluate_paper

__all__ = [
    "ATTACKS",
    "Attack",
    "build_attack",
    "ThresholdAttack",
    "LogisticRegressionAttack",
    "MLPAttack",
    "RandomForestAttack",
    "XGBoostAttack",
    "LiRAAttack",
    "RMIAAttack",
    "ReferenceSignals",
    "ProtocolResult",
    "evaluate",
    "evaluate_paper",
]
