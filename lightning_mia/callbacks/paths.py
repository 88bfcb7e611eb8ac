"""Where a run's files live and where its audit datasets come from, found without collectives.

``trainer.log_dir`` broadcasts from rank zero under DDP, so calling it from rank-zero-only code deadlocks; the
loggers' own ``log_dir`` is a plain attribute and gives the same folder.

A run's directory is, in this order: the callback's ``dirpath``; the first logger's ``log_dir`` (TensorBoard,
CSV: ``save_dir/name/version_N``); else -- ``logger=False``, or loggers without a ``log_dir`` such as W&B and
MLflow -- a folder of its own, ``{default_root_dir}/mia_runs/version_N``, numbered like Lightning's
``lightning_logs/version_N``: the first free N, claimed by creating it, so two runs never share one. A resumed
run (``ckpt_path``) reuses the folder its checkpoint recorded (:func:`resolve_run_dir`'s ``previous``).

The folder is decided once per Trainer and remembered on it, so the monitor and the early-stopping comparison
write into the same one. :func:`resolve_run_dir` decides it in code that every rank runs (``on_train_start``):
rank zero claims the folder and broadcasts its name, so every rank holds the same path; :func:`run_dir`, called
from rank-zero-only code, only reads what was decided (deciding on the spot, without collectives, when nothing
was).
"""
from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Tuple

#: Folder under ``default_root_dir`` holding the runs without a logger directory.
RUNS_DIR = "mia_runs"
_VERSION_RE = re.compile(r"^version_(\d+)$")
_ATTR, _RESOLVED = "_lightning_mia_run_dir", "_lightning_mia_run_dir_resolved"


def logger_dir(trainer: Any) -> Optional[str]:
    """The first logger's ``log_dir`` (a plain attribute, no collective), or ``None``."""
    for logger in getattr(trainer, "loggers", None) or ():
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return str(log_dir)
    return None


def _claim_version(root: str) -> str:
    """Create and return ``root/version_N`` for the first N after every existing one (atomic: ``mkdir``)."""
    os.makedirs(root, exist_ok=True)
    taken = [int(m.group(1)) for m in map(_VERSION_RE.match, os.listdir(root)) if m]
    n = max(taken) + 1 if taken else 0
    while True:
        path = os.path.join(root, f"version_{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # another run took it meanwhile
            n += 1


def _decide(trainer: Any, previous: Optional[str]) -> str:
    found = logger_dir(trainer)
    if found is not None:
        return found
    if previous and os.path.isdir(previous):
        return str(previous)
    return _claim_version(os.path.join(str(trainer.default_root_dir), RUNS_DIR))


def resolve_run_dir(trainer: Any, dirpath: Optional[str] = None, previous: Optional[str] = None) -> str:
    """Decide the run directory (see the module docstring) and remember it on ``trainer``; call it from a hook
    that every rank runs. ``previous``: the directory a resumed checkpoint recorded. Under DDP, the first call on
    each rank is a collective (rank zero decides, or keeps what :func:`run_dir` decided, and broadcasts), so it
    must never run from rank-zero-only code; later calls return the remembered path."""
    if dirpath is not None:
        return str(dirpath)
    if getattr(trainer, _RESOLVED, False):
        return getattr(trainer, _ATTR)
    world = int(getattr(trainer, "world_size", 1) or 1)
    path = getattr(trainer, _ATTR, None)
    if path is None and (world == 1 or trainer.global_rank == 0):
        path = _decide(trainer, previous)
    if world > 1:  # a logger's version may differ on the other ranks (it is listed there too): rank zero's wins
        path = trainer.strategy.broadcast(path, src=0)
    setattr(trainer, _ATTR, path)
    setattr(trainer, _RESOLVED, True)
    return path


def run_dir(trainer: Any, dirpath: Optional[str] = None, previous: Optional[str] = None) -> str:
    """``dirpath`` when given, else the run directory :func:`resolve_run_dir` decided for ``trainer``; when
    nothing decided it yet, decided here on this rank alone (no collective: safe in rank-zero-only code). Under
    DDP only rank zero decides here: another rank gets its logger's ``log_dir`` or the ``mia_runs`` folder,
    nothing is created for it, and it must not write there (all files are rank zero's)."""
    if dirpath is not None:
        return str(dirpath)
    decided = getattr(trainer, _ATTR, None)
    if decided is not None:
        return decided
    if int(getattr(trainer, "world_size", 1) or 1) > 1 and getattr(trainer, "global_rank", 0) != 0:
        return logger_dir(trainer) or os.path.join(str(trainer.default_root_dir), RUNS_DIR)
    path = _decide(trainer, previous)
    setattr(trainer, _ATTR, path)
    return path


def check_fresh_run_dir(path: str, resumed: bool) -> None:
    """Refuse to start a run in a directory that already holds another run's audit history, unless this run
    resumes it (``ckpt_path``): the two histories would merge."""
    from lightning_mia.layout import RunLayout

    history = RunLayout(path).history
    if not resumed and os.path.exists(history):
        raise ValueError(
            f"{history} already holds the audit history of an earlier run, and this run is not resuming it: give "
            "this run its own directory (a new logger version, another dirpath, or no fixed version), resume the "
            "earlier run with ckpt_path=..., or delete that folder")


def interrupt_hint(path: str, last_epoch: int, exception: BaseException) -> List[str]:
    """The lines printed when training stops on an exception (a SIGTERM, Ctrl+C, an error): what was saved and how
    to write the report from it."""
    from lightning_mia.layout import RunLayout

    what = type(exception).__name__
    if last_epoch < 0:
        return [f"Training stopped ({what}) before the first membership-inference audit finished: nothing to report."]
    layout = RunLayout(path)
    return [f"Training stopped ({what}); the membership-inference audits up to epoch {last_epoch} are saved in "
            f"{layout.history}.",
            f"Write the report from them: lightning-mia report {path}"]


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
