"""TensorBoard helpers for the audit: custom-scalars layout, score histograms, figures, text tables, HParams.

Every function takes a ``torch.utils.tensorboard.SummaryWriter`` (in Lightning: ``trainer.logger.experiment`` of a
``TensorBoardLogger``) and writes into that writer's run directory. Call them on rank zero only.

Tags (docs/design.md §4): the headline scalars ``mia/{feature}/{attack}/{slice}/{metric}`` (:data:`HEADLINE_METRICS`:
balanced accuracy, FAR, AUC, TPR at 1% / 0.1% FPR, the slice's member / non-member counts, and any
``epsilon_lb*``, ``tpr_at_*_lo`` / ``_hi`` and ``*_at_ratio_*`` columns) and ``target/{train,test}_{acc,loss}``;
with ``log_all_metrics`` every other history column under ``mia_detail/{feature}/{attack}/{slice}/{metric}``
(:func:`detail_tag`); ``mia/chance`` = 0.5 per audited epoch (the chance line of the custom-scalars charts).
Here: the layout that charts them, ``mia/{feature}/{attack}/scores/member`` and ``.../nonmember`` histograms.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> w = SummaryWriter(tempfile.mkdtemp())
    >>> add_custom_scalars_layout(w, [("loss", "threshold")])
    >>> add_text_table(w, "mia/report", "| a |\\n|---|\\n| 1 |", step=0)
    >>> w.close()
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_mia.layout import SLICES, metric_tag, score_tag, target_tag  # noqa: F401 - re-exported


#: The metrics logged under ``mia/{feature}/{attack}/{slice}/{metric}``: what a reader looks for first.
HEADLINE_METRICS: Tuple[str, ...] = (
    "balanced_accuracy", "far", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "n_members", "n_nonmembers")
#: Headline columns that exist only with some options: empirical epsilon lower bounds, confidence intervals of
#: TPR at low FPR, and the metrics at the member:non-member ratios of ``eval_ratios``.
_HEADLINE_PATTERNS = (
    re.compile(r"epsilon_lb\w*$"),
    re.compile(r"tpr_at_[\d.]+pct_fpr$"),
    re.compile(r"tpr_at_[\w.]+_(lo|hi)$"),
    re.compile(r"(balanced_accuracy|far|precision)_at_ratio_[\d.e+-]+$"),
)
#: Prefix of every other metric (``log_all_metrics``): ``zeror_*``, ``naive_*``, ``*_std``, precision/recall, ...
DETAIL_PREFIX = "mia_detail"
#: A constant 0.5 logged once per audited epoch: the chance line drawn in every custom-scalars chart.
CHANCE_TAG = "mia/chance"
CHANCE = 0.5


def is_headline_metric(name: str) -> bool:
    """True for the metrics logged under ``mia/`` (:data:`HEADLINE_METRICS` and the optional headline columns)."""
    if name in HEADLINE_METRICS:
        return True
    return not name.endswith("_std") and any(p.match(name) for p in _HEADLINE_PATTERNS)


def detail_tag(feature: str, attack: str, slice_: str, metric: str) -> str:
    """Scalar tag of a secondary metric: ``mia_detail/{feature}/{attack}/{slice}/{metric}``."""
    return f"{DETAIL_PREFIX}/{feature}/{attack}/{slice_}/{metric}"


def _exact(tag: str) -> str:
    # Custom-scalars chart entries are regexes matched with re.match; anchor and escape so that e.g. ".../far"
    # does not also pull in ".../far_std" and feature names with regex characters stay literal.
    return re.escape(tag) + "$"


def custom_scalars_layout(
    combos: Sequence[Tuple[str, str]], slices: Sequence[str] = SLICES
) -> Dict[str, Dict[str, list]]:
    """The layout dict for ``SummaryWriter.add_custom_scalars``.

    Per feature/attack a category with, for each slice, a balanced-accuracy chart and a FAR chart (side by side
    in TensorBoard's two-column grid), each with the chance line ``mia/chance``. TensorBoard colors the lines
    of a chart by run, not by tag, so balanced accuracy and FAR get charts of their own rather than two
    same-colored lines in one. And a ``target`` category (train/test accuracy; train/test loss).
    """
    chance = _exact(CHANCE_TAG)
    layout: Dict[str, Dict[str, list]] = {}
    for feature, attack in combos:
        charts: Dict[str, list] = {}
        for s in slices:
            for metric, name in (("balanced_accuracy", "balanced accuracy"), ("far", "FAR")):
                charts[f"{feature}/{attack} {s}: {name}"] = [
                    "Multiline", [_exact(metric_tag(feature, attack, s, metric)), chance]]
        layout[f"MIA {feature} / {attack}"] = charts
    layout["target"] = {
        "train / test accuracy": ["Multiline", [_exact(target_tag("train_acc")), _exact(target_tag("test_acc"))]],
        "train / test loss": ["Multiline", [_exact(target_tag("train_loss")), _exact(target_tag("test_loss"))]],
    }
    return layout


def add_chance_line(writer, epoch: int) -> None:
    """Log ``mia/chance`` = 0.5 at ``epoch`` (call once per audited epoch)."""
    writer.add_scalar(CHANCE_TAG, CHANCE, int(epoch))


def add_custom_scalars_layout(writer, combos: Sequence[Tuple[str, str]], slices: Sequence[str] = SLICES) -> None:
    """Write the custom-scalars layout (TensorBoard "Custom Scalars" tab). Call once per run with every
    (feature, attack) combination: TensorBoard keeps one layout per run."""
    writer.add_custom_scalars(custom_scalars_layout(combos, slices))


def add_score_histograms(writer, feature: str, attack: str, epoch: int, member_scores, nonmember_scores) -> None:
    """Histograms of member / non-member attack scores at ``epoch`` (NaN scores dropped; empty groups skipped)."""
    for group, scores in (("member", member_scores), ("nonmember", nonmember_scores)):
        s = _to_numpy(scores).astype(np.float64).ravel()
        s = s[np.isfinite(s)]
        if s.size:
            writer.add_histogram(score_tag(feature, attack, group), s, int(epoch))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image_array(item: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a matplotlib Figure or a PNG path."""
    if isinstance(item, str):
        import matplotlib.image as mpimg

        img = mpimg.imread(item)
        if img.dtype != np.uint8:  # PNGs read as floats in [0, 1]
            img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img[..., :3]
    from lightning_mia.report.plots import figure_to_array

    return figure_to_array(item)


def add_figures(writer, figures: Mapping[str, Any], step: int) -> None:
    """Add figures as images; ``figures`` maps tag -> matplotlib Figure or PNG path. Figures are rendered with
    the Agg canvas directly (no pyplot, no screen needed)."""
    for tag, item in figures.items():
        writer.add_image(tag, _image_array(item), int(step), dataformats="HWC")


def add_text_table(writer, tag: str, markdown: str, step: int) -> None:
    """Add a markdown text (e.g. the early-stopping table) to the Text tab."""
    writer.add_text(tag, markdown, int(step))


HParamValue = Union[int, float, str, bool]


def _hparam_value(v: Any) -> Optional[HParamValue]:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return str(v)  # lists, dicts, paths: shown as text rather than rejected


def add_hparams(writer, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
    """HParams-tab entry for this run, written into the writer's own run directory.

    ``SummaryWriter.add_hparams`` writes into a new timestamped sub-directory (a separate "run"), which splits
    one training run in two in TensorBoard. Here the three hparams summaries from
    ``torch.utils.tensorboard.summary.hparams`` go to the writer's own file writer, and each metric is a scalar
    in the same run (use tags not otherwise logged, e.g. ``hparams/final_balanced_accuracy``). Values that are
    not bool/int/float/str become strings; NaN metrics are skipped.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    hp = {str(k): _hparam_value(v) for k, v in hparams.items()}
    mt = {str(k): float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))}
    exp, ssi, sei = hparams_summaries(hp, mt)
    file_writer = writer._get_file_writer()  # the same private accessor Lightning's TensorBoardLogger uses
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary, step)
    for k, v in mt.items():
        writer.add_scalar(k, v, step)
