"""Reference-model attacks (LiRA, RMIA) as registered attacks: they score every audit sample from reference models'
outputs and need no fitting on the pool.

Both read a :class:`ReferenceSignals`: the target's and the K reference models' logits on the audit pool (with
which references trained on which sample) and on population samples ``z`` that no model of the target trained
on. The monitor fills it from reference models trained alongside the target
(:class:`lightning_mia.callbacks.references.ReferenceModels`); scripts can fill it from their own models.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> K, n, m, C = 8, 40, 30, 3
    >>> labels = rng.integers(0, C, n)
    >>> sig = ReferenceSignals(rng.normal(size=(n, C)), labels, rng.normal(size=(K, n, C)), rng.random((K, n)) < .5,
    ...                        rng.normal(size=(m, C)), rng.integers(0, C, m), rng.normal(size=(K, m, C)))
    >>> scores, member = LiRAAttack().score_references(sig)
    >>> scores.shape, member.dtype
    ((40,), dtype('bool'))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

from lightning_mia.attacks.base import ATTACKS, Attack
from lightning_mia.attacks.reference_scores import lira_scores, logit_scaled_confidence, rmia_scores

__all__ = ["ReferenceSignals", "ReferenceAttack", "LiRAAttack", "RMIAAttack"]


def _true_class_prob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true label, in float64 (``logits`` ``(..., n, C)``, ``labels`` ``(n,)``)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    idx = np.broadcast_to(np.asarray(labels)[..., None], z.shape[:-1] + (1,))
    return np.exp(np.take_along_axis(logp, idx, axis=-1)[..., 0])


@dataclass(frozen=True)
class ReferenceSignals:
    """Logits of the target and of K reference models.

    Attributes:
        target_logits: ``(n, C)`` the target on the audit pool.
        labels: ``(n,)`` true classes of the pool.
        ref_logits: ``(K, n, C)`` each reference model on the pool.
        ref_in: ``(K, n)`` bool, reference k trained on pool sample i.
        pop_target_logits: ``(m, C)`` the target on population samples z (never trained on by the target).
        pop_labels: ``(m,)`` their classes.
        pop_ref_logits: ``(K, m, C)`` the references on z (z is OUT for every reference).
    """

    target_logits: np.ndarray
    labels: np.ndarray
    ref_logits: np.ndarray
    ref_in: np.ndarray
    pop_target_logits: np.ndarray
    pop_labels: np.ndarray
    pop_ref_logits: np.ndarray

    def __post_init__(self) -> None:
        n, K = len(self.labels), len(self.ref_logits)
        checks = (("target_logits", self.target_logits, (n,)), ("ref_logits", self.ref_logits, (K, n)),
                  ("ref_in", self.ref_in, (K, n)), ("pop_ref_logits", self.pop_ref_logits,
                                                     (K, len(self.pop_labels))),
                  ("pop_target_logits", self.pop_target_logits, (len(self.pop_labels),)))
        for name, arr, lead in checks:
            if tuple(np.shape(arr)[:len(lead)]) != lead:
                raise ValueError(f"ReferenceSignals.{name} has shape {np.shape(arr)}, expected {lead} + ...")

    @property
    def count(self) -> int:
        return int(len(self.ref_logits))

    def select(self, mask: Any) -> "ReferenceSignals":
        """The same signals for the pool samples where ``mask`` selects (population unchanged)."""
        return ReferenceSignals(self.target_logits[mask], self.labels[mask], self.ref_logits[:, mask],
                                self.ref_in[:, mask], self.pop_target_logits, self.pop_labels, self.pop_ref_logits)

    def accuracies(self) -> Tuple[float, float]:
        """Mean over references of their accuracy on the pool samples they trained on, and on the others."""
        correct = np.asarray(self.ref_logits).argmax(axis=-1) == np.asarray(self.labels)[None]
        ins = np.asarray(self.ref_in, bool)
        nan = float("nan")
        return (float(correct[ins].mean()) if ins.any() else nan, float(correct[~ins].mean()) if (~ins).any() else nan)


class ReferenceAttack(Attack):
    """Base of attacks scored from :class:`ReferenceSignals` instead of fitted on feature rows."""

    requires_references = True

    def _fit(self, X, y, sample_weight=None):  # pragma: no cover - guarded by the auditor
        raise ValueError(f"attack {self.name!r} is scored from reference models, not fitted: turn on the "
                         "monitor's reference_models option")

    def score_references(self, signals: ReferenceSignals) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, member)`` for every pool sample: higher = more likely member, and the attack's own decision."""
        raise NotImplementedError


@ATTACKS.register("lira")
class LiRAAttack(ReferenceAttack):
    """LiRA (Carlini et al., S&P 2022): per-example Gaussians of the references' logit-scaled confidence.

    Args:
        online: use the references trained on the sample (IN) and the others (OUT); offline uses OUT only.
        fix_variance: one global variance per IN/OUT group (the paper's choice for few references).
        seed: unused (the attack is deterministic); accepted like every attack's.

    The decision is the likelihood-ratio test at ratio 1 (online: score > 0) or the one-sided test at p = 0.5
    (offline: ``-log Pr(Z > phi) > log 2``).

    Example:
        >>> LiRAAttack(online=False).name
        'lira'
    """

    name = "lira"

    def __init__(self, online: bool = True, fix_variance: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.online, self.fix_variance = bool(online), bool(fix_variance)

    def score_references(self, signals: ReferenceSignals) -> Tuple[np.ndarray, np.ndarray]:
        phi = logit_scaled_confidence(signals.target_logits, signals.labels)
        ref_phi = logit_scaled_confidence(signals.ref_logits, np.asarray(signals.labels)[None])
        scores = lira_scores(phi, ref_phi, signals.ref_in, online=self.online, fix_variance=self.fix_variance)
        cut = 0.0 if self.online else np.log(2.0)
        return scores, np.nan_to_num(scores, nan=-np.inf) > cut


@ATTACKS.register("rmia")
class RMIAAttack(ReferenceAttack):
    """RMIA (Zarifzadeh et al., ICML 2024): the fraction of population samples z that x dominates in the
    pairwise likelihood ratio ``[p(x|target)/p(x)] / [p(z|target)/p(z)] > gamma``.

    Args:
        online: estimate ``p(x)`` from IN and OUT references; offline from OUT references with the ``a``
            correction (ML Privacy Meter's ``offline_a``).
        a: the offline correction (0.3, ML Privacy Meter's default).
        gamma: the pairwise threshold (1, ML Privacy Meter's default).
        seed: unused; accepted like every attack's.

    The decision is ``score > 0.5``: x beats most population samples.

    Example:
        >>> RMIAAttack(a=0.2).a
        0.2
    """

    name = "rmia"

    def __init__(self, online: bool = True, a: float = 0.3, gamma: float = 1.0, seed: int = 0) -> None:
        super().__init__(seed)
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"a must be in [0, 1], got {a!r}")
        if not float(gamma) > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.online, self.a, self.gamma = bool(online), float(a), float(gamma)

    def score_references(self, signals: ReferenceSignals) -> Tuple[np.ndarray, np.ndarray]:
        p_x = _true_class_prob(signals.target_logits, signals.labels)
        ref_p_x = _true_class_prob(signals.ref_logits, signals.labels)
        p_z = _true_class_prob(signals.pop_target_logits, signals.pop_labels)
        ref_p_z = _true_class_prob(signals.pop_ref_logits, signals.pop_labels)
        if len(p_z) == 0:
            raise ValueError("rmia needs population samples z (held-out samples outside the audit pool)")
        scores = rmia_scores(p_x, ref_p_x, p_z, ref_p_z, ref_in_x=signals.ref_in if self.online else None,
                             a=self.a, gamma=self.gamma, online=self.online)
        return scores, np.nan_to_num(scores, nan=0.0) > 0.5


