"""What would early stopping have done? -- a pure replay of Lightning's ``EarlyStopping`` rule.

Used by :class:`lightning_mia.callbacks.EarlyStoppingComparison` (which records the metric during training) and by
the report (which recomputes the comparison from a history when no record exists). The paper (Rezaei & Liu 2021, supplementary "Training progress and MI attack") argues that MI attacks look strong
mostly on overfitted models and that "adopting a simple technique, such as early stopping, can even eliminate such
a possibility". :class:`~lightning_mia.callbacks.EarlyStoppingComparison` records the monitored validation metric every validation run,
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

#: Patiences compared by default (Lightning's own default patience is 3).
DEFAULT_PATIENCES: Tuple[int, ...] = (3, 5, 10)
MODES = ("min", "max")

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
