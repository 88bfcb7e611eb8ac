"""Where a run's ``mia/`` folder lives, computed without collectives.

``trainer.log_dir`` broadcasts from rank zero under DDP, so calling it from rank-zero-only code deadlocks; the
loggers' own ``log_dir`` is a plain attribute and gives the same folder.
"""
from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl


def run_dir(trainer: "pl.Trainer") -> str:
    """The first logger's ``log_dir`` (TensorBoard: ``save_dir/name/version_N``), else ``default_root_dir``."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return str(log_dir)
    return str(trainer.default_root_dir)


def mia_dir(trainer: "pl.Trainer", dirpath: Optional[str] = None) -> str:
    """``{dirpath}/mia`` when given, else ``{run_dir}/mia``."""
    return os.path.join(dirpath if dirpath is not None else run_dir(trainer), "mia")
