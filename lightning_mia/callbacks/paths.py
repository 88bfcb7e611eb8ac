"""Where a run's files live and where its audit datasets come from, found without collectives.

``trainer.log_dir`` broadcasts from rank zero under DDP, so calling it from rank-zero-only code deadlocks; the
loggers' own ``log_dir`` is a plain attribute and gives the same folder.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple


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


def audit_datasets(trainer: Any, member_dataset: Any = None, nonmember_dataset: Any = None) -> Tuple[Any, Any]:
    """The member and non-member datasets: the ones given, else the datamodule's ``member_dataset()`` and
    ``nonmember_dataset()``."""
    if member_dataset is not None:
        return member_dataset, nonmember_dataset
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and callable(getattr(dm, "member_dataset", None)) and callable(
            getattr(dm, "nonmember_dataset", None)):
        return dm.member_dataset(), dm.nonmember_dataset()
    raise ValueError(
        "MembershipInferenceMonitor needs member and non-member datasets: use a lightning_mia datamodule "
        "(it provides member_dataset() and nonmember_dataset()), or pass member_dataset= and "
        "nonmember_dataset= (datasets of (x, y, index) items; see lightning_mia.data.IndexedDataset)")

