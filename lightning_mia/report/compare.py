"""Compare the MI audits of several runs (e.g. AlexNet vs ResNet, or with vs without augmentation).

One figure per (feature, attack) shared by all runs, with four panels: attack balanced accuracy (solid) and FAR
(dashed) on all / correctly classified / misclassified samples, and the target's train (solid) / test (dashed)
accuracy — one color per run — plus a markdown summary table (final, max-leakage and early-stopping numbers).

Example:
    >>> compare_runs(["runs/alexnet/version_0", "runs/resnet/version_0"], "runs/compare")   # doctest: +SKIP
    'runs/compare/compare.md'
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lightning_mia.io import atomic_write_text
from lightning_mia.layout import FIGURES_DIR, SLICES


def run_labels(run_dirs: Sequence[str]) -> List[str]:
    """Short distinct labels: the folder name, with parent folders added while labels collide."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def comparison_figure(runs: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]], feature: str, attack: str,
                      slices: Sequence[str] = SLICES):
    """Overlay figure for ``runs`` = [(label, history_rows), ...] on one feature/attack."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from lightning_mia.report.plots import SLICE_TITLES, _series, _slice_rows

    fig = Figure(figsize=(4.4 * (len(slices) + 1), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(slices) + 1, sharey=True, squeeze=False)[0]
    colors = matplotlib.colormaps["tab10"](np.arange(len(runs)) % 10)
    for (label, rows), color in zip(runs, colors):
        for ax, slice_ in zip(axes, slices):
            sr = _slice_rows(rows, feature, attack, slice_)
            if not sr:
                continue
            ep = np.array([int(r["epoch"]) for r in sr], dtype=float)
            ax.plot(ep, _series(sr, "balanced_accuracy"), color=color, marker="o", markersize=2.5)
            ax.plot(ep, _series(sr, "far"), color=color, ls="--", marker="x", markersize=2.5)
        sr = _slice_rows(rows, feature, attack, "all") or [r for r in rows if r.get("epoch") is not None]
        sr = sorted({int(r["epoch"]): r for r in sr}.values(), key=lambda r: int(r["epoch"]))
        ep = np.array([int(r["epoch"]) for r in sr], dtype=float)
        axes[-1].plot(ep, _series(sr, "train_acc"), color=color, marker="o", markersize=2.5)
        axes[-1].plot(ep, _series(sr, "test_acc"), color=color, ls="--", marker="x", markersize=2.5)
    for ax, slice_ in zip(axes, slices):
        ax.set_title(f"attack: {SLICE_TITLES.get(slice_, slice_).lower()}")
        ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
    axes[-1].set_title("target accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("rate")
    run_handles = [Line2D([], [], color=c, label=lab) for (lab, _), c in zip(runs, colors)]
    style = [Line2D([], [], color="0.3", label="balanced acc."), Line2D([], [], color="0.3", ls="--", label="FAR")]
    axes[0].legend(handles=run_handles + style, fontsize=7, loc="lower left")
    axes[-1].legend(handles=[Line2D([], [], color="0.3", label="train"),
                             Line2D([], [], color="0.3", ls="--", label="test")], fontsize=7, loc="lower right")
    fig.suptitle(f"Run comparison — {feature} / {attack}")
    return fig


def _summary_row(label: str, table: Sequence[Mapping[str, Any]], feature: str, attack: str) -> Dict[str, Any]:
    def get(slice_, point):
        for r in table:
            if r["feature"] == feature and r["attack"] == attack and r["slice"] == slice_ and r["point"] == point:
                return r
        return {}

    final, final_mis, leak = get("all", "final"), get("misclassified", "final"), get("all", "max_leakage")
    es_points = [r["point"] for r in table if r["point"].startswith("es_patience_")]
    es = get("all", es_points[0]) if es_points else {}
    return {"run": label, "final_epoch": final.get("epoch"), "train_acc": final.get("train_acc"),
            "test_acc": final.get("test_acc"), "ba_all": final.get("balanced_accuracy"),
            "far_all": final.get("far"), "ba_mis": final_mis.get("balanced_accuracy"),
            "n_mis": final.get("n_misclassified_members"), "max_ba": leak.get("balanced_accuracy"),
            "max_ba_epoch": leak.get("epoch"), "es_point": es_points[0] if es_points else None,
            "es_epoch": es.get("epoch"), "es_ba": es.get("balanced_accuracy"), "es_test_acc": es.get("test_acc")}


def compare_runs(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
                 feature: Optional[str] = None, attack: Optional[str] = None) -> str:
    """Write ``{out}/compare.md`` and ``{out}/figures/compare__{feature}__{attack}.png``; returns the md path.

    Compares every (feature, attack) present in all runs (or only ``feature``/``attack`` when given). Raises
    ``ValueError`` when the runs share none, or when ``labels`` does not match ``run_dirs``.
    """
    from lightning_mia.report import load_run
    from lightning_mia.report.plots import safe_name, save_figure
    from lightning_mia.report.tables import combos, comparison_table, markdown_table

    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    labels = list(labels) if labels else run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d) for d in run_dirs]
    per_run = [combos(r["rows"]) for r in runs]
    shared = [c for c in per_run[0] if all(c in other for other in per_run[1:])]
    if feature is not None:
        shared = [c for c in shared if c[0] == feature]
    if attack is not None:
        shared = [c for c in shared if c[1] == attack]
    if not shared:
        raise ValueError("the runs share no feature/attack combination: " + "; ".join(
            f"{lab}: {', '.join(f'{f}/{a}' for f, a in cs) or 'none'}" for lab, cs in zip(labels, per_run)))
    tables = [comparison_table(r["rows"], r["es"]) for r in runs]
    fig_dir = os.path.join(out, FIGURES_DIR)
    md = ["# Membership-inference comparison", "", "Runs:", ""]
    md += [f"- **{lab}**: `{os.path.abspath(d)}`" for lab, d in zip(labels, run_dirs)] + [""]
    for f, a in shared:
        fig = comparison_figure([(lab, r["rows"]) for lab, r in zip(labels, runs)], f, a)
        path = save_figure(fig, os.path.join(fig_dir, f"compare__{safe_name(f)}__{safe_name(a)}.png"))
        summary = [_summary_row(lab, t, f, a) for lab, t in zip(labels, tables)]
        md += [f"## {f} / {a}", "", f"![comparison]({os.path.relpath(path, out).replace(os.sep, '/')})", "",
               markdown_table(summary, [
                   ("run", "run"), ("final epoch", "final_epoch"), ("train acc", "train_acc"),
                   ("test acc", "test_acc"), ("BA all", "ba_all"), ("FAR all", "far_all"),
                   ("BA misclassified", "ba_mis"), ("misclassified members", "n_mis"),
                   ("max BA (all)", "max_ba"), ("at epoch", "max_ba_epoch"), ("ES rule", "es_point"),
                   ("ES epoch", "es_epoch"), ("BA at ES", "es_ba"), ("test acc at ES", "es_test_acc")]), ""]
    md += ["Final = last monitored epoch; BA = attack balanced accuracy, FAR = non-members called members; "
           "ES = first early-stopping rule of each run (empty epoch: it never stopped).", ""]
    path = os.path.join(out, "compare.md")
    atomic_write_text(path, "\n".join(md))
    return path
