"""Report figures as pure functions: history rows / prediction arrays in, ``matplotlib.figure.Figure`` out.

Figures are built with ``matplotlib.figure.Figure`` directly (no ``pyplot``): no GUI backend is selected, no
global figure registry grows, and it works on machines without a screen. :func:`save_figure` writes a PNG.

- :func:`training_progress_figure` — the paper's "Training progress and MI attack" plot (Rezaei & Liu 2021,
  supplementary Figures 3–8): panels for all / correctly classified / misclassified samples with the attack's
  balanced accuracy and FAR (± std over repeats), the target's train/test accuracy, the number of members in the
  slice, and vertical lines where early stopping would have stopped.
- :func:`roc_figure` — attack ROC curves at chosen epochs on log-log axes (low-FPR regime), per slice.
- :func:`score_histogram_figure` — member vs non-member attack scores, per slice.
- :func:`privacy_utility_figure` — test accuracy vs attack advantage (TPR − FAR) per epoch, colored by epoch.

Example:
    >>> rows = [{"epoch": 0, "feature": "loss", "attack": "threshold", "slice": "all", "balanced_accuracy": 0.55,
    ...          "far": 0.4, "train_acc": 0.7, "test_acc": 0.65}]
    >>> fig = training_progress_figure(rows, "loss", "threshold", es_epochs={"es_patience_3": 0})
    >>> len(fig.axes) >= 3
    True
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_mia.layout import SLICES, RunLayout, score_key
from lightning_mia.validation import as_float as _f

SLICE_TITLES = {"all": "All samples", "correct": "Correctly classified", "misclassified": "Misclassified"}
PredictionSource = Union[str, Mapping[str, np.ndarray]]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_f(r.get(key)) for r in rows], dtype=float)


def _slice_rows(history_rows, feature, attack, slice_):
    rows = [r for r in history_rows if r.get("feature") == feature and r.get("attack") == attack
            and r.get("slice") == slice_ and r.get("epoch") is not None]
    return sorted(rows, key=lambda r: int(r["epoch"]))


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def safe_name(text: str) -> str:
    """A file-name-safe version of a feature/attack name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save ``fig`` as PNG and return ``path``: rendered in memory, then written atomically
    (:func:`lightning_mia.io.atomic_save_figure`: parent folders created, mode ``0666 & ~umask``, a symlink at
    ``path`` replaced rather than followed), like every other file of a run."""
    from lightning_mia.io import atomic_save_figure

    atomic_save_figure(fig, path, format="png", dpi=dpi, facecolor="white")
    return path


def figure_to_array(fig) -> np.ndarray:
    """Render ``fig`` to an ``(H, W, 3)`` uint8 RGB array (for TensorBoard images)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _es_label(name: str) -> str:
    if name.startswith("es_patience_"):
        return "ES p=" + name[len("es_patience_"):]
    return "best val." if name == "best_val" else name


def _legend_below(fig, axes, handles, labels, ncol: Optional[int] = None) -> None:
    """One figure legend under the panels (matplotlib >= 3.7 places it outside the constrained layout)."""
    ncol = ncol or min(len(labels), 6)
    try:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    except (ValueError, TypeError):  # matplotlib < 3.7: no "outside" locations
        axes[0].legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=ncol)


# ---- training progress -----------------------------------------------------------------------------------------
def training_progress_figure(
    history_rows: Sequence[Mapping[str, Any]],
    feature: str,
    attack: str,
    es_epochs: Optional[Mapping[str, Optional[int]]] = None,
    slices: Sequence[str] = SLICES,
    title: Optional[str] = None,
):
    """Three-panel training-progress plot for one feature/attack (paper supplementary Figs. 3–8).

    Each panel (one slice) shows attack balanced accuracy and FAR with ± std bands, target train/test accuracy,
    the 0.5 chance level, the number of members in the slice (right axis: the paper's caveat that late in
    training only a handful of members remain misclassified) and vertical lines at ``es_epochs`` (name ->
    epoch, e.g. ``{"es_patience_5": 12, "best_val": 9}``; ``None`` entries — rules that never stopped — are
    skipped). NaN values leave gaps; a slice without
    rows says "no data".
    """
    fig = _figure(5.0 * len(slices), 4.0)
    axes = fig.subplots(1, len(slices), sharey=True, squeeze=False)[0]
    es = [(n, int(e)) for n, e in (es_epochs or {}).items() if e is not None]
    es_colors = _cmap("Greys")(np.linspace(0.45, 0.85, max(len(es), 1)))
    twin_handles: Dict[str, Any] = {}
    for ax, slice_ in zip(axes, slices):
        rows = _slice_rows(history_rows, feature, attack, slice_)
        ax.set_title(SLICE_TITLES.get(slice_, slice_))
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
        if not rows:
            _no_data(ax)
            continue
        ep = np.array([int(r["epoch"]) for r in rows], dtype=float)
        marker = dict(marker="o", markersize=3)  # single-epoch histories still show points
        for key, color, label in (("balanced_accuracy", "tab:blue", "attack balanced acc."),
                                  ("far", "tab:red", "attack FAR")):
            mean, std = _series(rows, key), _series(rows, f"{key}_std")
            ax.plot(ep, mean, color=color, label=label, **marker)
            ok = np.isfinite(mean) & np.isfinite(std)
            if ok.any():
                ax.fill_between(ep, np.where(ok, mean - std, np.nan), np.where(ok, mean + std, np.nan),
                                color=color, alpha=0.2, lw=0)
        ax.plot(ep, _series(rows, "train_acc"), color="tab:green", ls="--", label="train acc.", **marker)
        ax.plot(ep, _series(rows, "test_acc"), color="tab:orange", ls="--", label="test acc.", **marker)
        for (name, e), c in zip(es, es_colors):
            ax.axvline(e, color=c, lw=1.2, ls="-.", label=f"{_es_label(name)} (ep. {e})")
        n_mem = _series(rows, "n_members")
        if np.isfinite(n_mem).any():
            twin = ax.twinx()
            (line,) = twin.plot(ep, n_mem, color="tab:purple", lw=0.8, ls=":", alpha=0.7, label="members in slice")
            twin_handles.setdefault("members in slice (right axis)", line)
            ax.set_zorder(twin.get_zorder() + 1)  # keep the rates (and the legend) above the count axis
            ax.patch.set_visible(False)
            twin.set_ylim(bottom=0)
            if slice_ == slices[-1]:
                twin.set_ylabel("members in slice", color="tab:purple")
            twin.tick_params(axis="y", colors="tab:purple", labelsize=7)
        if len(ep) > 1:
            ax.set_xlim(ep.min() - 0.5, ep.max() + 0.5)
    axes[0].set_ylabel("rate")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # legend entries from whichever panel has data
        h, l = ax.get_legend_handles_labels()
        if len(l) > len(labels):
            handles, labels = h, l
    handles, labels = list(handles) + list(twin_handles.values()), list(labels) + list(twin_handles)
    if handles:  # below the panels: inside one it would hide the early epochs' curves
        _legend_below(fig, axes, handles, labels)
    fig.suptitle(title or f"Training progress and MI attack — {feature} / {attack}")
    return fig


# ---- predictions -------------------------------------------------------------------------------------------------
def prediction_files(run_dir: str) -> Dict[int, str]:
    """``{epoch: path}`` of a run's predictions files (see :meth:`lightning_mia.layout.RunLayout.prediction_files`)."""
    return RunLayout(run_dir).prediction_files()


def load_predictions(source: PredictionSource) -> Dict[str, np.ndarray]:
    """Arrays of a predictions file (path) or pass a mapping through."""
    if isinstance(source, str):
        with np.load(source, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    return dict(source)


def _slice_mask(pred: Mapping[str, np.ndarray], slice_: str) -> np.ndarray:
    n = len(pred["is_member"])
    correct = np.asarray(pred.get("correct", np.ones(n, bool))).astype(bool)
    if slice_ == "all":
        return np.ones(n, bool)
    if slice_ == "correct":
        return correct
    if slice_ == "misclassified":
        return ~correct
    raise ValueError(f"unknown slice {slice_!r}; allowed: {SLICES}")


def eval_scores(pred: Mapping[str, np.ndarray], feature: str, attack: str, slice_: str = "all"
                ) -> Tuple[np.ndarray, np.ndarray]:
    """``(is_member, score)`` of the evaluation split (finite score, ``fold == 1`` when present) in a slice."""
    key = score_key(feature, attack)
    if key not in pred:
        raise KeyError(f"{key!r} not in predictions; available: {sorted(k for k in pred if k.startswith('score__'))}")
    score = np.asarray(pred[key], dtype=float)
    mask = np.isfinite(score) & _slice_mask(pred, slice_)
    if "fold" in pred:
        mask &= np.asarray(pred["fold"]) == 1
    return np.asarray(pred["is_member"]).astype(bool)[mask], score[mask]


def roc_figure(
    predictions: Mapping[int, PredictionSource],
    feature: str,
    attack: str,
    slices: Sequence[str] = SLICES,
    title: Optional[str] = None,
):
    """Attack ROC curves (log-log) at several epochs, one panel per slice.

    ``predictions`` maps epoch -> predictions file path (or loaded arrays). Zero FPR/TPR points cannot be shown
    on log axes and are masked; the x range starts at half of 1 / (number of non-members). A slice with one class
    only says so.
    """
    from sklearn.metrics import roc_auc_score, roc_curve
    fig = _figure(4.2 * len(slices), 4.0)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    epochs = sorted(predictions)
    colors = _cmap("viridis")(np.linspace(0.0, 0.9, max(len(epochs), 1)))
    loaded = {e: load_predictions(predictions[e]) for e in epochs}
    for ax, slice_ in zip(axes, slices):
        ax.set_title(SLICE_TITLES.get(slice_, slice_))
        ax.set_xscale("log", nonpositive="mask")
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("false positive rate (FAR)")
        lo, drawn = 1.0, 0
        for e, c in zip(epochs, colors):
            y, s = eval_scores(loaded[e], feature, attack, slice_)
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = roc_curve(y, s)
            lo = min(lo, 0.5 / (~y).sum())
            ax.plot(fpr, tpr, color=c, lw=1.3, label=f"epoch {e} (AUC {roc_auc_score(y, s):.3f})")
            drawn += 1
        if not drawn:
            _no_data(ax, "needs members and non-members")
            continue
        ax.plot([lo, 1], [lo, 1], color="0.6", ls=":", lw=0.8, label="chance")
        ax.set_xlim(lo, 1.05)
        ax.set_ylim(lo, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true positive rate")
    fig.suptitle(title or f"Attack ROC — {feature} / {attack}")
    return fig


def _score_axis(scores: np.ndarray) -> Tuple[str, np.ndarray]:
    """How to draw a score histogram: ``("linear", s)``, ``("log", s)`` or ``("neglog", -s)``.

    Scores spanning more than two decades on one side of zero (losses: the ``loss`` threshold attack scores
    ``-loss``, most members near 0 and a long tail of large losses) are drawn on a log axis, of ``-score`` when
    they are all <= 0; everything else on a linear axis.
    """
    s = scores[np.isfinite(scores)]
    if not s.size:
        return "linear", scores
    for kind, v in (("log", s), ("neglog", -s)):
        if (v >= 0).all() and (v > 0).any():
            pos = v[v > 0]
            if pos.max() / pos.min() > 100:
                return kind, scores if kind == "log" else -scores
    return "linear", scores


def score_histogram_figure(
    prediction: PredictionSource,
    feature: str,
    attack: str,
    slices: Sequence[str] = SLICES,
    bins: int = 30,
    title: Optional[str] = None,
):
    """Member vs non-member attack-score histograms (evaluation split) per slice, as the fraction of each group
    per bin.

    Scores that span several decades (the ``loss`` threshold attack's ``-loss``) are drawn on a log axis (of
    ``-score`` when all are <= 0), so the members' near-zero losses do not pile into one bar; exact zeros go to
    the lowest bin.
    """
    pred = load_predictions(prediction)
    fig = _figure(4.2 * len(slices), 3.6)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    _, all_scores = eval_scores(pred, feature, attack, "all")
    kind, _ = _score_axis(all_scores)
    xlabel = {"linear": "attack score (higher = member)", "log": "attack score (log scale; higher = member)",
              "neglog": "−score, e.g. the loss (log scale; lower = member)"}[kind]
    for ax, slice_ in zip(axes, slices):
        ax.set_title(SLICE_TITLES.get(slice_, slice_))
        ax.set_xlabel(xlabel)
        y, s = eval_scores(pred, feature, attack, slice_)
        if not len(s):
            _no_data(ax)
            continue
        if kind == "linear":
            edges = np.histogram_bin_edges(s, bins=bins)
        else:
            v = s if kind == "log" else -s
            pos = v[v > 0]
            lo, hi = (pos.min(), pos.max()) if pos.size else (1e-12, 1.0)
            if hi <= lo:
                lo, hi = lo / 10, hi * 10
            edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
            s = np.clip(v, lo, hi)  # zeros (and rounding) into the end bins
            ax.set_xscale("log")
        for mask, color, label in ((y, "tab:red", "members"), (~y, "tab:blue", "non-members")):
            if mask.any():
                ax.hist(s[mask], bins=edges, color=color, alpha=0.5,
                        weights=np.full(int(mask.sum()), 1.0 / mask.sum()), label=f"{label} (n={int(mask.sum())})")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of the group")
    fig.suptitle(title or f"Attack scores — {feature} / {attack}")
    return fig


# ---- privacy vs utility --------------------------------------------------------------------------------------------
def privacy_utility_figure(
    history_rows: Sequence[Mapping[str, Any]],
    combos: Optional[Sequence[Tuple[str, str]]] = None,
    slice_: str = "all",
    title: Optional[str] = None,
):
    """Test accuracy (utility) vs attack advantage TPR − FAR (privacy loss) per monitored epoch, colored by epoch;
    one marker shape per feature/attack."""
    from matplotlib.colors import Normalize

    if combos is None:
        combos = list(dict.fromkeys((r["feature"], r["attack"]) for r in history_rows))
    fig = _figure(6.0, 4.5)
    ax = fig.subplots()
    rows_all = [r for r in history_rows if r.get("slice") == slice_ and r.get("epoch") is not None]
    epochs = [int(r["epoch"]) for r in rows_all]
    norm = Normalize(vmin=min(epochs, default=0), vmax=max(max(epochs, default=1), min(epochs, default=0) + 1))
    markers = "os^Dv<>Ph*X"
    sc, drawn = None, 0
    for i, (feature, attack) in enumerate(combos):
        rows = _slice_rows(history_rows, feature, attack, slice_)
        x = _series(rows, "test_acc")
        adv = _series(rows, "tpr") - _series(rows, "far")
        ok = np.isfinite(x) & np.isfinite(adv)
        if not ok.any():
            continue
        ep = np.array([int(r["epoch"]) for r in rows], dtype=float)
        sc = ax.scatter(x[ok], adv[ok], c=ep[ok], cmap="viridis", norm=norm, marker=markers[i % len(markers)],
                        edgecolors="0.2", linewidths=0.4, label=f"{feature} / {attack}")
        drawn += 1
    ax.axhline(0.0, color="0.6", ls=":", lw=0.8)
    ax.set_xlabel("target test accuracy")
    ax.set_ylabel("attack advantage (TPR − FAR)")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="epoch")
        ax.legend(fontsize=7)
    else:
        _no_data(ax)
    ax.set_title(title or f"Privacy vs utility ({SLICE_TITLES.get(slice_, slice_).lower()})")
    return fig
