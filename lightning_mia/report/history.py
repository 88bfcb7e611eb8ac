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


# ----------------------------------------------------------------------------------------------------------
# checking a history before a resumed run continues it
# ----------------------------------------------------------------------------------------------------------
_LOST = ("re-auditing a past epoch is impossible (it needs that epoch's model, which training has replaced), so "
         "the history continues without them")


def _fmt_epochs(epochs: Sequence[int]) -> str:
    epochs = sorted(epochs)
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else (
        f"{', '.join(map(str, epochs[:10]))}, ... ({len(epochs)} epochs)")


def _check_cell(path: str, line: int, column: str, text: str) -> Any:
    """Parse one cell strictly; a cell that is not what its column holds is a ValueError naming file and line."""
    if column in STR_COLUMNS:
        if column in KEY_COLUMNS and not text:
            raise ValueError(f"{path}, line {line}: the {column!r} cell is empty")
        return text
    if text == "":
        if column == "epoch":
            raise ValueError(f"{path}, line {line}: the 'epoch' cell is empty")
        return float("nan") if column not in INT_COLUMNS else None
    try:
        value = float(text)
    except ValueError:
        if column not in HISTORY_COLUMNS:  # an extra column may hold text (read_history keeps it as text)
            return text
        raise ValueError(f"{path}, line {line}: {column}={text[:40]!r} is not a number") from None
    if column in INT_COLUMNS:
        if not math.isfinite(value) or value != int(value) or (column == "epoch" and value < 0):
            raise ValueError(f"{path}, line {line}: {column}={text[:40]!r} is not a non-negative integer"
                             if column == "epoch" else f"{path}, line {line}: {column}={text[:40]!r} is not an integer")
        return int(value)
    return value


def validate_history(path: str, expected_epochs: Iterable[int] = ()) -> "tuple[List[Dict[str, Any]], List[str]]":
    """Read ``history.csv`` strictly, before a resumed run continues it: ``(rows, warnings)``.

    - A missing or empty file gives no rows (and a warning when epochs were expected).
    - A torn last row (the file ends without a newline inside that row: a copy or an editor cut it) is dropped
      with a warning.
    - Anything else that is not a history -- bytes that are not UTF-8, NUL bytes, a header without the key
      columns, a row with another number of cells, a cell that is not a number -- is a ValueError naming the
      file and the line: such a file is not continued (nor silently replaced).
    - ``expected_epochs`` (the epochs the checkpoint says were audited) missing from the rows are named in a
      warning: their audits are lost, and re-auditing a past epoch is impossible.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "history.csv")
        >>> _ = open(p, "w").write("epoch,feature,attack,slice,auc\\n0,loss,threshold,all,0.5\\n1,loss,thr")
        >>> rows, warnings = validate_history(p, expected_epochs=[0, 1])
        >>> [r["epoch"] for r in rows], len(warnings)
        ([0], 2)
    """
    expected = sorted({int(e) for e in expected_epochs})
    warnings: List[str] = []

    def gone(epochs: Sequence[int], why: str) -> None:
        if epochs:
            warnings.append(f"{why}: the audits of epoch{'s' if len(epochs) > 1 else ''} {_fmt_epochs(epochs)} are "
                            f"lost; {_LOST}.")

    if not os.path.lexists(path):
        gone(expected, f"{path} does not exist")
        return [], warnings
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        gone(expected, f"{path} is empty")
        return [], warnings
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not a history CSV: line {line} is not UTF-8 text (byte {err.start}). Move the "
                         "file away (or restore it from a backup) to resume; a resumed run then starts a new history "
                         f"and {_LOST}.") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValueError(f"{path} is not a history CSV: line {line} holds NUL bytes. Move the file away (or restore "
                         f"it from a backup) to resume; {_LOST}.")
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    try:
        records = list(csv.reader(lines[:-1] if not torn_tail else lines))
    except csv.Error as err:
        raise ValueError(f"{path} is not a history CSV ({err}). Move the file away (or restore it from a backup) "
                         f"to resume; {_LOST}.") from None
    header = records[0]
    if tuple(header[: len(KEY_COLUMNS)]) != KEY_COLUMNS:
        raise ValueError(f"{path}, line 1: the header must start with {', '.join(KEY_COLUMNS)}, got "
                         f"{', '.join(header[:4])[:80]!r}: not a history CSV. Move the file away (or restore it from "
                         f"a backup) to resume; {_LOST}.")
    rows: List[Dict[str, Any]] = []
    for k, cells in enumerate(records[1:], start=2):
        last = k == len(records)
        if not cells:  # a blank line
            continue
        try:
            if len(cells) != len(header):
                raise ValueError(f"{path}, line {k}: {len(cells)} cells, the header has {len(header)}")
            rows.append({c: _check_cell(path, k, c, t) for c, t in zip(header, cells)})
        except ValueError as err:
            if last and torn_tail:
                warnings.append(f"{path}, line {k}: dropped a torn last row (the file ends inside it: {err}).")
                continue
            raise ValueError(f"{err}: not a history CSV row. Move the file away (or restore it from a backup) to "
                             f"resume; {_LOST}.") from None
    present = {int(r["epoch"]) for r in rows}
    gone([e for e in expected if e not in present], f"{path} lacks rows it had")
    return rows, warnings


def resume_history(path: str, keep_below_epoch: int, expected_epochs: Iterable[int] = ()) -> List[str]:
    """Prepare ``history.csv`` for a resumed run; returns the warnings to show (one string each).

    :func:`validate_history` (garbage is a ValueError; a torn last row is dropped), then the rows of epochs
    ``>= keep_below_epoch`` -- written by a killed run after its last checkpoint -- are dropped, and the file is
    rewritten atomically when anything changed.
    """
    rows, warnings = validate_history(path, [e for e in expected_epochs if int(e) < keep_below_epoch])
    kept = [r for r in rows if int(r["epoch"]) < keep_below_epoch]
    if os.path.lexists(path) and (len(kept) != len(rows) or warnings or os.path.islink(path)):
        write_history(path, kept)
    return warnings


def expected_audit_epochs(last_epoch: int, every_n_epochs: int, first: bool = True) -> List[int]:
    """The epochs a monitor auditing every ``every_n_epochs`` epochs (and, with ``first``, epoch 0) audited up to
    ``last_epoch`` (included).

    The last audited epoch counts even off the cadence (the last epoch of a fit is always audited); earlier fits
    of a chain of resumes may have audited other last epochs too, which this cannot know.
    """
    if last_epoch < 0:
        return []
    due = {e for e in range(last_epoch + 1) if (e + 1) % max(1, int(every_n_epochs)) == 0}
    return sorted(due | {int(last_epoch)} | ({0} if first else set()))


# ----------------------------------------------------------------------------------------------------------
# TensorBoard: drop the steps a killed run logged after its last checkpoint
# ----------------------------------------------------------------------------------------------------------
#: Tags the monitor logs with the epoch as step (``mia/...``, ``mia_detail/...``, ``target/...``).
MONITOR_TAG_PREFIXES = ("mia/", "mia_detail/", "target/")


def _records(raw: bytes) -> "tuple[List[tuple[int, int]], str]":
    """``([(start, end), ...], state)``: the TFRecords of an event file, and ``"ok"``, ``"torn"`` (the file ends
    inside its last record: a killed writer) or ``"corrupt"`` (a record header fails its checksum)."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    out, pos, n = [], 0, len(raw)
    while pos < n:
        if pos + 12 > n:
            return out, "torn"
        header = raw[pos: pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", raw[pos + 8: pos + 12])
        if crc != masked_crc32c(header):
            return out, "corrupt"
        end = pos + 12 + length + 4
        if end > n:
            return out, "torn"
        out.append((pos, end))
        pos = end
    return out, "ok"


def _live_event_file(name: str) -> bool:
    """An event file of this very process (``events.out.tfevents.{time}.{host}.{pid}.{n}``): a writer has it open."""
    import socket

    parts = name.split(".")
    try:
        i = parts.index("tfevents")
        return parts[i + 2: -2] == socket.gethostname().split(".") and int(parts[-2]) == os.getpid()
    except (ValueError, IndexError):
        return False


def drop_tensorboard_steps(log_dir: str, from_step: int, prefixes: Sequence[str] = MONITOR_TAG_PREFIXES,
                           keep_files: Iterable[str] = ()) -> List[str]:
    """Remove the monitor's TensorBoard values at steps ``>= from_step`` from the event files of ``log_dir``.

    A run killed after the monitor logged epoch ``e`` but before the checkpoint of epoch ``e`` audits ``e`` again
    when resumed, and logs it at the same step: TensorBoard's Python reader (``EventAccumulator``,
    ``--load_fast=false``, the tests) then holds two values per step. ``SummaryWriter(purge_step=e)`` is no cure
    here: its restart marker makes that reader drop *every* tag's values at steps ``>= e``, and Lightning logs
    its own metrics in the same files with the global step (much larger than the epoch), so they would vanish.
    This rewrites (atomically) each event file that holds such values, keeping every other record byte for byte:
    only values whose tag starts with one of ``prefixes`` at steps ``>= from_step`` go. Files of this process
    (the live writer's), ``keep_files`` and files with a record header failing its checksum are left alone; a
    torn last record (the killed writer's) goes with the rewrite. Call it on resume, before the first audit.
    Returns the rewritten files.
    """
    import io as _io

    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # no tensorboard package: no event files of its format to fix
        return []

    keep = {os.path.abspath(p) for p in keep_files}
    changed: List[str] = []
    if not os.path.isdir(log_dir):
        return changed
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        if "tfevents" not in name or not os.path.isfile(path) or os.path.islink(path) or _live_event_file(name) \
                or os.path.abspath(path) in keep:
            continue
        with open(path, "rb") as fh:
            raw = fh.read()
        spans, state = _records(raw)
        if state == "corrupt":
            continue  # unreadable past some record, not merely torn at the end: leave it as it is
        buf = _io.BytesIO()
        writer = RecordWriter(buf)
        dirty = False
        for start, end in spans:
            record = raw[start:end]
            event = Event()
            try:
                event.ParseFromString(record[12:-4])
            except Exception:
                buf.write(record)
                continue
            if event.step < from_step or not event.HasField("summary"):
                buf.write(record)
                continue
            values = [v for v in event.summary.value if not v.tag.startswith(tuple(prefixes))]
            if len(values) == len(event.summary.value):
                buf.write(record)
                continue
            dirty = True
            if values:  # a record mixing the monitor's values with others: keep the others
                del event.summary.value[:]
                event.summary.value.extend(values)
                writer.write(event.SerializeToString())
        if dirty:  # (a torn last record goes with the rewrite; an otherwise untouched file keeps it)
            atomic_write_bytes(path, buf.getvalue())
            changed.append(path)
    return changed
