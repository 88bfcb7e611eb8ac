"""The audit's pure work, usable without a Trainer: features of an audit in, a fully declared ``AuditResult`` out.

:class:`Auditor` owns what happens between the extraction pass and the files: the features' pool-fitted
post-processing, the difficulty-calibration reference (with its own state), the target model's metrics, every
feature x attack evaluated under the protocol (in parallel threads when asked), and the out-of-distribution
false-alarm probe. :func:`audit_arrays` is the same for arrays a script extracted itself.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> member = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    >>> loss = rng.normal(size=400) - 1.0 * member          # members have lower loss
    >>> res = audit_arrays({"loss": loss}, member, np.ones(400, bool), np.zeros(400, int), ["threshold"],
    ...                    StandardProtocol(repeats=2, slices=["all"]))
    >>> 0.6 < res.rows[0]["balanced_accuracy"] < 0.8
    True
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_mia.membership import MembershipData, finite_rows
from lightning_mia.protocols import AttackProtocol, StandardProtocol, build_protocol
from lightning_mia.registry import Spec, SpecLike
from lightning_mia.threads import blas_limits

__all__ = ["AuditResult", "Auditor", "audit_arrays", "run_attacks", "target_metrics"]

Pair = Tuple[str, str]
#: The feature name of reference-model attack rows (they read the reference models, not a feature).
REFERENCE_FEATURE = "reference"
#: ``MembershipData.source`` of the one-run audit's canaries (``is_member`` = the canary's coin).
CANARY_SOURCE = -2


@dataclass
class AuditResult:
    """Everything one audit produced.

    Attributes:
        epoch: the audited epoch (``None`` outside training).
        rows: ``history.csv`` rows, one per feature/attack/slice (plus ``ood_{source}`` rows).
        scores: ``{(feature, attack): (n,)}`` attack score per pool sample (NaN where not scored).
        folds: ``{(feature, attack): (n,)}`` 0 attack training, 1 evaluation, -1 dropped (non-finite).
        dropped: ``{feature: n}`` pool samples with non-finite values.
        skipped: ``[(feature, attack, reason)]`` pairs the protocol could not run.
        target: the target model's train/test accuracy and loss on the pool.
        ood: ``{(source, feature, attack): (scores, threshold)}`` of the OOD probe.
        data: the pool's per-sample arrays with the post-processed (and calibrated) features.
    """

    epoch: Optional[int] = None
    rows: List[Dict[str, Any]] = field(default_factory=list)
    scores: Dict[Pair, np.ndarray] = field(default_factory=dict)
    folds: Dict[Pair, np.ndarray] = field(default_factory=dict)
    dropped: Dict[str, int] = field(default_factory=dict)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    target: Dict[str, float] = field(default_factory=dict)
    ood: Dict[Tuple[str, str, str], Tuple[np.ndarray, float]] = field(default_factory=dict)
    data: Optional[MembershipData] = None

    def row(self, feature: str, attack: str, slice_: str = "all") -> Dict[str, Any]:
        for r in self.rows:
            if (r["feature"], r["attack"], r["slice"]) == (feature, attack, slice_):
                return r
        raise KeyError(f"No row {feature}/{attack}/{slice_}")


def target_metrics(is_member: np.ndarray, correct: np.ndarray, loss: np.ndarray) -> Dict[str, float]:
    """Train/test accuracy and loss of the target model measured on the audit pool (eval mode)."""
    is_member = np.asarray(is_member, dtype=bool)
    correct, loss = np.asarray(correct, bool), np.asarray(loss, np.float64)
    out = {}
    for prefix, mask in (("train", is_member), ("test", ~is_member)):
        finite = mask & np.isfinite(loss)
        out[f"{prefix}_acc"] = float(np.mean(correct[mask])) if mask.any() else float("nan")
        out[f"{prefix}_loss"] = float(np.mean(loss[finite])) if finite.any() else float("nan")
    return out


def run_attacks(
    data: MembershipData,
    attacks: Sequence[Spec],
    protocol: AttackProtocol,
    epoch: Optional[int] = None,
    n_jobs: int = 1,
    kinds: Optional[Mapping[str, str]] = None,
    extra_columns: Optional[Mapping[str, Any]] = None,
) -> AuditResult:
    """Fit and score every attack on every feature of ``data`` under ``protocol``.

    Rows whose feature values are not finite (a diverged model, a failed boundary walk) are excluded from that
    feature's attacks, counted in ``n_dropped`` and warned about. Pairs the protocol cannot run (e.g. the
    threshold attack on a wide feature) are listed in ``skipped``. ``n_jobs > 1`` fits the feature/attack pairs
    in that many threads, one BLAS thread each (same numbers as ``n_jobs=1``). ``kinds`` maps feature tags to
    registered names.
    """
    kinds = dict(kinds or {})
    n = data.n
    result = AuditResult(epoch=epoch, data=data)
    jobs = []  # (feature, attack, keep, n_dropped), in output order
    for tag, X in data.features.items():
        keep = finite_rows(X)
        n_dropped = int(n - keep.sum())
        result.dropped[tag] = n_dropped
        if n_dropped:
            why = ("samples whose boundary walk failed" if kinds.get(tag) == "boundary_distance"
                   else "NaN/inf model outputs?")
            warnings.warn(f"{n_dropped} of {n} audit samples have non-finite {tag!r} values ({why}) and were "
                          "excluded from its attacks", RuntimeWarning, stacklevel=2)
        for attack in attacks:
            reason = protocol.skip_reason(attack, X.shape[1])
            if reason is not None:
                result.skipped.append((tag, attack.tag, reason))
                continue
            jobs.append((tag, attack, keep, n_dropped))

    def run(job):
        tag, attack, keep, _ = job
        return protocol.evaluate(data.select(keep), tag, attack, kinds.get(tag, tag))

    if n_jobs > 1 and len(jobs) > 1:
        # threads: the heavy parts (sklearn/xgboost fits, BLAS) release the GIL; every job is seeded on its own,
        # so the numbers do not depend on n_jobs. One BLAS thread per job, set here: OpenBLAS ignores limits set
        # from the worker threads (lightning_mia.threads)
        from concurrent.futures import ThreadPoolExecutor

        with blas_limits(1), ThreadPoolExecutor(max_workers=n_jobs) as pool:
            outputs = list(pool.map(run, jobs))
    else:
        outputs = [run(job) for job in jobs]
    for (tag, attack, keep, n_dropped), pr in zip(jobs, outputs):
        scores = np.full(n, np.nan)
        scores[keep] = pr.scores
        fold = np.full(n, -1, dtype=np.int64)
        fold[keep] = pr.fold
        result.scores[(tag, attack.tag)] = scores
        result.folds[(tag, attack.tag)] = fold
        for r in pr.rows:
            result.rows.append({"epoch": epoch, "feature": tag, "attack": attack.tag, **r, "n_dropped": n_dropped,
                                **dict(extra_columns or {})})
    return result


class Auditor:
    """The per-audit work of the monitor, without Lightning.

    Args:
        features: resolved feature specs (their tags name the result columns).
        attacks: resolved attack specs.
        protocol: how attacks are fitted and scored.
        calibrate: feature tags also attacked difficulty-calibrated, as ``{tag}_calibrated`` = value now minus the
            sample's value at the reference audit (the first audited epoch at or after ``reference_epoch``).
        reference_epoch: see ``calibrate``.
        ood_sources: names of the OOD sources, in the order of ``MembershipData.source`` 1, 2, ...
        n_jobs: threads fitting the feature/attack pairs.
        seed: seeds the OOD probe's and the canaries' attack fits.
        canary_guesses: "in" and "out" guesses each of the one-run audit on the canaries (rows with
            ``source == CANARY_SOURCE``; default a tenth of the canaries each, abstaining on the rest).

    Example:
        >>> import numpy as np
        >>> from lightning_mia.registry import Spec
        >>> rng = np.random.default_rng(0)
        >>> member = rng.random(300) < 0.5
        >>> data = MembershipData({"loss": rng.normal(size=300) - member}, member, np.ones(300, bool),
        ...                       np.zeros(300), loss=rng.random(300))
        >>> auditor = Auditor([Spec("loss", "loss")], [Spec("threshold", "threshold")],
        ...                   StandardProtocol(repeats=1, slices=["all"], seed=0))
        >>> res = auditor.audit(data, epoch=0)
        >>> res.rows[0]["feature"], res.rows[0]["attack"], res.rows[0]["slice"], sorted(res.target)[:2]
        ('loss', 'threshold', 'all', ['test_acc', 'test_loss'])
    """

    def __init__(
        self,
        features: Sequence[Spec],
        attacks: Sequence[Spec],
        protocol: AttackProtocol,
        calibrate: Sequence[str] = (),
        reference_epoch: int = 0,
        ood_sources: Sequence[str] = (),
        n_jobs: int = 1,
        seed: int = 0,
        canary_guesses: Optional[int] = None,
    ) -> None:
        from lightning_mia.attacks import ATTACKS

        self.features = list(features)
        #: attacks fitted on feature rows under the protocol, and attacks scored from reference models
        self.attacks = [a for a in attacks if not getattr(ATTACKS[a.name], "requires_references", False)]
        self.reference_attacks = [a for a in attacks if getattr(ATTACKS[a.name], "requires_references", False)]
        self.protocol = protocol
        tags = [f.tag for f in self.features]
        unknown = [t for t in calibrate if t not in tags]
        if unknown:
            raise ValueError(f"calibrate names features that are not monitored: {unknown}; monitored: {tags}")
        self.calibrate, self.reference_epoch = list(calibrate), int(reference_epoch)
        self.ood_sources, self.n_jobs, self.seed = list(ood_sources), int(n_jobs), int(seed)
        self.canary_guesses = canary_guesses
        self.kinds = {f.tag: f.name for f in self.features}
        self.kinds.update({f"{t}_calibrated": self.kinds[t] for t in self.calibrate})
        #: per-sample histories of the ``trajectory`` features, by tag
        self.trajectories: Dict[str, Any] = {}
        #: the calibration reference: ``{"epoch": e, tag: [values...]}`` (plain lists: checkpoint-safe)
        self.reference: Optional[Dict[str, Any]] = None

    def build_features(self) -> Dict[str, Any]:
        """``{tag: Feature}`` built from the feature specs (one fresh object per call)."""
        from lightning_mia.features import FEATURES

        return {f.tag: FEATURES.build(f) for f in self.features}

    # -- state (the calibration reference) ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"reference": self.reference, "trajectories": {t: s.state_dict() for t, s in self.trajectories.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ref = state.get("reference")
        if ref is not None:  # older checkpoints held numpy arrays: store plain lists from now on
            ref = {k: (v if k == "epoch" else np.asarray(v, np.float64).tolist()) for k, v in dict(ref).items()}
        self.reference = ref
        from lightning_mia.features.trajectory import TrajectoryState

        self.trajectories = {t: TrajectoryState.from_state(s) for t, s in dict(state.get("trajectories") or {}).items()}

    # -- the audit ----------------------------------------------------------------------------------------
    def audit(self, data: MembershipData, epoch: Optional[int] = None,
              feature_objs: Optional[Mapping[str, Any]] = None, references: Optional[Any] = None,
              target_extra: Optional[Mapping[str, float]] = None) -> AuditResult:
        """Audit ``data`` (pool with ``source == 0``, OOD sources ``1, 2, ...``).

        ``feature_objs`` are the Feature objects that extracted ``data`` (their ``fit_postprocess`` is used);
        default: fresh ones from the specs. ``references`` (:class:`~lightning_mia.attacks.ReferenceSignals`, in
        the order of the pool) feeds the reference-model attacks, whose rows carry the feature name ``reference``.
        ``target_extra`` adds target-model columns (e.g. the DP accountant's ``dp_epsilon``).
        """
        objs = dict(feature_objs) if feature_objs is not None else self.build_features()
        pool = data.pool()
        transforms: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
            tag: objs[tag].fit_postprocess(pool.features[tag]) if tag in objs else _identity
            for tag in pool.features}
        feats = {tag: np.asarray(transforms[tag](X), np.float64) for tag, X in pool.features.items()}
        feats.update(self._trajectories(feats, pool.label, epoch))
        feats.update(self._calibrated(feats, epoch))
        pool = pool.with_features(feats)
        target = target_metrics(pool.is_member, pool.correct, pool.loss)
        if references is not None:
            target["reference_train_acc"], target["reference_test_acc"] = references.accuracies()
        target.update(dict(target_extra or {}))
        result = run_attacks(pool, self.attacks, self.protocol, epoch=epoch, n_jobs=self.n_jobs, kinds=self.kinds,
                             extra_columns=target)
        result.target = target
        self._attack_references(pool, references, result, epoch)
        self._attack_ood(data, transforms, result, epoch)
        self._attack_canaries(data, transforms, result, epoch)
        return result

    def _attack_canaries(self, data: MembershipData, transforms: Mapping[str, Callable], result: AuditResult,
                         epoch: Optional[int]) -> None:
        """The one-run audit (Steinke, Nasr & Jagielski 2023): each attack, fitted on the whole audit pool, scores
        the canaries (each trained on by a fair coin); guessing "in" for the highest scores and "out" for the
        lowest, the number of right guesses bounds epsilon: ``canaries`` rows with ``epsilon_one_run``."""
        can = data.source == CANARY_SOURCE
        if not can.any():
            return
        from lightning_mia.bounds import one_run_audit
        from lightning_mia.ood import ood_far

        pool, included = data.source == 0, data.is_member[can]
        m = int(can.sum())
        k = self.canary_guesses if self.canary_guesses is not None else max(1, m // 10)
        k = min(int(k), m // 2)
        balance = getattr(self.protocol, "balance", "undersample")
        conf, delta = getattr(self.protocol, "confidence", 0.95), getattr(self.protocol, "delta", 0.0)
        for tag in data.features:
            X_pool, X_can = transforms[tag](data.features[tag][pool]), transforms[tag](data.features[tag][can])
            for attack in self.attacks:
                if (tag, attack.tag) not in result.scores:
                    continue
                _, scores, _, _ = ood_far(X_pool, data.is_member[pool], X_can, {"name": attack.name,
                                                                                **attack.options}, balance, self.seed)
                ok = np.isfinite(scores)
                audit = one_run_audit(scores[ok], included[ok], min(k, int(ok.sum()) // 2),
                                      min(k, int(ok.sum()) // 2), delta=delta, confidence=conf)
                from lightning_mia.metrics import score_metrics

                result.rows.append({"epoch": epoch, "feature": tag, "attack": attack.tag, "slice": "canaries",
                                    "n_members": int(included.sum()), "n_nonmembers": int((~included).sum()),
                                    "repeats": 1, "epsilon_one_run": audit["epsilon"],
                                    "canary_guesses": audit["guesses_made"], "canary_correct": audit["guesses_correct"],
                                    "auc": score_metrics(included[ok], scores[ok])["auc"], **result.target})

    def _attack_references(self, pool: MembershipData, references: Optional[Any], result: AuditResult,
                           epoch: Optional[int]) -> None:
        """Score the reference-model attacks on every pool sample (no fitting) and evaluate them per slice."""
        if not self.reference_attacks:
            return
        if references is None:
            result.skipped += [(REFERENCE_FEATURE, a.tag, "needs reference models") for a in self.reference_attacks]
            return
        from lightning_mia.attacks import ATTACKS
        from lightning_mia.attacks.protocol import evaluate_scores

        for spec in self.reference_attacks:
            scores, decision = ATTACKS.build(spec).score_references(references)
            pr = evaluate_scores(scores, decision, pool.is_member, pool.correct, self.protocol.slices,
                                 getattr(self.protocol, "confidence", 0.95), getattr(self.protocol, "delta", 0.0))
            result.scores[(REFERENCE_FEATURE, spec.tag)] = pr.scores
            result.folds[(REFERENCE_FEATURE, spec.tag)] = pr.fold
            result.rows += [{"epoch": epoch, "feature": REFERENCE_FEATURE, "attack": spec.tag, **r,
                             "n_dropped": int((~np.isfinite(scores)).sum()), **result.target} for r in pr.rows]

    def _trajectories(self, feats: Dict[str, np.ndarray], labels: np.ndarray, epoch: Optional[int]
                      ) -> Dict[str, np.ndarray]:
        """Replace each ``trajectory`` feature's current value by its history ``(n, T)`` and add ``{tag}_drop``."""
        from lightning_mia.features.trajectory import TrajectoryState

        out = {}
        for spec in self.features:
            if spec.name != "trajectory":
                continue
            if spec.tag not in self.trajectories:
                sign = 1.0 if spec.options.get("signal", "loss") == "loss" else -1.0
                self.trajectories[spec.tag] = TrajectoryState(int(spec.options.get("history", 10)), sign)
            state = self.trajectories[spec.tag]
            out[spec.tag] = state.update(-1 if epoch is None else epoch, feats[spec.tag][:, 0])
            out[f"{spec.tag}_drop"] = state.drop(labels)[:, None]
            self.kinds[f"{spec.tag}_drop"] = "trajectory"
        return out

    def _calibrated(self, feats: Mapping[str, np.ndarray], epoch: Optional[int]) -> Dict[str, np.ndarray]:
        """Difficulty-calibrated copies ``{tag}_calibrated`` = value now - value at the reference epoch.

        LiRA-style per-sample calibration without shadow models (Carlini et al. 2022; Watson et al. 2022): the
        early-epoch model stands in for a reference model that has not memorised the sample yet, so what is left
        is the change that training on the sample caused.
        """
        if not self.calibrate:
            return {}
        if self.reference is None:
            if epoch is None or epoch >= self.reference_epoch:
                self.reference = {"epoch": epoch, **{t: np.asarray(feats[t], np.float64).tolist()
                                                     for t in self.calibrate}}
            return {}
        return {f"{t}_calibrated": np.asarray(feats[t]) - np.asarray(self.reference[t]) for t in self.calibrate}

    def _attack_ood(self, data: MembershipData, transforms: Mapping[str, Callable], result: AuditResult,
                    epoch: Optional[int]) -> None:
        """FAR of each feature/attack on each OOD source: ``ood_{source}`` rows and scores in ``result``."""
        if not self.ood_sources:
            return
        from lightning_mia.ood import ood_far

        pool = data.source == 0
        done = set(result.scores)
        balance = getattr(self.protocol, "balance", "undersample")
        for k, src in enumerate(self.ood_sources, start=1):
            mask = data.source == k
            for tag in data.features:
                X_pool = transforms[tag](data.features[tag][pool])  # the pool's own projection, reused
                X_ood = transforms[tag](data.features[tag][mask])
                for attack in self.attacks:
                    if (tag, attack.tag) not in done:
                        continue
                    far, scores, thr, n = ood_far(X_pool, data.is_member[pool], X_ood,
                                                  {"name": attack.name, **attack.options}, balance, self.seed)
                    result.ood[(src, tag, attack.tag)] = (scores, thr)
                    result.rows.append({"epoch": epoch, "feature": tag, "attack": attack.tag, "slice": f"ood_{src}",
                                        "n_members": 0, "n_nonmembers": n, "repeats": 1, "far": far,
                                        **result.target})


def _identity(X: np.ndarray) -> np.ndarray:
    return X


def audit_arrays(
    features: Mapping[str, np.ndarray],
    is_member: Any,
    correct: Any,
    labels: Any,
    attacks: Sequence[SpecLike],
    protocol: Union[AttackProtocol, str, None] = None,
    *,
    epoch: Optional[int] = None,
    n_jobs: int = 1,
    feature_kinds: Optional[Mapping[str, str]] = None,
    extra_columns: Optional[Mapping[str, Any]] = None,
) -> AuditResult:
    """Fit and score every attack on every feature array (see :func:`run_attacks`); for scripts that extracted
    their own arrays. ``protocol`` defaults to ``StandardProtocol(seed=0)``; ``feature_kinds`` maps feature
    names to registered feature names (the paper protocol picks its preset from them)."""
    from lightning_mia.attacks import ATTACKS

    proto = build_protocol(protocol if protocol is not None else StandardProtocol()).with_seed(0)
    data = MembershipData(features=features, is_member=is_member, correct=correct, label=labels)
    return run_attacks(data, ATTACKS.resolve_all(attacks), proto, epoch=epoch, n_jobs=n_jobs, kinds=feature_kinds,
                       extra_columns=extra_columns)
