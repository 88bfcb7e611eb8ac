"""Where a run's files live, computed without collectives.

``trainer.log_dir`` broadcasts from rank zero under DDP, so calling it from rank-zero-only code deadlocks; the
loggers' own ``log_dir`` is a plain attribute and gives the same folder.
"""
from __future__ import annotations

from typing import Any, Optional


def run_dir(trainer: Any, dirpath: Optional[str] = None) -> str:
    """``dirpath`` when given, else the first logger's ``log_dir`` (TensorBoard: ``save_dir/name/version_N``),
    else ``trainer.default_root_dir``."""
    if dirpath is not None:
        return str(dirpath)
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return str(log_dir)
    return str(trainer.default_root_dir)
