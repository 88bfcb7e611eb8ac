"""What the monitor does when fitting ends: the report, the early-stopping table printed and in TensorBoard."""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lightning_mia import layout as L

#: Values of the printed table that may be undefined (shown as "–", explained once under the table).
_MAYBE_UNDEFINED = ("train_acc", "test_acc", "balanced_accuracy", "far", "tpr_at_0.1pct_fpr")


def table_notes(rows: List[Mapping[str, Any]], min_slice_count: Optional[int] = None) -> List[str]:
    """The footnotes a comparison table needs: what "(small)" means, what "–" means; each only when it occurs."""
    from lightning_mia.report.tables import MIN_SLICE_COUNT, UNDEFINED_NOTE, has_undefined

    notes = []
    if any(r.get("small_slice") for r in rows):
        n = MIN_SLICE_COUNT if min_slice_count is None else min_slice_count
        notes.append(f"(small) = fewer than {n} members or non-members in the slice at that epoch: its rates rest "
                     "on a handful of samples, and max_leakage skips such epochs.")
    if has_undefined(rows, _MAYBE_UNDEFINED):
        notes.append(UNDEFINED_NOTE)
    return notes


def summary_table(table: List[Mapping[str, Any]], feature: str, attack: str, notes: bool = True) -> str:
    """Markdown early-stopping comparison of one feature/attack across slices (with its footnotes)."""
    from lightning_mia.report.tables import markdown_table, pm, slice_cell

    rows = [r for r in table if r["feature"] == feature and r["attack"] == attack]
    text = markdown_table(rows, [
        ("slice", slice_cell), ("point", "point"), ("epoch", "monitored_epoch"), ("train acc", "train_acc"),
        ("test acc", "test_acc"), ("balanced acc. ± std", lambda r: pm(r, "balanced_accuracy")),
        ("FAR ± std", lambda r: pm(r, "far")), ("TPR@0.1%FPR", "tpr_at_0.1pct_fpr"),
        ("misclassified members", "n_misclassified_members")])
    extra = table_notes(rows) if notes else []
    return "\n".join([text, ""] + extra) if extra else text


def finish_run(run_dir: str, writer: Any = None, hparams: Optional[Mapping[str, Any]] = None,
               step: int = 0) -> Tuple[str, str]:
    """Write the report of ``run_dir``; with a TensorBoard ``writer`` also log the comparison tables as text, the
    report figures as images and an HParams entry with final and early-stopping-epoch metrics.

    Returns ``(report_path, printable_summary)``.
    """
    from lightning_mia.report import load_run, write_report
    from lightning_mia.report.tables import combos, comparison_table

    path = write_report(run_dir)
    run = load_run(run_dir)
    table = comparison_table(run["rows"], run["es"])
    pairs = combos(run["rows"])
    head = summary_table(table, *pairs[0]) if pairs else ""
    summary = f"Early-stopping comparison ({pairs[0][0]} / {pairs[0][1]}):\n{head}" if pairs else ""
    if writer is not None:
        from lightning_mia.report import tensorboard as tb

        for f, a in pairs:
            tb.add_text_table(writer, L.early_stopping_text_tag(f, a), summary_table(table, f, a), step)
        figures = sorted(glob.glob(os.path.join(os.path.dirname(path), L.FIGURES_DIR, "*.png")))
        tb.add_figures(writer, {L.figure_tag(os.path.splitext(os.path.basename(p))[0]): p for p in figures}, step)
        metrics: Dict[str, float] = {}
        # final, best-validation and early-stopping epochs, on all samples; in that order, which is the order of
        # the HParams table's columns (the final numbers first)
        rank = {"final": 0, "best_val": 1}
        picked = [r for r in table if r["slice"] == "all" and r["point"] != "max_leakage"]
        for r in sorted(picked, key=lambda r: rank.get(r["point"], 2)):  # stable: ES rules keep their order
            for k in ("balanced_accuracy", "far"):
                metrics[L.hparam_tag(r["feature"], r["attack"], r["point"], k)] = r[k]
            metrics[L.hparam_tag(r["point"], "test_acc")] = r["test_acc"]
        tb.add_hparams(writer, dict(hparams or {}), metrics, step)
        writer.flush()
    return path, summary
