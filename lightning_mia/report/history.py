"""Reading and atomically writing ``mia/history.csv`` (its columns: :data:`lightning_mia.layout.HISTORY_COLUMNS`).

The history is long format: one row per (epoch, feature, attack, slice). The file is always rewritten whole
through a temp file + fsync + rename, so a kill at any moment leaves either the old or the new file, never a
half-written one.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> p = os.path.join(d, "history.csv")
    >>> append_rows(p, [{"epoch": 0, "feature": "loss", "attack": "threshold", "slice": "all",
    ...                  "balanced_accuracy": 0.61}])
    >>> rows = read_history(p)
    >>> rows[0]["balanced_accuracy"], rows[0]["far"] != rows[0]["far"]   # missing -> NaN
    (0.61, True)
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from lightning_mia.io import atomic_write_bytes, atomic_write_text  # noqa: F401 - re-exported
from lightning_mia.layout import HISTORY_COLUMNS, INT_COLUMNS, KEY_COLUMNS, STR_COLUMNS  # noqa: F401

def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.floating):
            return "" if np.isnan(value) else repr(float(value))
        if isinstance(value, np.integer):
            return str(int(value))
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def _parse(column: str, text: str) -> Any:
    if column in STR_COLUMNS:
        return text
    if text == "":
        return float("nan") if column not in INT_COLUMNS else None
    if column in INT_COLUMNS:
        return int(float(text))
    try:
        return float(text)
    except ValueError:
        return text


def read_history(path: str) -> List[Dict[str, Any]]:
    """Rows of a history CSV; numbers parsed, empty cells -> NaN. Missing file -> ``[]``."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = []
        for raw in reader:
            rows.append({c: _parse(c, raw.get(c) or "") for c in fields})
    return rows


def columns_for(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Contracted columns first, then any extra keys in sorted order."""
    extra = sorted({k for r in rows for k in r} - set(HISTORY_COLUMNS))
    return list(HISTORY_COLUMNS) + extra


def write_history(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the whole history atomically."""
    import io

    cols = columns_for(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _fmt(r.get(c)) for c in cols})
    atomic_write_text(path, buf.getvalue())


def append_rows(path: str, new_rows: Iterable[Mapping[str, Any]], *, replace_from_epoch: Optional[int] = None) -> None:
    """Append rows; rows of epochs >= ``replace_from_epoch`` already in the file are dropped first (resume)."""
    old = read_history(path)
    new_rows = list(new_rows)
    if replace_from_epoch is None and new_rows:
        replace_from_epoch = min(int(r["epoch"]) for r in new_rows)
    if replace_from_epoch is not None:
        old = [r for r in old if r.get("epoch") is None or int(r["epoch"]) < replace_from_epoch]
    write_history(path, old + new_rows)


def truncate_history(path: str, keep_below_epoch: int) -> None:
    """Drop rows of epochs >= ``keep_below_epoch`` (used on resume from an earlier checkpoint)."""
    rows = read_history(path)
    if rows:
        write_history(path, [r for r in rows if r.get("epoch") is not None and int(r["epoch"]) < keep_below_epoch])
