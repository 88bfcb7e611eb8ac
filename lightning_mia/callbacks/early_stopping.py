"""``EarlyStoppingComparison``: record the validation metric during training and tell where Lightning's
``EarlyStopping`` would have stopped, for several patiences (the replay itself is :mod:`lightning_mia.stopping`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch

from lightning_mia.callbacks.paths import resolve_run_dir, run_dir
from lightning_mia.compat import Callback, rank_zero_warn
from lightning_mia.io import atomic_write_text
from lightning_mia.layout import EARLY_STOPPING_JSON, RunLayout
from lightning_mia.stopping import DEFAULT_PATIENCES, MODES, early_stopping_results, would_stop  # noqa: F401
from lightning_mia.validation import check_choice


class EarlyStoppingComparison(Callback):
    """Record the validation metric and report where early stopping (several patiences) would have stopped.

    By default it only watches (``stop_training=False``): training runs to the end and ``results`` / the JSON file
    give, per patience, the would-stop epoch and the best epoch, so the report can compare the attack at those
    epochs with the end of training. With ``stop_training=True`` it also stops training exactly like
    ``EarlyStopping(monitor, patience=patience[0], min_delta, mode, check_finite)``.

    Args:
        monitor: logged metric to watch (the validation loss ``"val_loss"`` of ``ImageClassifier`` by default).
        patience: one patience or a list of them (checks without improvement, as in Lightning).
        min_delta: minimum improvement (>= 0), as in Lightning.
        mode: ``"min"`` or ``"max"``.
        stop_training: also stop training with the first patience.
        check_finite: a NaN/inf value counts as a stop, as in Lightning.
        strict: raise if ``monitor`` is missing after a validation run (otherwise warn once and skip).
        dirpath: where ``early_stopping.json`` goes; default ``{run_dir}/mia``, the monitor's run directory
            (:mod:`lightning_mia.callbacks.paths`: the logger's ``log_dir``, else ``mia_runs/version_N``; a resumed
            run reuses the one its checkpoint recorded).

    Files (rank zero only, atomic): ``{dirpath}/early_stopping.json`` = :func:`early_stopping_results` plus
    ``source``, ``stop_training``, ``stopped_epoch`` and ``last_epoch``.

    Example:
        >>> cb = EarlyStoppingComparison(monitor="val_loss", patience=[3, 5, 10])
        >>> trainer = pl.Trainer(callbacks=[cb])            # doctest: +SKIP
        >>> trainer.fit(model, datamodule)                  # doctest: +SKIP
        >>> [(r["patience"], r["stop_epoch"]) for r in cb.results["rules"]]  # doctest: +SKIP
        [(3, 12), (5, 17), (10, None)]
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: Union[int, Sequence[int]] = DEFAULT_PATIENCES,
        min_delta: float = 0.0,
        mode: Literal["min", "max"] = "min",
        stop_training: bool = False,
        check_finite: bool = True,
        strict: bool = True,
        dirpath: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}")
        patiences = [patience] if isinstance(patience, int) and not isinstance(patience, bool) else list(patience)
        if not patiences or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in patiences):
            raise ValueError(f"`patience` must be an int >= 0 or a non-empty list of them, got {patience!r}")
        if len(set(patiences)) != len(patiences):
            raise ValueError(f"`patience` values must be distinct, got {patiences}")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not (0 <= min_delta < float("inf")):
            raise ValueError(f"`min_delta` must be a finite number >= 0, got {min_delta!r}")
        check_choice("mode", mode, MODES)
        for name, flag in (("stop_training", stop_training), ("check_finite", check_finite), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}")
        self.monitor = monitor
        self.patience: List[int] = patiences
        self.min_delta = float(min_delta)
        self.mode = mode
        self.stop_training = stop_training
        self.check_finite = check_finite
        self.strict = strict
        self.dirpath = dirpath
        # One record per validation check: {"epoch", "step", "value"}; "dtype" of the logged tensor.
        self._records: List[Dict[str, Any]] = []
        self._dtype = "float32"
        self.stopped_epoch: Optional[int] = None
        self._last_epoch: Optional[int] = None
        self._warned = False
        #: the run directory (resolved at train start); a resumed run reuses its checkpoint's
        self._run_dir: Optional[str] = None
        self._previous_run_dir: Optional[str] = None

    # ---- Lightning state -------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, patience=tuple(self.patience))

    def state_dict(self) -> Dict[str, Any]:
        return {"records": [dict(r) for r in self._records], "dtype": self._dtype,
                "stopped_epoch": self.stopped_epoch, "last_epoch": self._last_epoch, "run_dir": self._run_dir}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._records = [dict(r) for r in state_dict.get("records", [])]
        self._dtype = state_dict.get("dtype", "float32")
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self._last_epoch = state_dict.get("last_epoch")
        self._previous_run_dir = state_dict.get("run_dir")

    # ---- results ---------------------------------------------------------------------------------------------
    @property
    def values(self) -> List[Tuple[int, float]]:
        """Recorded ``(epoch, value)`` per validation check."""
        return [(r["epoch"], r["value"]) for r in self._records]

    @property
    def results(self) -> Dict[str, Any]:
        """The comparison record written to ``early_stopping.json`` (see :func:`early_stopping_results`)."""
        return early_stopping_results(
            self._records, self.patience, min_delta=self.min_delta, mode=self.mode, check_finite=self.check_finite,
            dtype=self._dtype, monitor=self.monitor, source="callback", stop_training=self.stop_training,
            stopped_epoch=self.stopped_epoch, last_epoch=self._last_epoch,
        )

    # ---- hooks -----------------------------------------------------------------------------------------------
    @staticmethod
    def _should_skip(trainer: "pl.Trainer") -> bool:
        # TrainerFn is a str enum in both Lightning packages: "fit" compares equal to either one's FITTING
        return trainer.state.fn != "fit" or trainer.sanity_checking or bool(trainer.fast_dev_run)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if bool(trainer.fast_dev_run):
            return
        # every rank runs this hook: the run directory is decided (and, under DDP, broadcast) here
        if self.dirpath is None:
            self._run_dir = resolve_run_dir(trainer, None, self._previous_run_dir)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._should_skip(trainer):
            return
        self._record(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The last trained epoch ("final" in the report); at on_train_end current_epoch is already one past it.
        self._last_epoch = int(trainer.current_epoch)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if bool(trainer.fast_dev_run):
            return
        if trainer.is_global_zero:
            self._write(trainer)

    def _record(self, trainer: "pl.Trainer") -> None:
        logs = trainer.callback_metrics
        value = logs.get(self.monitor)
        if value is None:
            msg = (f"EarlyStoppingComparison: metric `{self.monitor}` not found after validation; available: "
                   f"`{'`, `'.join(logs.keys())}`")
            if self.strict:
                raise RuntimeError(msg)
            if not self._warned:
                rank_zero_warn(msg, trainer, category=RuntimeWarning)
                self._warned = True
            return
        value = torch.as_tensor(value).detach().squeeze()  # already synced across ranks by Lightning's logging
        self._dtype = str(value.dtype).replace("torch.", "")
        step = int(trainer.global_step)
        # A resumed run re-validates steps already recorded before the checkpoint: replace, never duplicate.
        self._records = [r for r in self._records if r["step"] < step]
        self._records.append({"epoch": int(trainer.current_epoch), "step": step, "value": float(value.cpu())})
        self._last_epoch = int(trainer.current_epoch)
        if self.stop_training:
            first = would_stop(self.values, self.patience[0], self.min_delta, self.mode, self.check_finite,
                               self._dtype)
            should_stop = first["stop_epoch"] is not None
            # Collective on every rank (never inside a rank-zero branch); any rank stopping stops all, as Lightning.
            should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
            trainer.should_stop = trainer.should_stop or should_stop
            if should_stop and self.stopped_epoch is None:
                self.stopped_epoch = int(trainer.current_epoch)
        if trainer.is_global_zero:
            self._write(trainer)

    def _directory(self, trainer: "pl.Trainer") -> str:
        if self.dirpath is not None:
            return self.dirpath
        # not trainer.log_dir: a collective (deadlock on rank zero only)
        self._run_dir = run_dir(trainer, None, self._previous_run_dir)
        return RunLayout(self._run_dir).mia

    def _write(self, trainer: "pl.Trainer") -> None:
        path = os.path.join(self._directory(trainer), EARLY_STOPPING_JSON)
        atomic_write_text(path, json.dumps(self.results, indent=2, sort_keys=False) + "\n")
