"""ROC curves of several attacks on one log-log plot, as the field reads them (Carlini et al. 2022): the low-FPR
corner is where reference-model attacks separate from average-case ones. The region below 1/n non-members,
which the pool cannot resolve, is shaded.

Example:
    >>> import numpy as np
    >>> y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    >>> fig = roc_overlay_figure({"a": (y, np.r_[np.ones(100), np.zeros(100)] + np.linspace(0, 1, 200))})
    >>> len(fig.axes)
    1
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import numpy as np

from lightning_mia.metrics import roc_points, score_metrics


def roc_curves_of(result: Any, slice_: str = "all") -> "dict[str, Tuple[np.ndarray, np.ndarray]]":
    """``{"feature / attack": (is_member, score)}`` of an audit's pool-wide scores (finite scores only)."""
    d = result.data
    mask = np.ones(d.n, bool) if slice_ == "all" else (d.correct if slice_ == "correct" else ~d.correct)
    out = {}
    for (f, a), s in result.scores.items():
        s = np.asarray(s, float)
        # hold-out splits score only the evaluation part: use what was scored
        ok = mask & np.isfinite(s)
        if ok.sum() and d.is_member[ok].any() and (~d.is_member[ok]).any():
            out[f"{f} / {a}"] = (d.is_member[ok], s[ok])
    return out


def roc_overlay_figure(curves: Mapping[str, Tuple[np.ndarray, np.ndarray]], title: Optional[str] = None) -> Any:
    """Log-log ROC of each ``label: (is_member, score)``; legend with AUC and TPR at 1% FPR."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    n_min = None
    for i, (label, (y, s)) in enumerate(curves.items()):
        fpr, tpr = roc_points(y, s)
        m = score_metrics(y, s)
        n_non = int((~np.asarray(y, bool)).sum())
        n_min = n_non if n_min is None else min(n_min, n_non)
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), lw=1.4, color=f"C{i % 10}",
                label=f"{label}: AUC {m['auc']:.3f}, TPR@1% {m['tpr_at_1pct_fpr']:.3f}")
    lim = 1e-3 if n_min is None else min(1e-3, 0.5 / max(n_min, 1))
    ax.plot([lim, 1], [lim, 1], color="grey", ls="--", lw=0.8, label="chance")
    if n_min:
        ax.axvspan(lim, 1.0 / n_min, color="grey", alpha=0.15, label=f"FPR < 1/{n_min}: not resolvable")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lim, 1)
    ax.set_ylim(lim, 1)
    ax.set_xlabel("false-positive rate (non-members called members)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title or "ROC (log-log)", fontsize=10)
    ax.legend(fontsize=6.5, loc="lower right")
    return fig
