"""What would early stopping have done? — a pure replay of Lightning's rule plus a recording callback.

The paper (Rezaei & Liu 2021, supplementary "Training progress and MI attack") argues that MI attacks look strong
mostly on overfitted models and that "adopting a simple technique, such as early stopping, can even eliminate such
a possibility". :class:`EarlyStoppingComparison` records the monitored validation metric every validation run,
and for several patiences tells at which epoch Lightning's ``EarlyStopping`` would have stopped, so the report can
put the attack's numbers at those epochs next to the end of training.

:func:`would_stop` replays ``pytorch_lightning.callbacks.EarlyStopping`` exactly (same comparison in the same
float dtype, same ``min_delta`` sign handling, same ``wait_count >= patience`` rule, same non-finite check), on a
recorded sequence, without a trainer.

Example:
    >>> would_stop([1.0, 0.8, 0.9, 0.85, 0.95], patience=2)
    {'stop_epoch': 3, 'best_epoch': 1, 'best_value': 0.800000011920929, 'reason': 'patience', 'wait_count': 2, 'n_checks': 4}
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_mia.callbacks.paths import mia_dir

#: Patiences compared by default (Lightning's own default patience is 3).
DEFAULT_PATIENCES: Tuple[int, ...] = (3, 5, 10)
MODES = ("min", "max")
ES_FILENAME = "early_stopping.json"

Values = Union[Sequence[float], Sequence[Tuple[int, float]], Mapping[int, float]]


def rule_name(patience: int) -> str:
    """Name of the early-stopping point for ``patience`` in tables and JSON (``es_patience_5``)."""
    return f"es_patience_{int(patience)}"


def _num(v: Any) -> float:
    # JSON stores non-finite values as null; read them back as NaN.
    return math.nan if v is None else float(v)


def _as_pairs(values: Values) -> List[Tuple[int, float]]:
    """(epoch, value) pairs in check order from a plain sequence (index = epoch), pairs or an epoch mapping."""
    if isinstance(values, Mapping):
        return [(int(e), _num(v)) for e, v in sorted(values.items())]
    pairs: List[Tuple[int, float]] = []
    for i, item in enumerate(values):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"expected (epoch, value) pairs, got {item!r}")
            pairs.append((int(item[0]), _num(item[1])))
        elif isinstance(item, Mapping):
            pairs.append((int(item["epoch"]), _num(item["value"])))
        else:
            pairs.append((i, _num(item)))
    return pairs


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")


def _dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return getattr(torch, name)


def would_stop(
    values: Values,
    patience: int,
    min_delta: float = 0.0,
    mode: str = "min",
    check_finite: bool = True,
    dtype: Union[str, torch.dtype] = torch.float32,
) -> Dict[str, Any]:
    """Replay Lightning's ``EarlyStopping`` on a recorded metric sequence.

    Args:
        values: the monitored value at each check: a plain sequence (position = epoch), ``(epoch, value)``
            pairs in check order (validation need not run every epoch; several checks may share an epoch), or
            an ``{epoch: value}`` mapping.
        patience: checks without improvement before stopping (``wait_count >= patience``), as in Lightning.
        min_delta: an improvement must beat the best by more than this (``current + min_delta < best`` in min mode).
        mode: ``"min"`` or ``"max"``.
        check_finite: stop at the first NaN/inf value, as Lightning's ``check_finite=True``.
        dtype: dtype of the logged metric tensor; ``self.log`` of a Python float gives float32, and the comparison
            is done in that dtype exactly as Lightning does it (it matters at ``min_delta`` boundaries).

    Returns:
        ``stop_epoch`` (epoch of the check at which training would stop, ``None`` if never), ``best_epoch`` /
        ``best_value`` (last improvement up to the stop; ``None`` if none), ``reason`` (``"patience"``,
        ``"non_finite"`` or ``None``), ``wait_count`` and ``n_checks`` (checks replayed up to the stop).
    """
    _check_mode(mode)
    if isinstance(patience, bool) or int(patience) != patience or patience < 0:
        raise ValueError(f"`patience` must be an int >= 0, got {patience!r}")
    dt = _dtype(dtype)
    # Same operations as EarlyStopping.__init__ / _evaluate_stopping_criteria, so rounding matches bit for bit.
    monitor_op = {"min": torch.lt, "max": torch.gt}[mode]
    signed_delta = min_delta * (1 if monitor_op == torch.gt else -1)
    best = torch.tensor(torch.inf) if monitor_op == torch.lt else -torch.tensor(torch.inf)
    wait = 0
    best_epoch: Optional[int] = None
    best_value: Optional[float] = None
    n_checks = 0
    for epoch, value in _as_pairs(values):
        n_checks += 1
        current = torch.tensor(value, dtype=dt)
        if check_finite and not torch.isfinite(current):
            return _result(epoch, best_epoch, best_value, "non_finite", wait, n_checks)
        if monitor_op(current - signed_delta, best.to(current.device)):
            best, wait, best_epoch, best_value = current, 0, epoch, float(current)
        else:
            wait += 1
            if wait >= patience:
                return _result(epoch, best_epoch, best_value, "patience", wait, n_checks)
    return _result(None, best_epoch, best_value, None, wait, n_checks)


def _result(stop, best_epoch, best_value, reason, wait, n) -> Dict[str, Any]:
    return {"stop_epoch": stop, "best_epoch": best_epoch, "best_value": best_value, "reason": reason,
            "wait_count": wait, "n_checks": n}


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def early_stopping_results(
    values: Values,
    patiences: Sequence[int] = DEFAULT_PATIENCES,
    min_delta: float = 0.0,
    mode: str = "min",
    check_finite: bool = True,
    dtype: Union[str, torch.dtype] = torch.float32,
    monitor: str = "val_loss",
    **extra: Any,
) -> Dict[str, Any]:
    """The early-stopping comparison record (the content of ``mia/early_stopping.json``).

    Keys: ``monitor, mode, min_delta, check_finite, dtype, patience`` (list), ``values`` (list of
    ``{"epoch", "value"[, "step"]}``), ``rules`` (one per patience: ``name`` = ``es_patience_P``, ``patience`` and
    the :func:`would_stop` fields), ``best_epoch`` / ``best_value`` (best finite value over all checks, first on
    ties — the "best validation" epoch), plus any ``extra`` keys (e.g. ``source``, ``last_epoch``).

    Example:
        >>> r = early_stopping_results([0.9, 0.7, 0.8, 0.75, 0.65], patiences=[2, 3])
        >>> [(x["name"], x["stop_epoch"]) for x in r["rules"]], r["best_epoch"]
        ([('es_patience_2', 3), ('es_patience_3', None)], 4)
    """
    _check_mode(mode)
    if isinstance(values, Mapping) or (len(values) and not isinstance(values[0], Mapping)):
        records = [{"epoch": e, "value": v} for e, v in _as_pairs(values)]
    else:
        records = [dict(r) for r in values]
    pairs = _as_pairs(records)
    rules = []
    for p in patiences:
        res = would_stop(pairs, p, min_delta=min_delta, mode=mode, check_finite=check_finite, dtype=dtype)
        rules.append({"name": rule_name(p), "patience": int(p), **res})
    finite = [(e, v) for e, v in pairs if v is not None and math.isfinite(v)]
    best_epoch = best_value = None
    if finite:
        pick = min if mode == "min" else max
        best_epoch, best_value = pick(finite, key=lambda ev: ev[1])  # first of ties: min/max keep the first
    out = {"monitor": monitor, "mode": mode, "min_delta": float(min_delta), "check_finite": bool(check_finite),
           "dtype": str(_dtype(dtype)).replace("torch.", ""), "patience": [int(p) for p in patiences],
           "values": records, "rules": rules, "best_epoch": best_epoch, "best_value": best_value}
    out.update(extra)
    return _clean(out)


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
        dirpath: where ``early_stopping.json`` goes; default ``{logger.log_dir}/mia``.

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
        mode: str = "min",
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
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not (0 <= min_delta < math.inf):
            raise ValueError(f"`min_delta` must be a finite number >= 0, got {min_delta!r}")
        _check_mode(mode)
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

    # ---- Lightning state -------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, patience=tuple(self.patience))

    def state_dict(self) -> Dict[str, Any]:
        return {"records": [dict(r) for r in self._records], "dtype": self._dtype,
                "stopped_epoch": self.stopped_epoch, "last_epoch": self._last_epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._records = [dict(r) for r in state_dict.get("records", [])]
        self._dtype = state_dict.get("dtype", "float32")
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self._last_epoch = state_dict.get("last_epoch")

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
        from pytorch_lightning.trainer.states import TrainerFn

        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run)

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
                rank_zero_warn(msg, category=RuntimeWarning)
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
        return mia_dir(trainer)  # not trainer.log_dir: that is a collective (deadlock on rank zero only)

    def _write(self, trainer: "pl.Trainer") -> None:
        from lightning_mia.report.history import atomic_write_text

        path = os.path.join(self._directory(trainer), ES_FILENAME)
        atomic_write_text(path, json.dumps(self.results, indent=2, sort_keys=False) + "\n")


def load_early_stopping(path: str) -> Optional[Dict[str, Any]]:
    """Read an ``early_stopping.json``; ``None`` when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)
