"""TensorBoard helpers for the audit: custom-scalars layout, score histograms, figures, text tables, HParams.

Every function takes a ``torch.utils.tensorboard.SummaryWriter`` (in Lightning: ``trainer.logger.experiment`` of a
``TensorBoardLogger``) and writes into that writer's run directory. Call them on rank zero only.

Tags (docs/design.md §4): scalars ``mia/{feature}/{attack}/{slice}/{metric}`` and ``target/{train,test}_{acc,loss}``
(written by the monitor); here: the layout that charts them together, ``mia/{feature}/{attack}/scores/member``
and ``.../nonmember`` histograms.

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


def _exact(tag: str) -> str:
    # Custom-scalars chart entries are regexes matched with re.match; anchor and escape so that e.g. ".../far"
    # does not also pull in ".../far_std" and feature names with regex characters stay literal.
    return re.escape(tag) + "$"


def custom_scalars_layout(
    combos: Sequence[Tuple[str, str]], slices: Sequence[str] = SLICES
) -> Dict[str, Dict[str, list]]:
    """The layout dict for ``SummaryWriter.add_custom_scalars``: per feature/attack a category with one chart per
    slice (balanced accuracy + FAR), and a ``target`` category (train/test accuracy; train/test loss)."""
    layout: Dict[str, Dict[str, list]] = {}
    for feature, attack in combos:
        layout[f"MIA {feature} / {attack}"] = {
            f"{feature}/{attack} {s}: balanced accuracy & FAR": [
                "Multiline", [_exact(metric_tag(feature, attack, s, "balanced_accuracy")),
                              _exact(metric_tag(feature, attack, s, "far"))]]
            for s in slices
        }
    layout["target"] = {
        "train / test accuracy": ["Multiline", [_exact(target_tag("train_acc")), _exact(target_tag("test_acc"))]],
        "train / test loss": ["Multiline", [_exact(target_tag("train_loss")), _exact(target_tag("test_loss"))]],
    }
    return layout


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
