import csv
import math
import os

from lightning_mia.report.history import HISTORY_COLUMNS, append_rows, read_history, truncate_history


def _row(epoch, slice_="all", **kw):
    return {"epoch": epoch, "feature": "loss", "attack": "threshold", "slice": slice_, **kw}


def test_columns_contract_and_nan_cells(tmp_path):
    p = str(tmp_path / "history.csv")
    append_rows(p, [_row(0, balanced_accuracy=0.7, far=float("nan"), extra_metric=1.5)])
    with open(p) as fh:
        header = next(csv.reader(fh))
    assert header[: len(HISTORY_COLUMNS)] == list(HISTORY_COLUMNS)
    assert header[-1] == "extra_metric"
    row = read_history(p)[0]
    assert row["balanced_accuracy"] == 0.7 and math.isnan(row["far"]) and row["epoch"] == 0


def test_append_replaces_rewritten_epochs(tmp_path):
    p = str(tmp_path / "history.csv")
    for e in range(4):
        append_rows(p, [_row(e, balanced_accuracy=e / 10), _row(e, "correct", balanced_accuracy=e / 10)])
    # a resumed run audits epoch 2 again: old rows of epochs >= 2 go, nothing is duplicated
    append_rows(p, [_row(2, balanced_accuracy=0.99)])
    rows = read_history(p)
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]
    assert rows[-1]["balanced_accuracy"] == 0.99
    truncate_history(p, 1)
    assert [r["epoch"] for r in read_history(p)] == [0, 0]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temp files left behind
