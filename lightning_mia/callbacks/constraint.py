"""``PrivacyConstraint``: a metric that is the validation metric where the leak stays under a bound, and the worst
possible value elsewhere -- so ``ModelCheckpoint(monitor=...)`` keeps the best model among the private-enough ones.

Example:
    >>> c = PrivacyConstraint(metric="val_acc", leak="mia/max/auc", bound=0.6)
    >>> c.name
    'val_acc_under_mia/max/auc<=0.6'
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch

from lightning_mia.compat import Callback
from lightning_mia.validation import check_choice


class PrivacyConstraint(Callback):
    """Write ``name`` into ``trainer.callback_metrics`` after each validation: ``metric`` when ``leak`` <= ``bound``
    (``leak`` >= ``bound`` with ``leak_mode="max"``), else the worst value for ``mode`` (-inf for ``max``).

    List it with a :class:`~lightning_mia.callbacks.MembershipInferenceMonitor` (whose privacy metrics it reads)
    and a ``ModelCheckpoint(monitor=name, mode=mode)``; Lightning runs checkpoint callbacks last, so the
    checkpoint sees this epoch's value. An epoch whose leak is unknown counts as over the bound.

    Args:
        metric: the utility metric to maximise/minimise (e.g. ``val_acc``).
        leak: the privacy metric bounded (e.g. ``mia/max/auc``, see the monitor's callback metrics).
        bound: the largest acceptable leak.
        mode: ``max`` when larger ``metric`` is better.
        leak_mode: ``max`` when a larger leak is worse (AUC, TPR, balanced accuracy, epsilon), ``min`` otherwise.
        name: the metric written (default ``{metric}_under_{leak}<={bound}``).
    """

    def __init__(self, metric: str = "val_acc", leak: str = "mia/max/auc", bound: float = 0.6,
                 mode: Literal["max", "min"] = "max", leak_mode: Literal["max", "min"] = "max",
                 name: Optional[str] = None) -> None:
        super().__init__()
        self.metric, self.leak = str(metric), str(leak)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ValueError(f"bound must be a finite number, got {bound!r}")
        self.bound = float(bound)
        self.mode = check_choice("mode", mode, ("max", "min"))
        self.leak_mode = check_choice("leak_mode", leak_mode, ("max", "min"))
        self.name = name or f"{self.metric}_under_{self.leak}<={format(self.bound, 'g')}"

    def value(self, metric: Optional[float], leak: Optional[float]) -> float:
        """The constrained value (pure: what :meth:`on_validation_end` writes)."""
        worst = -math.inf if self.mode == "max" else math.inf
        if metric is None or leak is None or not math.isfinite(leak):
            return worst
        ok = leak <= self.bound if self.leak_mode == "max" else leak >= self.bound
        return float(metric) if ok else worst

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        get = lambda k: float(m[k]) if k in m else None  # noqa: E731
        trainer.callback_metrics[self.name] = torch.tensor(self.value(get(self.metric), get(self.leak)))
