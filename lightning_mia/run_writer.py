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
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from lightning_mia import layout as L
from lightning_mia.io import atomic_write_bytes
from lightning_mia.report.history import append_rows, drop_tensorboard_steps, expected_audit_epochs, resume_history

#: Audits between two renders of the per-audit pictures (exposed samples, ROC); the last audit always gets them.
IMAGE_EVERY = 5
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


def metrics_of(result: Any, log_all_metrics: bool = False) -> Dict[str, float]:
    """The logger scalars of one audit: ``target/{name}``, the headline metrics as
    ``mia/{feature}/{attack}/{slice}/{metric}`` and, with ``log_all_metrics``, every other numeric row value as
    ``mia_detail/{feature}/{attack}/{slice}/{metric}`` (the history keeps them all either way)."""
    from lightning_mia.report.tensorboard import detail_tag, is_headline_metric

    metrics: Dict[str, float] = {L.target_tag(k): float(v) for k, v in result.target.items() if finite(v)}
    for r in result.rows:
        for k, v in r.items():
            if k in _NOT_METRICS or not isinstance(v, (int, float, np.integer, np.floating)) or not finite(v):
                continue
            if is_headline_metric(k):
                metrics[L.metric_tag(r["feature"], r["attack"], r["slice"], k)] = float(v)
            elif log_all_metrics:
                metrics[detail_tag(r["feature"], r["attack"], r["slice"], k)] = float(v)
    return metrics


def _warn_if_hparams_hidden(loggers: Sequence[Any]) -> None:
    """TensorBoard shows the first HParams entry of a run: Lightning's ``hp_metric`` one, written when fitting
    starts, hides the audit's (written when fitting ends) unless the logger has ``default_hp_metric=False``."""
    for logger in loggers:
        if is_tensorboard_logger(logger) and getattr(logger, "_default_hp_metric", False):
            from lightning_mia.compat import rank_zero_warn

            rank_zero_warn("TensorBoardLogger(default_hp_metric=True) writes its own HParams entry (hp_metric = -1) "
                           "first, and TensorBoard then hides the audit's end-of-fit HParams entry; pass "
                           "default_hp_metric=False to the logger to see the audit's metrics in the HParams tab")
            return


#: Metrics put in ``trainer.callback_metrics`` after each audit, for EarlyStopping / ModelCheckpoint to watch.
CALLBACK_METRICS = ("balanced_accuracy", "far", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "epsilon_lb")


def privacy_metrics(result: Any) -> Dict[str, float]:
    """The audit's metrics under the stable names callbacks can ``monitor``:

    - ``mia/{feature}/{attack}/{slice}/{metric}`` for every :data:`CALLBACK_METRICS` metric (finite values only);
    - ``mia/max/{metric}``: the largest value over every feature/attack on all samples (the strongest attack;
      for ``far`` the largest false-alarm rate);
    - ``mia_bal_acc``: balanced accuracy of the first feature/attack on all samples (the progress bar's).
    """
    out: Dict[str, float] = {}
    for r in result.rows:
        if r["slice"] not in L.SLICES:
            continue
        for k in CALLBACK_METRICS:
            if finite(r.get(k)):
                out[L.metric_tag(r["feature"], r["attack"], r["slice"], k)] = float(r[k])
                if r["slice"] == "all":
                    out[f"mia/max/{k}"] = max(out.get(f"mia/max/{k}", float("-inf")), float(r[k]))
    head = next((r for r in result.rows if r["slice"] == "all" and finite(r.get("balanced_accuracy"))), None)
    if head is not None:
        out[L.PROGRESS_BAR_METRIC] = float(head["balanced_accuracy"])
    return out


def log_privacy_metrics(pl_module: Any, metrics: Mapping[str, float]) -> None:
    """``pl_module.log`` each metric (not to the loggers: :class:`RunWriter` does that with the epoch as step).
    The values are the same on every rank (broadcast from rank zero), so no reduction is needed."""
    for name, value in metrics.items():
        pl_module.log(name, float(value), prog_bar=name == L.PROGRESS_BAR_METRIC, logger=False, sync_dist=False)


class RunWriter:
    """Owns a run directory's ``mia/`` files and the monitor's logger output.

    Args:
        run_dir: the run directory (``mia/`` goes inside).
        loggers: Lightning loggers to send the per-audit scalars to.
        log_histograms: TensorBoard histograms of member / non-member scores.
        save_predictions: write ``predictions/epoch_NNNN.npz`` per audit.
        exposed_top_k: write the ``k`` most exposed members and false alarms per audit (``exposed/``; 0: off).
        log_all_metrics: also send every secondary metric (baselines, ``*_std``, precision/recall, ...) to the
            loggers, under ``mia_detail/``; by default only the headline metrics go (``mia/``).
    """

    def __init__(self, run_dir: str, loggers: Sequence[Any] = (), log_histograms: bool = True,
                 save_predictions: bool = False, exposed_top_k: int = 0, log_all_metrics: bool = False,
                 every_n_epochs: int = 1) -> None:
        self.layout = L.RunLayout(run_dir)
        self.every_n_epochs = int(every_n_epochs)
        self.loggers = list(loggers)
        self.log_histograms, self.save_predictions = log_histograms, save_predictions
        self.exposed_top_k = int(exposed_top_k)
        self._n_written, self._pending = 0, None
        self.log_all_metrics = bool(log_all_metrics)
        self._layout_written = False

    @property
    def tensorboard(self) -> Any:
        return tensorboard_writer(self.loggers)

    # -- run start ------------------------------------------------------------------------------------------
    def start(self, pool: Any, resume_from_epoch: Optional[int] = None) -> None:
        """Create ``mia/``; on resume check the history (garbage is refused, a torn last row and lost epochs are
        warned about) and drop what a killed run wrote after the checkpoint (history rows, TensorBoard steps); save
        the audit pool."""
        os.makedirs(self.layout.mia, exist_ok=True)
        if resume_from_epoch is not None:
            audited = expected_audit_epochs(resume_from_epoch - 1, self.every_n_epochs)
            for message in resume_history(self.layout.history, resume_from_epoch, audited):
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            for logger in self.loggers:
                if is_tensorboard_logger(logger):
                    drop_tensorboard_steps(logger.log_dir, resume_from_epoch)
        pool.save(self.layout.audit_json)

    # -- one audit ------------------------------------------------------------------------------------------
    def write(self, result: Any, slices: Sequence[str] = L.SLICES, datasets: Optional[Sequence[Any]] = None,
              class_names: Optional[Sequence[str]] = None, step: Optional[int] = None) -> None:
        """History rows, logger scalars, TensorBoard extras and, when enabled, predictions and the most exposed
        samples (pictures from ``datasets`` = (members, non-members) when they can be shown). The scalars go to
        TensorBoard at step = epoch and to every other logger at ``step`` (the trainer's, with ``epoch``
        alongside; :mod:`lightning_mia.logging_axis`); without ``step`` all at step = epoch."""
        from lightning_mia.logging_axis import log_audit_metrics

        self.write_rows(result)
        log_audit_metrics(self.loggers, metrics_of(result, self.log_all_metrics), result.epoch, step)
        self._tensorboard_extras(result, slices)
        if self.save_predictions:
            self.write_predictions(result)
        # pictures cost a figure render each: every IMAGE_EVERY-th audit, and the last one at fit end
        draw = self._n_written % IMAGE_EVERY == 0
        self._pending = None if draw else (result, datasets, class_names)
        if self.exposed_top_k > 0:
            self.write_exposed(result, datasets, class_names, images=draw)
        if draw:
            self.write_roc_image(result)
        self._n_written += 1
        for logger in self.loggers:
            logger.save()

    def write_roc_image(self, result: Any) -> None:
        """A log-log ROC of every attack's pool scores (TensorBoard image ``mia_roc/all``)."""
        writer = self.tensorboard
        if writer is None:
            return
        from lightning_mia.report.attack_roc import roc_curves_of, roc_overlay_figure
        from lightning_mia.report.plots import figure_to_array

        curves = roc_curves_of(result)
        if curves:
            fig = roc_overlay_figure(curves, f"ROC at epoch {result.epoch} (all samples)")
            writer.add_image(L.roc_tag("all"), figure_to_array(fig), int(result.epoch), dataformats="HWC")

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

    def write_exposed(self, result: Any, datasets: Optional[Sequence[Any]], class_names: Any = None,
                      images: bool = True) -> None:
        """``exposed/epoch_NNNN.csv``; with ``images`` and showable datasets also ``.png`` and a TensorBoard image."""
        from lightning_mia.report.exposed import exposed_csv, exposed_figure, exposed_samples, sample_image

        rows = exposed_samples(result, self.exposed_top_k)
        if not rows:
            return
        atomic_write_bytes(self.layout.exposed(result.epoch), exposed_csv(rows).encode("utf-8"))
        if not images:
            return
        images = [None if datasets is None else sample_image(datasets[0 if r["kind"] == "member" else 1],
                                                             r["position"]) for r in rows]
        if all(im is None for im in images):
            return  # the data cannot be shown: indices only (the CSV)
        from PIL import Image  # a matplotlib dependency

        from lightning_mia.report.plots import figure_to_array

        pixels = figure_to_array(exposed_figure(rows, images, result.epoch, class_names))  # drawn once
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="png")  # the same pixels; savefig would lay out and draw again
        atomic_write_bytes(self.layout.exposed(result.epoch, "png"), buf.getvalue())
        writer = self.tensorboard
        if writer is not None:
            writer.add_image(L.exposed_tag(rows[0]["feature"], rows[0]["attack"]), pixels, int(result.epoch),
                             dataformats="HWC")

    def _tensorboard_extras(self, result: Any, slices: Sequence[str]) -> None:
        writer = self.tensorboard
        if writer is None:
            return
        from lightning_mia.report import tensorboard as tb

        if not self._layout_written:
            combos = sorted({(r["feature"], r["attack"]) for r in result.rows})
            tb.add_custom_scalars_layout(writer, combos, slices)
            self._layout_written = True
            _warn_if_hparams_hidden(self.loggers)
        tb.add_chance_line(writer, result.epoch)
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

    def finish_fit(self, hparams: Mapping[str, Any], step: int, report: bool = True) -> List[str]:
        """At fit end: the last audit's pictures if they were skipped, the report when asked (a failure warns,
        never loses the run) and the lines to print."""
        if self._pending is not None:
            result, datasets, class_names = self._pending
            if self.exposed_top_k > 0:
                self.write_exposed(result, datasets, class_names)
            self.write_roc_image(result)
            self._pending = None
        lines = []
        if report:
            try:
                path, table = self.finish(hparams, step)
                lines += [table, f"Report: {path}"]
            except Exception as err:  # a report failure must not lose the training run
                warnings.warn(f"Could not write the MIA report: {err!r}", RuntimeWarning, stacklevel=2)
        lines.append(f"Membership-inference audit: {self.layout.history}")
        root = next((lg.save_dir for lg in self.loggers if is_tensorboard_logger(lg)), None)
        if root is not None:
            lines.append(f"TensorBoard: tensorboard --logdir {root}")
        return lines
