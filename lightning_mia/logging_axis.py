"""One step axis for the monitor's scalars with every logger.

Lightning logs everything at the trainer's step (``self.log`` in an epoch-end hook lands at the number of batches
that stepped an optimizer, with ``epoch`` logged alongside). Logged at step = epoch instead, the audit's scalars
land among the first training steps: CSVLogger's ``metrics.csv`` gets rows whose ``step`` jumps back and forth, W&B
drops or misplaces them (its step only goes forward) and MLflow draws them at the wrong x.

So :func:`log_audit_metrics` logs each audit

- to every logger but TensorBoard at the trainer's step of the audit (:func:`lightning_mia.compat.lightning_step`)
  with ``epoch`` alongside, exactly as Lightning logs: one ``metrics.csv`` row per step in order, W&B's
  ``trainer/global_step`` and MLflow's step shared with ``train_loss``; plot them by ``epoch`` there with the
  logger's own x-axis setting (W&B: ``wandb.define_metric("mia/*", step_metric="epoch")``);
- to TensorBoard at step = epoch, its paper-style view: TensorBoard keeps one series per tag, so nothing
  interleaves, and the custom-scalars layout, the chance line, the score histograms and the figures all share that
  axis (the run-directory contract, ``docs/design.md`` section 4). ``tensorboard_by_epoch=False`` puts TensorBoard on
  the trainer's step as well.

Without a trainer step (``step=None``: a script writing an audit by hand) every logger gets step = epoch.

Example:
    >>> class Printer:
    ...     def log_metrics(self, metrics, step):
    ...         print(step, metrics)
    >>> log_audit_metrics([Printer()], {"mia/loss/threshold/all/auc": 0.6}, epoch=2, step=120)
    120 {'mia/loss/threshold/all/auc': 0.6, 'epoch': 2}
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

__all__ = ["EPOCH_KEY", "log_audit_metrics", "logger_step"]

#: The key the epoch is logged under next to the audit's scalars (Lightning's own name for it).
EPOCH_KEY = "epoch"


def _is_tensorboard(logger: Any) -> bool:
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def logger_step(logger: Any, epoch: int, step: Optional[int], tensorboard_by_epoch: bool = True) -> int:
    """The step the audit of ``epoch`` is logged at on ``logger`` (see the module docstring)."""
    if step is None or (tensorboard_by_epoch and _is_tensorboard(logger)):
        return int(epoch)
    return int(step)


def log_audit_metrics(loggers: Sequence[Any], metrics: Mapping[str, float], epoch: int,
                      step: Optional[int] = None, tensorboard_by_epoch: bool = True) -> None:
    """Send one audit's scalars to every logger on the axis the module docstring describes."""
    for logger in loggers:
        if step is None or (tensorboard_by_epoch and _is_tensorboard(logger)):
            logger.log_metrics(dict(metrics), step=int(epoch))
        else:
            logger.log_metrics({**metrics, EPOCH_KEY: int(epoch)}, step=int(step))
