"""The template's optimizer recipe, taken apart for the reference ensemble.

* :func:`parse_optimizers` reads what ``configure_optimizers()`` returns (an optimizer, a dict, or Lightning's
  list/tuple forms) into one :class:`OptimizerRecipe`.
* :class:`TrainerStandIn` is the minimal object a LightningModule's ``configure_optimizers`` may read through
  ``self.trainer`` (``max_epochs``, ``max_steps``, ``estimated_stepping_batches``) when no Trainer is attached.
* :func:`split_optimizer_state` / :func:`merge_optimizer_state` convert between the state of ONE optimizer over
  stacked ``(K, ...)`` tensors and ``K`` ordinary per-model optimizer states, so a checkpoint is the same
  whichever training path wrote it.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    >>> r = parse_optimizers({"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}})
    >>> r.optimizer is opt, r.scheduler is sched, r.interval
    (True, True, 'epoch')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "OptimizerRecipe",
    "TrainerStandIn",
    "merge_optimizer_state",
    "parse_optimizers",
    "split_optimizer_state",
]

# Optimizers whose update of every parameter element depends only on that element's own gradient and state
# plus scalars shared by all elements (lr, betas, the step count). One optimizer over K stacked models then
# moves each model exactly as K separate optimizers would. Exact types only: a subclass may couple elements.
# Not here: Adagrad (its state is created in __init__, so it cannot be re-pointed at new tensors), LBFGS (line
# search over the whole parameter vector), Adafactor and Muon (factored / matrix-level updates), SparseAdam.
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)

# Optimizer state entries shared by all elements of a parameter (never sliced per model): the step count and
# NAdam's momentum product. Only consulted for 0-dim parameters, whose per-element state is 0-dim too.
_SHARED_STATE_KEYS = ("step", "mu_product")

_INTERVALS = ("epoch", "step")


@dataclass
class OptimizerRecipe:
    """One optimizer, its optional LR scheduler and when the scheduler steps (``"epoch"`` or ``"step"``)."""

    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any] = None
    interval: str = "epoch"

    @property
    def plateau(self) -> bool:
        """Whether the scheduler needs a metric (``ReduceLROnPlateau``)."""
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _scheduler_entry(entry: Any) -> tuple:
    if isinstance(entry, Mapping):
        if "scheduler" not in entry:
            raise ValueError(f"an lr_scheduler dict needs a 'scheduler' key, got keys {sorted(entry)}")
        interval = entry.get("interval", "epoch")
        if interval not in _INTERVALS:
            raise ValueError(f"lr_scheduler interval must be one of {list(_INTERVALS)}, got {interval!r}")
        return entry["scheduler"], interval
    return entry, "epoch"


def parse_optimizers(config: Any) -> OptimizerRecipe:
    """Read the return value of ``configure_optimizers()`` (Lightning's documented forms, one optimizer only).

    Accepted: an optimizer; ``{"optimizer": opt, "lr_scheduler": sched or {"scheduler": sched, "interval": ...}}``;
    ``[opt]``; ``([opt], [sched])``. Several optimizers (manual optimisation, GANs) raise a ValueError.
    """
    if isinstance(config, torch.optim.Optimizer):
        return OptimizerRecipe(config)
    if isinstance(config, Mapping):
        if "optimizer" not in config:
            raise ValueError(f"configure_optimizers() returned a dict without 'optimizer' (keys {sorted(config)})")
        opt = config["optimizer"]
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"configure_optimizers()['optimizer'] must be an optimizer, got {type(opt).__name__}")
        if config.get("lr_scheduler") is None:
            return OptimizerRecipe(opt)
        sched, interval = _scheduler_entry(config["lr_scheduler"])
        return OptimizerRecipe(opt, sched, interval)
    if isinstance(config, (list, tuple)):
        if len(config) == 2 and all(isinstance(c, (list, tuple)) for c in config):
            opts, scheds = list(config[0]), list(config[1])
        else:
            opts, scheds = list(config), []
        if len(opts) == 1 and isinstance(opts[0], Mapping):
            return parse_optimizers(opts[0])
        if len(opts) != 1 or not isinstance(opts[0], torch.optim.Optimizer):
            raise ValueError(
                f"the reference ensemble trains with exactly one optimizer; configure_optimizers() returned "
                f"{len(opts)} optimizer entries"
            )
        if len(scheds) > 1:
            raise ValueError(f"at most one LR scheduler is supported, configure_optimizers() returned {len(scheds)}")
        if not scheds:
            return OptimizerRecipe(opts[0])
        sched, interval = _scheduler_entry(scheds[0])
        return OptimizerRecipe(opts[0], sched, interval)
    raise ValueError(
        f"configure_optimizers() must return an optimizer, a dict with 'optimizer', or a list/tuple of them; "
        f"got {type(config).__name__}"
    )


class TrainerStandIn:
    """What a ``configure_optimizers`` may read from ``self.trainer`` while no Trainer is attached.

    ``max_epochs`` (``None`` when unknown), ``max_steps`` (-1: no step limit, Lightning's default) and
    ``estimated_stepping_batches`` (``steps_per_epoch * max_epochs``, for OneCycleLR-style recipes). Any other
    attribute raises an AttributeError that says so.
    """

    def __init__(self, max_epochs: Optional[int], steps_per_epoch: int) -> None:
        self.max_epochs = max_epochs
        self.max_steps = -1
        self.current_epoch = 0
        self.global_step = 0
        self.world_size = 1
        self.num_devices = 1
        self.estimated_stepping_batches = (
            float("inf") if max_epochs is None else int(max_epochs) * int(steps_per_epoch)
        )

    def __getattr__(self, name: str) -> Any:  # only called for attributes not set above
        raise AttributeError(
            f"the reference ensemble calls configure_optimizers() without a Trainer; its stand-in provides "
            f"max_epochs, max_steps, estimated_stepping_batches, current_epoch, global_step, world_size and "
            f"num_devices, not {name!r}"
        )


def _flat_params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def split_optimizer_state(optimizer: torch.optim.Optimizer, count: int) -> List[Dict[str, Any]]:
    """The state of one optimizer over stacked ``(count, ...)`` parameters as ``count`` per-model state dicts.

    A state tensor shaped like its stacked parameter is sliced (element ``k`` belongs to model ``k``); any other
    entry (the step count) is shared and copied to every model.
    """
    full = optimizer.state_dict()
    params = _flat_params(optimizer)
    out = []
    for k in range(count):
        state: Dict[int, Dict[str, Any]] = {}
        for i, entries in full["state"].items():
            shape = params[int(i)].shape
            state[i] = {
                key: (v[k].detach().clone() if isinstance(v, torch.Tensor) and v.shape == shape else _clone(v))
                for key, v in entries.items()
            }
        groups = [{key: (list(v) if key == "params" else v) for key, v in g.items()} for g in full["param_groups"]]
        out.append({"state": state, "param_groups": groups})
    return out


def merge_optimizer_state(optimizer: torch.optim.Optimizer, states: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The inverse of :func:`split_optimizer_state`: ``len(states)`` per-model states -> one stacked state.

    Param groups (learning rates and the other hyper-parameters, equal for all models) come from ``states[0]``.
    """
    params = _flat_params(optimizer)
    first = states[0]
    merged: Dict[int, Dict[str, Any]] = {}
    for i, entries in first["state"].items():
        shape = params[int(i)].shape[1:]  # one model's parameter shape
        merged[i] = {}
        for key, v in entries.items():
            per_model = isinstance(v, torch.Tensor) and v.shape == shape and (
                len(shape) > 0 or key not in _SHARED_STATE_KEYS
            )
            if per_model:
                merged[i][key] = torch.stack([torch.as_tensor(s["state"][i][key]) for s in states])
            else:
                merged[i][key] = _clone(v)
    return {"state": merged, "param_groups": [dict(g) for g in first["param_groups"]]}
