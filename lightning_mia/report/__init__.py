"""Privacy report of a finished (or running) audit, from the files in its run directory — no re-training.

``write_report(run_dir)`` reads ``{run_dir}/mia/history.csv`` (docs/design.md §4), ``mia/early_stopping.json`` when
present (otherwise early stopping is recomputed from the history's ``test_loss``) and
``mia/predictions/epoch_NNNN.npz`` when present, and writes ``report.md``, ``early_stopping.csv`` and
``figures/*.png`` into ``{run_dir}/mia`` (or ``out``). ``compare_runs`` overlays several runs.

Command-line entries for the ``lightning-mia`` CLI: :func:`main_report` (``report RUN_DIR [--out DIR]``, default
``RUN_DIR/mia``) and :func:`main_compare` (``compare RUN_DIR... [--out DIR]``, default ``mia_compare`` in the
runs' common parent folder: :func:`default_compare_out`).

Example:
    >>> write_report("runs/digits/version_0")            # doctest: +SKIP
    'runs/digits/version_0/mia/report.md'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

# Light imports only: the training callbacks import lightning_mia.report.history, and matplotlib is not needed
# until a report is written.
from lightning_mia.layout import EARLY_STOPPING_CSV, FIGURES_DIR, REPORT_MD, RunLayout, score_key
from lightning_mia.report.history import read_history

__all__ = ["write_report", "compare_runs", "main_report", "main_compare", "load_run", "default_compare_out"]


def load_run(run_dir: str) -> Dict[str, Any]:
    """History rows and early-stopping results of a run directory.

    Raises ``FileNotFoundError`` when ``{run_dir}/mia/history.csv`` is missing and ``ValueError`` when it has no
    rows. Returns ``{"rows", "es", "history_path"}``; ``es["source"]`` says whether early stopping came from the
    callback's ``early_stopping.json`` or was recomputed from ``test_loss``.
    """
    from lightning_mia.report.tables import es_results_from_history

    layout = RunLayout(run_dir)
    path = layout.history
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no membership-inference history at {path!r}: RUN_DIR must be a run directory (the TensorBoard "
            "logger's log_dir) of a training run with the MembershipInferenceMonitor callback")
    rows = read_history(path)
    if not rows:
        raise ValueError(f"{path!r} has no rows yet: the monitor has not finished an audit in this run")
    es_path = layout.early_stopping_json  # EarlyStoppingComparison's file
    if os.path.isfile(es_path):
        with open(es_path) as fh:
            es = json.load(fh)
    else:  # recomputing needs lightning_mia.callbacks.early_stopping (imports pytorch_lightning): only then
        es = es_results_from_history(rows)
    return {"rows": rows, "es": es, "history_path": path}


def _pick_epochs(available: Sequence[int], targets: Sequence[Optional[int]], limit: int = 5) -> List[int]:
    """For each target the nearest available epoch at or before it (else the first one), de-duplicated."""
    picked: List[int] = []
    for t in targets:
        if t is None or not available:
            continue
        before = [e for e in available if e <= t]
        e = max(before) if before else available[0]
        if e not in picked:
            picked.append(e)
    return sorted(picked)[:limit]


def _slice_cell(r: Mapping[str, Any]) -> str:
    from lightning_mia.report.tables import slice_cell

    return slice_cell(r)


_TABLE_COLUMNS = [
    ("slice", _slice_cell), ("point", "point"), ("epoch", "epoch"), ("monitored", "monitored_epoch"),
    ("train acc", "train_acc"), ("test acc", "test_acc"), ("gap", "gap"),
]


def _report_columns():
    from lightning_mia.report.tables import pm

    return _TABLE_COLUMNS + [
        ("balanced acc. ± std", lambda r: pm(r, "balanced_accuracy")), ("FAR ± std", lambda r: pm(r, "far")),
        ("TPR@0.1%FPR", "tpr_at_0.1pct_fpr"), ("members / non-members", lambda r: _counts(r)),
        ("scored", lambda r: _counts(r, "n_eval_")), ("misclassified members", "n_misclassified_members"),
        ("note", "note"),
    ]


def _counts(r: Mapping[str, Any], prefix: str = "n_") -> str:
    from lightning_mia.report.console import _count

    m, n = _count(r.get(f"{prefix}members")), _count(r.get(f"{prefix}nonmembers"))
    return "–" if m is None and n is None else f"{m or '–'} / {n or '–'}"


def write_report(run_dir: str, out: Optional[str] = None, roc_epochs: Optional[Sequence[int]] = None,
                 min_slice_count: Optional[int] = None) -> str:
    """Write ``report.md`` (+ ``early_stopping.csv``, ``figures/*.png``) for a run; returns the report path.

    Args:
        run_dir: the run directory containing ``mia/history.csv``.
        out: output folder (default ``{run_dir}/mia``).
        roc_epochs: epochs for ROC curves (nearest saved predictions at or before each); default: first saved,
            early-stopping epochs, max-leakage epoch and last saved. Ignored when no predictions were saved.
        min_slice_count: smallest slice (members and non-members) a max-leakage epoch may have (default
            :data:`lightning_mia.report.tables.MIN_SLICE_COUNT`); smaller slices are marked "(small)".
    """
    from lightning_mia.report import plots
    from lightning_mia.report.tables import (
        MIN_SLICE_COUNT, UNDEFINED_NOTE, combos as table_combos, comparison_table, fmt, markdown_table,
        write_early_stopping_csv)

    run = load_run(run_dir)
    rows, es = run["rows"], run["es"]
    layout = RunLayout(run_dir)
    out = out or layout.mia
    fig_dir = os.path.join(out, FIGURES_DIR)
    os.makedirs(fig_dir, exist_ok=True)

    min_slice_count = MIN_SLICE_COUNT if min_slice_count is None else int(min_slice_count)
    table = comparison_table(rows, es, min_slice_count=min_slice_count)
    csv_path = write_early_stopping_csv(run_dir, table, path=os.path.join(out, EARLY_STOPPING_CSV))
    es_epochs = {r["name"]: r.get("stop_epoch") for r in es.get("rules", [])}
    preds = layout.prediction_files()
    pairs = table_combos(rows)
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("epoch") is not None})

    def rel(path: str) -> str:
        return os.path.relpath(path, out).replace(os.sep, "/")

    md: List[str] = ["# Membership-inference privacy report", ""]
    md += [f"- run: `{os.path.abspath(run_dir)}`",
           f"- monitored epochs: {len(epochs)} ({epochs[0]}–{epochs[-1]})",
           f"- features / attacks: {', '.join(f'{f} / {a}' for f, a in pairs)}",
           f"- predictions saved for epochs: {', '.join(map(str, preds)) if preds else 'none'}",
           f"- comparison table: `{rel(csv_path)}`", ""]

    md += ["## Early stopping", ""]
    if es.get("source") == "callback":
        md.append(f"From `EarlyStoppingComparison` (monitor `{es.get('monitor')}`, mode {es.get('mode')}, "
                  f"min_delta {es.get('min_delta')}; patience counts validation checks).")
    else:
        md.append("No `early_stopping.json` in this run: recomputed from the history's `test_loss` with Lightning's "
                  "rule (mode min, min_delta 0); patience counts *monitored* epochs here.")
    md += ["", markdown_table(es.get("rules", []), [
        ("rule", "name"), ("patience", "patience"), ("would stop at epoch", lambda r: r.get("stop_epoch")
                                                     if r.get("stop_epoch") is not None else "did not stop"),
        ("best epoch", "best_epoch"), ("best value", "best_value"), ("reason", "reason")], digits=4),
        "", f"Best validation epoch: {es.get('best_epoch')} (value {fmt(es.get('best_value'), 4)}); "
        f"last epoch: {es['last_epoch'] if es.get('last_epoch') is not None else epochs[-1]}.", ""]

    for feature, attack in pairs:
        name = f"{plots.safe_name(feature)}__{plots.safe_name(attack)}"
        md += [f"## {feature} / {attack}", ""]
        fig = plots.training_progress_figure(rows, feature, attack,
                                             es_epochs={**es_epochs, "best_val": es.get("best_epoch")})
        p = plots.save_figure(fig, os.path.join(fig_dir, f"progress__{name}.png"))
        md += [f"![training progress]({rel(p)})", ""]
        sub = [r for r in table if r["feature"] == feature and r["attack"] == attack]
        md += [markdown_table(sub, _report_columns()), ""]
        have = {e: path for e, path in preds.items() if _has_scores(path, feature, attack)}
        if have:
            avail = sorted(have)
            leak = [r for r in sub if r["slice"] == "all" and r["point"] == "max_leakage"]
            targets = list(roc_epochs) if roc_epochs else (
                [avail[0]] + [e for e in es_epochs.values()] + [leak[0]["epoch"] if leak else None, avail[-1]])
            chosen = _pick_epochs(avail, targets, limit=len(targets) if roc_epochs else 5)
            fig = plots.roc_figure({e: have[e] for e in chosen}, feature, attack)
            p = plots.save_figure(fig, os.path.join(fig_dir, f"roc__{name}.png"))
            md += [f"ROC curves (evaluation split) at epochs {', '.join(map(str, chosen))}:", "",
                   f"![ROC]({rel(p)})", ""]
            fig = plots.score_histogram_figure(have[avail[-1]], feature, attack,
                                               title=f"Attack scores at epoch {avail[-1]} — {feature} / {attack}")
            p = plots.save_figure(fig, os.path.join(fig_dir, f"scores__{name}__epoch_{avail[-1]:04d}.png"))
            md += [f"![scores]({rel(p)})", ""]

    fig = plots.privacy_utility_figure(rows, pairs)
    p = plots.save_figure(fig, os.path.join(fig_dir, "privacy_utility.png"))
    md += ["## Privacy vs utility", "", f"![privacy vs utility]({rel(p)})", ""]
    md += ["## Reading the tables", "",
           "- *point*: `es_patience_P` = where early stopping with patience P would have stopped; `best_val` = best "
           "validation epoch; `max_leakage` = highest attack balanced accuracy on that slice; `final` = last "
           "monitored epoch. *monitored* is the history epoch used when the exact epoch was not audited.",
           "- *misclassified members*: members the target misclassifies at that epoch. High attack accuracy on the "
           "misclassified slice late in training concerns only this many training samples (Rezaei & Liu 2021, "
           "supplementary: \"after epoch 160, there are only a handful of misclassified training samples\").",
           f"- *(small)*: fewer than {min_slice_count} members or non-members in the slice at that epoch; its rates "
           "rest on a handful of samples, so *max_leakage* skips such epochs.",
           "- *scored*: members / non-members in the evaluation split the rates are measured on (mean over the "
           "repeated splits); *members / non-members*: the whole slice.",
           f"- {UNDEFINED_NOTE}",
           "- FAR = non-members called members; balanced accuracy 0.5 = chance.", ""]
    from lightning_mia.io import atomic_write_text

    path = os.path.join(out, REPORT_MD)
    atomic_write_text(path, "\n".join(md))
    return path


def _has_scores(path: str, feature: str, attack: str) -> bool:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return score_key(feature, attack) in data.files


def compare_runs(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None) -> str:
    """Overlay several runs (see :func:`lightning_mia.report.compare.compare_runs`); returns the markdown path."""
    from lightning_mia.report.compare import compare_runs as _compare

    return _compare(run_dirs, out, labels=labels)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``(default: ...)`` after each option's help (options without a default or with a computed one say it in
    their help text); the description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def default_compare_out(run_dirs: Sequence[str]) -> str:
    """``compare``'s default output folder: ``mia_compare`` in the runs' common parent folder (for
    ``runs/a/version_0 runs/b/version_0``: ``runs/mia_compare``; for one run: next to it)."""
    parents = [os.path.dirname(os.path.normpath(os.path.abspath(d))) for d in run_dirs]
    try:
        common = os.path.commonpath(parents)
    except ValueError:  # different drives
        common = os.getcwd()
    out = os.path.join(common, "mia_compare")
    if not any(os.path.isabs(d) for d in run_dirs):  # relative in, relative out
        out = os.path.relpath(out)
    return out


def main_report(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-mia report RUN_DIR [--out DIR] [--roc-epochs E ...] [--min-slice-count N]``; prints the report
    path."""
    from lightning_mia.report.tables import MIN_SLICE_COUNT

    parser = argparse.ArgumentParser(
        prog="lightning-mia report", formatter_class=HelpFormatter,
        description="Write the privacy report of a run (report.md, early_stopping.csv, figures/*.png) from its\n"
                    "mia/ files, without re-training.",
        epilog="example:\n  lightning-mia report runs/quickstart/version_0")
    parser.add_argument("run_dir", help="run directory (TensorBoard logger log_dir) containing mia/history.csv")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/mia)")
    parser.add_argument("--roc-epochs", type=int, nargs="*", default=None,
                        help="epochs for ROC curves (default: the first saved, early-stopping, max-leakage and last "
                             "epochs)")
    parser.add_argument("--min-slice-count", type=int, default=MIN_SLICE_COUNT,
                        help="smallest slice (members and non-members) a max-leakage epoch may have; smaller "
                             "slices are marked (small)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, out=args.out, roc_epochs=args.roc_epochs,
                            min_slice_count=args.min_slice_count)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(path)
    return 0


def main_compare(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-mia compare RUN_DIR... [--out DIR] [--labels L ...]``; prints the summary path."""
    parser = argparse.ArgumentParser(
        prog="lightning-mia compare", formatter_class=HelpFormatter,
        description="Overlay the membership-inference audits of several runs: one figure per feature/attack\n"
                    "they share, and a summary table (compare.md).",
        epilog="example:\n  lightning-mia compare runs/alexnet/version_0 runs/resnet/version_0   "
               "# -> runs/mia_compare/compare.md")
    parser.add_argument("run_dirs", nargs="+", help="run directories containing mia/history.csv")
    parser.add_argument("--out", default=None,
                        help="output folder (default: mia_compare in the runs' common parent folder)")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per run (default: the folder names)")
    args = parser.parse_args(argv)
    out = args.out or default_compare_out(args.run_dirs)
    try:
        path = compare_runs(args.run_dirs, out, labels=args.labels)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_report())
