"""``RunWriter``: everything the monitor writes -- history.csv, audit.json, the predictions files, the loggers'
scalars and the TensorBoard extras -- in one object, on rank zero only.

Example:
    >>> import tempfile
    >>> from lightning_mia.auditor import AuditResult
    >>> w = RunWriter(tempfile.mkdtemp())
    >>> w.write_rows(AuditResult(epoch=0, rows=[{"epoch": 0, "feature": "loss", "attack": "threshold",
    ...                                          "slice": "all", "balanced_accuracy": 0.6}]))
    >>> from lightning_mia.report.history import read_history
    >>> read_history(w.layout.history)[0]["balanced_accuracy"]
    0.6
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

from lightning_mia import layout as L
from lightning_mia.io import atomic_write_bytes
from lightning_mia.report.history import append_rows, truncate_history

#: Row keys that are not logged as metrics (names, and the target columns repeated on every row).
_NOT_METRICS = set(L.KEY_COLUMNS) | set(L.TARGET_COLUMNS)


def is_tensorboard_logger(logger: Any) -> bool:
    """True for ``TensorBoardLogger`` of either Lightning package (their classes are distinct)."""
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def tensorboard_writer(loggers: Iterable[Any]) -> Any:
    """The SummaryWriter of the first TensorBoard logger, else ``None``."""
    for logger in loggers:
        if is_tensorboard_logger(logger):
            return logger.experiment
    return None


def finite(v: Any) -> bool:
    """A real, finite number (bools and strings are not)."""
    try:
        return v is not None and not isinstance(v, (bool, str)) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def metrics_of(result: Any) -> Dict[str, float]:
    """The logger scalars of one audit: ``target/{name}`` and ``mia/{feature}/{attack}/{slice}/{metric}``."""
    metrics: Dict[str, float] = {L.target_tag(k): float(v) for k, v in result.target.items() if finite(v)}
    for r in result.rows:
        for k, v in r.items():
            if k not in _NOT_METRICS and isinstance(v, (int, float, np.integer, np.floating)) and finite(v):
                metrics[L.metric_tag(r["feature"], r["attack"], r["slice"], k)] = float(v)
    return metrics


class RunWriter:
    """Owns a run directory's ``mia/`` files and the monitor's logger output.

    Args:
        run_dir: the run directory (``mia/`` goes inside).
        loggers: Lightning loggers to send the per-audit scalars to.
        log_histograms: TensorBoard histograms of member / non-member scores.
        save_predictions: write ``predictions/epoch_NNNN.npz`` per audit.
    """

    def __init__(self, run_dir: str, loggers: Sequence[Any] = (), log_histograms: bool = True,
                 save_predictions: bool = False) -> None:
        self.layout = L.RunLayout(run_dir)
        self.loggers = list(loggers)
        self.log_histograms, self.save_predictions = log_histograms, save_predictions
        self._layout_written = False

    @property
    def tensorboard(self) -> Any:
        return tensorboard_writer(self.loggers)

    # -- run start ------------------------------------------------------------------------------------------
    def start(self, pool: Any, resume_from_epoch: Optional[int] = None) -> None:
        """Create ``mia/``, drop history rows a killed run wrote after the checkpoint, save the audit pool."""
        os.makedirs(self.layout.mia, exist_ok=True)
        if resume_from_epoch is not None:
            truncate_history(self.layout.history, resume_from_epoch)
        pool.save(self.layout.audit_json)

    # -- one audit ------------------------------------------------------------------------------------------
    def write(self, result: Any, slices: Sequence[str] = L.SLICES) -> None:
        """History rows, logger scalars (step = epoch), TensorBoard extras and, when enabled, predictions."""
        self.write_rows(result)
        metrics = metrics_of(result)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=result.epoch)
        self._tensorboard_extras(result, slices)
        if self.save_predictions:
            self.write_predictions(result)
        for logger in self.loggers:
            logger.save()

    def write_rows(self, result: Any) -> None:
        os.makedirs(self.layout.mia, exist_ok=True)
        append_rows(self.layout.history, result.rows, replace_from_epoch=result.epoch)

    def write_predictions(self, result: Any) -> None:
        d = result.data
        out: Dict[str, np.ndarray] = {"index": d.index, "is_member": d.is_member, "correct": d.correct,
                                      "label": d.label, "pred": d.pred}
        for (f, a), s in result.scores.items():
            out[L.score_key(f, a)] = s
            out[L.fold_key(f, a)] = result.folds[(f, a)]
            out.setdefault("fold", result.folds[(f, a)])
        for (src, f, a), (s, thr) in result.ood.items():
            out[L.ood_score_key(src, f, a)] = s
            out[L.ood_threshold_key(src, f, a)] = np.asarray(thr)
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        atomic_write_bytes(self.layout.predictions(result.epoch), buf.getvalue())

    def _tensorboard_extras(self, result: Any, slices: Sequence[str]) -> None:
        writer = self.tensorboard
        if writer is None:
            return
        from lightning_mia.report import tensorboard as tb

        if not self._layout_written:
            combos = sorted({(r["feature"], r["attack"]) for r in result.rows})
            tb.add_custom_scalars_layout(writer, combos, slices)
            self._layout_written = True
        if self.log_histograms:
            member = result.data.is_member
            for (f, a), s in result.scores.items():
                ok = np.isfinite(s)
                if (ok & member).any() and (ok & ~member).any():
                    tb.add_score_histograms(writer, f, a, result.epoch, s[ok & member], s[ok & ~member])

    # -- fit end --------------------------------------------------------------------------------------------
    def finish(self, hparams: Mapping[str, Any], step: int) -> "tuple[str, str]":
        """Write the report (and its TensorBoard extras); returns ``(report_path, printable_summary)``."""
        from lightning_mia.report.summary import finish_run

        return finish_run(self.layout.run_dir, self.tensorboard, hparams, step)
