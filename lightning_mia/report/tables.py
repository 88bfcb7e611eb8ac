"""Early-stopping comparison tables from ``mia/history.csv`` (csv + numpy only, no pandas).

For each (feature, attack, slice) the table has one row per *point* of training:

- ``es_patience_P`` — where ``EarlyStopping(patience=P)`` would have stopped (from ``early_stopping.json``, or
  recomputed from the history's ``test_loss`` column);
- ``best_val`` — the epoch with the best monitored validation value (what ES + checkpointing would restore);
- ``max_leakage`` — the epoch with the highest attack balanced accuracy on that slice, among the epochs where the
  slice holds at least ``min_slice_count`` members and non-members (the misclassified slice late in training holds
  a handful of members, whose balanced accuracy is noise);
- ``final`` — the last monitored epoch.

Rows whose slice holds fewer than ``min_slice_count`` members or non-members at that epoch have
``small_slice = True`` (marked in the markdown tables). Undefined values are NaN (CSV: empty; markdown: "–"):
see :data:`UNDEFINED_NOTE`.

The MI monitor may run only every N epochs, so a point's epoch may have no history row; the row then uses the
nearest monitored epoch at or before it and says so in ``monitored_epoch`` (and ``note``).

Example:
    >>> rows = [{"epoch": e, "feature": "loss", "attack": "threshold", "slice": s, "balanced_accuracy": 0.5 + e / 100,
    ...          "train_acc": 0.6 + e / 50, "test_acc": 0.6, "test_loss": [1.0, 0.8, 0.9, 0.95][e],
    ...          "n_members": 5 if s == "misclassified" and e == 3 else 50, "n_nonmembers": 50}
    ...         for e in range(4) for s in ("all", "correct", "misclassified")]
    >>> table = comparison_table(rows, None)   # ES recomputed from test_loss with patiences 3, 5, 10
    >>> [(r["point"], r["epoch"], r["monitored_epoch"]) for r in table if r["slice"] == "all"][-3:]
    [('best_val', 1, 1), ('max_leakage', 3, 3), ('final', 3, 3)]
    >>> [(r["point"], r["epoch"], r["small_slice"]) for r in table if r["slice"] == "misclassified"][-2:]
    [('max_leakage', 2, False), ('final', 3, True)]
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lightning_mia.io import atomic_write_text
from lightning_mia.layout import SLICES, RunLayout
from lightning_mia.stopping import DEFAULT_PATIENCES
from lightning_mia.validation import as_float as _f
from lightning_mia.validation import is_finite as _finite

#: Columns of the comparison table / ``mia/early_stopping.csv``.
TABLE_COLUMNS = (
    "feature", "attack", "slice", "point", "epoch", "monitored_epoch", "train_acc", "test_acc", "gap",
    "balanced_accuracy", "balanced_accuracy_std", "far", "far_std", "tpr_at_0.1pct_fpr", "auc",
    "n_members", "n_nonmembers", "n_misclassified_members", "note",
    "n_eval_members", "n_eval_nonmembers", "small_slice",
)
#: Default smallest slice (members and non-members each) whose balanced accuracy can be the max-leakage point.
MIN_SLICE_COUNT = 20
#: Said once under every table with "–" cells.
UNDEFINED_NOTE = (
    "– = undefined: TPR at an FPR budget finer than 1 / (scored non-members) cannot be measured (one false alarm "
    "already exceeds it; 0.1% FPR needs 1000 scored non-members), and a slice without members or without "
    "non-members has no balanced accuracy.")



def combos(history_rows: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """(feature, attack) pairs in first-seen order."""
    seen: Dict[Tuple[str, str], None] = {}
    for r in history_rows:
        seen.setdefault((str(r["feature"]), str(r["attack"])), None)
    return list(seen)


def slices_in(history_rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Slices present, the standard three first in their usual order."""
    present = {str(r["slice"]) for r in history_rows}
    return [s for s in SLICES if s in present] + sorted(present - set(SLICES))


def epoch_series(history_rows: Sequence[Mapping[str, Any]], column: str) -> List[Tuple[int, float]]:
    """Per-epoch value of an epoch-level column (e.g. ``test_loss``): the first finite value among that epoch's
    rows, epochs whose rows are all empty/NaN left out; sorted by epoch."""
    out: Dict[int, float] = {}
    for r in history_rows:
        e = r.get("epoch")
        if e is None or int(e) in out:
            continue
        v = _f(r.get(column))
        if math.isfinite(v):
            out[int(e)] = v
    return sorted(out.items())


def es_results_from_history(
    history_rows: Sequence[Mapping[str, Any]], patiences: Sequence[int] = DEFAULT_PATIENCES
) -> Dict[str, Any]:
    """Early-stopping results recomputed from the history's ``test_loss`` (used when the run has no
    ``early_stopping.json``). Patience then counts *monitored* epochs, since that is all the history holds."""
    from lightning_mia.stopping import early_stopping_results

    pairs = epoch_series(history_rows, "test_loss")
    epochs = [int(r["epoch"]) for r in history_rows if r.get("epoch") is not None]
    return early_stopping_results(pairs, patiences, mode="min", monitor="test_loss", source="history.test_loss",
                                  last_epoch=max(epochs) if epochs else None)


def _rows_by_epoch(history_rows, feature, attack, slice_) -> Dict[int, Mapping[str, Any]]:
    return {int(r["epoch"]): r for r in history_rows
            if r.get("epoch") is not None and r["feature"] == feature and r["attack"] == attack
            and r["slice"] == slice_}


def _at_or_before(epochs: Sequence[int], target: int) -> Optional[int]:
    before = [e for e in epochs if e <= target]
    return max(before) if before else None


def slice_size(row: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The smaller of a history row's member and non-member counts (``None`` when it has neither)."""
    if not row:
        return None
    counts = [_f(row.get(k)) for k in ("n_members", "n_nonmembers")]
    counts = [c for c in counts if math.isfinite(c)]
    return min(counts) if counts else None


def is_small_slice(row: Optional[Mapping[str, Any]], min_slice_count: int = MIN_SLICE_COUNT) -> bool:
    """True when the row's slice holds fewer than ``min_slice_count`` members or non-members."""
    size = slice_size(row)
    return size is not None and size < min_slice_count


def comparison_table(
    history_rows: Sequence[Mapping[str, Any]], es_results: Optional[Mapping[str, Any]] = None,
    min_slice_count: int = MIN_SLICE_COUNT,
) -> List[Dict[str, Any]]:
    """Rows of the early-stopping comparison (columns :data:`TABLE_COLUMNS`).

    Args:
        history_rows: rows of ``mia/history.csv`` (:func:`lightning_mia.report.history.read_history`).
        es_results: the ``early_stopping.json`` content (:attr:`EarlyStoppingComparison.results`); ``None`` to
            recompute from the history's ``test_loss`` with patiences 3, 5, 10.
        min_slice_count: the ``max_leakage`` point ignores epochs where the slice holds fewer members or
            non-members than this (0: every epoch counts); rows below it get ``small_slice = True``.
    """
    min_slice_count = int(min_slice_count)
    if min_slice_count < 0:
        raise ValueError(f"min_slice_count must be >= 0, got {min_slice_count}")
    if es_results is None:
        es_results = es_results_from_history(history_rows)
    # Misclassified member counts per (feature, attack, epoch): the paper's caveat that late in training only a
    # handful of members are misclassified, so leakage on that slice concerns few samples.
    n_mis = {(r["feature"], r["attack"], int(r["epoch"])): r.get("n_members") for r in history_rows
             if r.get("slice") == "misclassified" and r.get("epoch") is not None}

    table: List[Dict[str, Any]] = []
    for feature, attack in combos(history_rows):
        for slice_ in slices_in([r for r in history_rows if r["feature"] == feature and r["attack"] == attack]):
            by_epoch = _rows_by_epoch(history_rows, feature, attack, slice_)
            epochs = sorted(by_epoch)
            if not epochs:
                continue
            final = epochs[-1]
            points: List[Tuple[str, Optional[int], Optional[int], str]] = []  # (point, epoch, monitored, note)
            for rule in es_results.get("rules", []):
                stop = rule.get("stop_epoch")
                if stop is None:
                    points.append((rule["name"], None, final, "did not stop: same as final"))
                else:
                    points.append((rule["name"], int(stop), *_resolve(epochs, int(stop))))
            best = es_results.get("best_epoch")
            if best is None:
                points.append(("best_val", None, None, "no finite validation value"))
            else:
                points.append(("best_val", int(best), *_resolve(epochs, int(best))))
            defined = [e for e in epochs if _finite(by_epoch[e].get("balanced_accuracy"))]
            leak = [(by_epoch[e]["balanced_accuracy"], e) for e in defined
                    if not is_small_slice(by_epoch[e], min_slice_count)]
            if leak:
                top = max(_f(v) for v, _ in leak)
                e_max = min(e for v, e in leak if _f(v) == top)  # first epoch on ties
                points.append(("max_leakage", e_max, e_max, ""))
            elif defined:
                points.append(("max_leakage", None, None, f"no epoch with >= {min_slice_count} members and "
                                                          "non-members in this slice"))
            else:
                points.append(("max_leakage", None, None, "balanced accuracy undefined at every epoch"))
            points.append(("final", final, final, ""))
            for point, epoch, monitored, note in points:
                row = by_epoch.get(monitored) if monitored is not None else None
                table.append(_table_row(feature, attack, slice_, point, epoch, monitored, note, row,
                                        n_mis.get((feature, attack, monitored)), min_slice_count))
    return table


def _resolve(epochs: Sequence[int], target: int) -> Tuple[Optional[int], str]:
    monitored = _at_or_before(epochs, target)
    if monitored is None:
        return None, f"no monitored epoch at or before {target}"
    if monitored != target:
        return monitored, f"epoch {target} not monitored: nearest earlier monitored epoch {monitored}"
    return monitored, ""


def _table_row(feature, attack, slice_, point, epoch, monitored, note, row, n_mis,
               min_slice_count: int = MIN_SLICE_COUNT) -> Dict[str, Any]:
    small = is_small_slice(row, min_slice_count)
    row = row or {}
    train, test = _f(row.get("train_acc")), _f(row.get("test_acc"))
    return {
        "feature": feature, "attack": attack, "slice": slice_, "point": point, "epoch": epoch,
        "monitored_epoch": monitored, "train_acc": train, "test_acc": test, "gap": train - test,
        "balanced_accuracy": _f(row.get("balanced_accuracy")),
        "balanced_accuracy_std": _f(row.get("balanced_accuracy_std")),
        "far": _f(row.get("far")), "far_std": _f(row.get("far_std")),
        "tpr_at_0.1pct_fpr": _f(row.get("tpr_at_0.1pct_fpr")), "auc": _f(row.get("auc")),
        "n_members": row.get("n_members"), "n_nonmembers": row.get("n_nonmembers"),
        "n_misclassified_members": n_mis, "note": note,
        "n_eval_members": _f(row.get("n_eval_members")), "n_eval_nonmembers": _f(row.get("n_eval_nonmembers")),
        "small_slice": small,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def table_to_csv(table: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """CSV text of a table (NaN/None -> empty cell, like history.csv)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({c: _cell(r.get(c)) for c in columns})
    return buf.getvalue()


def write_early_stopping_csv(run_dir: str, table: Sequence[Mapping[str, Any]], path: Optional[str] = None) -> str:
    """Write the table to ``{run_dir}/mia/early_stopping.csv`` (or ``path``) atomically; returns the path."""
    path = path or RunLayout(run_dir).early_stopping_csv
    atomic_write_text(path, table_to_csv(table))
    return path


Column = Union[str, Tuple[str, Union[str, Callable[[Mapping[str, Any]], Any]]]]


def fmt(value: Any, digits: int = 3) -> str:
    """A cell for markdown: floats to ``digits`` decimals, NaN/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def slice_cell(row: Mapping[str, Any]) -> str:
    """The slice name, marked ``(small)`` when the row's slice is below the table's minimum count."""
    return f"{row.get('slice')} (small)" if row.get("small_slice") else str(row.get("slice"))


def has_undefined(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> bool:
    """True when any of ``keys`` is NaN / missing in any row (the table shows "–" there)."""
    return any(not _finite(r.get(k)) for r in rows for k in keys)


def pm(row: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std`` cell from ``row[key]`` and ``row[key + '_std']``."""
    mean, std = _f(row.get(key)), _f(row.get(f"{key}_std"))
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], digits: int = 3) -> str:
    """A GitHub-markdown table.

    ``columns`` items are a key (header = key) or ``(header, key_or_callable)``; a callable gets the row and
    returns the cell. Floats are shown with ``digits`` decimals, NaN/None as "–"; ``|`` in cells is escaped.

    Example:
        >>> print(markdown_table([{"a": 1, "b": 0.51234}], ["a", ("b (rounded)", "b")]))
        | a | b (rounded) |
        |---|---|
        | 1 | 0.512 |
    """
    spec = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    lines = ["| " + " | ".join(h for h, _ in spec) + " |", "|" + "---|" * len(spec)]
    for r in rows:
        cells = []
        for _, getter in spec:
            v = getter(r) if callable(getter) else r.get(getter)
            cells.append(fmt(v, digits).replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
