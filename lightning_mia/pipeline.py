"""One audit step as pure functions: per-sample arrays in, history rows and per-sample scores out.

No Lightning here: the monitor callback gathers the arrays and calls :func:`audit_arrays`; scripts can call it on
arrays they extracted themselves (e.g. with :func:`lightning_mia.features.extract_features`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Spec = Union[str, Mapping[str, Any]]

#: Protocol options the monitor forwards to :func:`lightning_mia.attacks.protocol.evaluate`.
#: ``standard``: repeated stratified splits (:func:`lightning_mia.attacks.protocol.evaluate`); ``paper``: the
#: authors' per-class protocol (:func:`lightning_mia.attacks.paper.evaluate_paper`).
MODES = ("standard", "paper")
PROTOCOL_KEYS = ("repeats", "eval_fraction", "balance", "slices", "fit_per_slice", "per_class", "eval_ratios", "seed")


@dataclass
class AuditResult:
    """Rows for ``history.csv`` (one per feature/attack/slice) and per-sample evaluation scores."""

    rows: List[Dict[str, Any]] = field(default_factory=list)
    scores: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)
    folds: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)
    dropped: Dict[str, int] = field(default_factory=dict)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)


def spec_name(spec: Spec) -> str:
    """The tag name of a feature/attack spec: its ``tag`` option if given, else its ``name``."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("tag") or spec["name"])


def strip_tag(spec: Spec) -> Spec:
    """The spec without its ``tag`` option (tags name results; the factories do not take them)."""
    if isinstance(spec, str) or "tag" not in spec:
        return spec
    return {k: v for k, v in spec.items() if k != "tag"}


def finite_rows(X: np.ndarray) -> np.ndarray:
    """Boolean mask of rows whose values are all finite."""
    X = np.asarray(X, dtype=np.float64)
    return np.isfinite(X.reshape(len(X), -1)).all(axis=1)


def audit_arrays(
    features: Mapping[str, np.ndarray],
    is_member: np.ndarray,
    correct: np.ndarray,
    labels: np.ndarray,
    attack_specs: Sequence[Spec],
    protocol: Optional[Mapping[str, Any]] = None,
    extra_columns: Optional[Mapping[str, Any]] = None,
    epoch: Optional[int] = None,
    n_jobs: int = 1,
    mode: str = "standard",
    feature_kinds: Optional[Mapping[str, str]] = None,
) -> AuditResult:
    """Fit and score every attack on every feature array.

    Rows whose feature values are not finite (a diverged model) are excluded from that feature's attacks, counted in
    ``n_dropped`` and warned about. Attacks that need a 1-D input (``threshold``) are skipped on wider features.
    ``n_jobs > 1`` fits the feature/attack pairs in that many threads (same numbers as ``n_jobs=1``).
    ``mode="paper"`` runs :func:`lightning_mia.attacks.paper.evaluate_paper` instead (the authors' per-class
    protocol; the preset follows each feature's registered name in ``feature_kinds``, default the tag; only
    ``seed`` of ``protocol`` applies; the threshold attack is not part of it and is skipped).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> member = np.r_[np.ones(200, bool), np.zeros(200, bool)]
        >>> loss = rng.normal(size=400) - 1.0 * member          # members have lower loss
        >>> res = audit_arrays({"loss": loss[:, None]}, member, np.ones(400, bool), np.zeros(400, int),
        ...                    ["threshold"], {"repeats": 2, "slices": ["all"]})
        >>> 0.6 < res.rows[0]["balanced_accuracy"] < 0.8
        True
    """
    from lightning_mia.attacks import build_attack
    from lightning_mia.attacks.paper import PAPER_ATTACKS, evaluate_paper, preset_for_feature
    from lightning_mia.attacks.protocol import evaluate
    from lightning_mia.registry import parse_spec

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    protocol = dict(protocol or {})
    unknown = set(protocol) - set(PROTOCOL_KEYS)
    if unknown:
        raise ValueError(f"Unknown protocol options {sorted(unknown)}; known: {PROTOCOL_KEYS}")
    is_member = np.asarray(is_member, dtype=bool)
    correct = np.asarray(correct, dtype=bool)
    labels = np.asarray(labels)
    n = len(is_member)
    kinds = dict(feature_kinds or {})
    result = AuditResult()
    jobs = []  # (feature, attack tag, attack spec, X, keep, n_dropped), in output order
    for fname, X in features.items():
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        if len(X) != n:
            raise ValueError(f"Feature {fname!r} has {len(X)} rows for {n} samples")
        keep = finite_rows(X)
        n_dropped = int(n - keep.sum())
        result.dropped[fname] = n_dropped
        if n_dropped:
            why = ("samples whose boundary walk failed" if kinds.get(fname) == "boundary_distance"
                   else "NaN/inf model outputs?")
            warnings.warn(f"{n_dropped} of {n} audit samples have non-finite {fname!r} values ({why}) and were "
                          "excluded from its attacks", RuntimeWarning, stacklevel=2)
        for aspec in attack_specs:
            aname, aspec = spec_name(aspec), strip_tag(aspec)
            if mode == "paper" and (aname if isinstance(aspec, str) else aspec["name"]) not in PAPER_ATTACKS:
                result.skipped.append((fname, aname, f"not an attack of the paper protocol {PAPER_ATTACKS}"))
                continue
            if getattr(build_attack(aspec), "requires_1d", False) and X.shape[1] != 1:
                result.skipped.append((fname, aname, f"needs a 1-D feature, {fname!r} has {X.shape[1]} dims"))
                continue
            jobs.append((fname, aname, aspec, X, keep, n_dropped))

    def run(job):
        fname, _, aspec, X, keep, _ = job
        if mode == "paper":
            name, options = parse_spec(aspec, "attack")
            preset = preset_for_feature(kinds.get(fname, fname))
            return evaluate_paper(X[keep], is_member[keep], correct[keep], labels[keep], preset=preset,
                                  attack=name, attack_options=options or None, seed=protocol.get("seed", 0))
        return evaluate(X[keep], is_member[keep], correct[keep], labels[keep], aspec, **protocol)

    if n_jobs > 1 and len(jobs) > 1:
        # threads: the heavy parts (sklearn/xgboost fits, BLAS) release the GIL; every job is seeded on its own,
        # so the numbers do not depend on n_jobs
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            outputs = list(pool.map(run, jobs))
    else:
        outputs = [run(job) for job in jobs]
    for (fname, aname, _, _, keep, n_dropped), pr in zip(jobs, outputs):
        scores = np.full(n, np.nan)
        scores[keep] = pr.scores
        fold = np.full(n, -1, dtype=np.int64)
        fold[keep] = pr.fold
        result.scores[(fname, aname)] = scores
        result.folds[(fname, aname)] = fold
        for r in pr.rows:
            row: Dict[str, Any] = {"epoch": epoch, "feature": fname, "attack": aname}
            row.update(r)
            row["n_dropped"] = n_dropped
            row.update(extra_columns or {})
            result.rows.append(row)
    return result


def target_metrics(is_member: np.ndarray, correct: np.ndarray, loss: np.ndarray) -> Dict[str, float]:
    """Train/test accuracy and loss of the target model measured on the audit pool (eval mode)."""
    is_member = np.asarray(is_member, dtype=bool)
    out = {}
    for prefix, mask in (("train", is_member), ("test", ~is_member)):
        finite = mask & np.isfinite(loss)
        out[f"{prefix}_acc"] = float(np.mean(correct[mask])) if mask.any() else float("nan")
        out[f"{prefix}_loss"] = float(np.mean(loss[finite])) if finite.any() else float("nan")
    return out
