"""``trajectory``: a sample's loss (or logit-scaled confidence) at every audited epoch so far.

The monitor sees every epoch, which no outside attacker does: the trajectory of a sample's loss over training is
what loss-trajectory attacks (Liu et al., CCS 2022; SeqMIA, CCS 2024) must imitate with distilled models. Here it
is the real one, so this feature measures what an attacker gets from released intermediate checkpoints.

The batch-level :meth:`Trajectory.extract` returns the signal at the current epoch; the history across audits is
kept by :class:`TrajectoryState` (in the auditor's state, so checkpoints keep it), which turns it into the
``(n, T)`` matrix that learned attacks are fitted on (cross-fitted with ``StandardProtocol(folds=...)``), and
into a no-fitting score, ``{tag}_drop``: the fall of the signal since the first audit, standardised per class
(members are trained on from epoch 0, so their loss falls further than a non-member's of the same class).
Earlier epochs are NOT out-references for members; the learned attack learns from labelled trajectories of both.

Example:
    >>> import numpy as np
    >>> st = TrajectoryState(history=3)
    >>> for e, v in enumerate([[2.0, 2.0], [1.0, 1.9], [0.5, 1.8]]):
    ...     X = st.update(e, np.array(v))
    >>> X.tolist()
    [[2.0, 1.0, 0.5], [2.0, 1.9, 1.8]]
    >>> st.drop(np.array([0, 0])).round(3).tolist()   # standardised fall since the first audit
    [1.0, -1.0]
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

import numpy as np
from torch import Tensor, nn

from lightning_mia.features.base import FEATURES, Feature, check_choice, check_positive
from lightning_mia.features.confidence import LogitScaledConfidence, Loss

__all__ = ["Trajectory", "TrajectoryState"]


@FEATURES.register("trajectory")
class Trajectory(Feature):
    """The sample's ``signal`` at each of the last ``history`` audited epochs (see the module docstring).

    Args:
        signal: ``loss`` (lower for members) or ``logit_scaled_confidence`` (higher for members).
        history: how many audits the trajectory keeps (the first audit is kept too, for ``{tag}_drop``).

    Example:
        >>> import torch
        >>> Trajectory().extract(None, None, torch.tensor([1]), torch.zeros(1, 2)).shape
        torch.Size([1, 1])
    """

    name = "trajectory"

    def __init__(self, signal: Literal["loss", "logit_scaled_confidence"] = "loss", history: int = 10) -> None:
        self.signal = check_choice("signal", signal, ("loss", "logit_scaled_confidence"))
        self.history = check_positive("history", history, integer=True)
        self._inner = Loss() if signal == "loss" else LogitScaledConfidence()

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        return self._inner.extract(model, x, y, logits)


class TrajectoryState:
    """Per-sample signal history across audits, bounded to the first audit plus the last ``history``.

    Plain lists inside, so it goes into checkpoints that load with ``torch.load(weights_only=True)``.
    """

    def __init__(self, history: int = 10, sign: float = 1.0) -> None:
        self.history = int(history)
        #: +1 for a loss (a fall means membership), -1 for a confidence (a rise does)
        self.sign = float(sign)
        self.epochs: List[int] = []
        self.values: List[List[float]] = []
        self.first: Optional[List[float]] = None

    def update(self, epoch: int, values: np.ndarray) -> np.ndarray:
        """Record this audit's ``(n,)`` values (a re-audited epoch replaces its old row); returns ``(n, T)``."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.values and len(self.values[-1]) != len(values):
            raise ValueError(f"trajectory: {len(values)} samples now, {len(self.values[-1])} before (the audit "
                             "pool changed; start a fresh audit)")
        keep = [(e, v) for e, v in zip(self.epochs, self.values) if e < epoch]
        self.epochs = [e for e, _ in keep] + [int(epoch)]
        self.values = [v for _, v in keep] + [values.tolist()]
        if self.first is None or not keep:
            self.first = values.tolist()
        self.epochs, self.values = self.epochs[-self.history:], self.values[-self.history:]
        return self.matrix()

    def matrix(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64).T

    def drop(self, labels: np.ndarray) -> np.ndarray:
        """The signal's fall since the first audit (``sign`` applied), standardised within each class."""
        now, first = np.asarray(self.values[-1]), np.asarray(self.first)
        d = self.sign * (first - now)
        out = np.full(d.shape, np.nan)
        labels = np.asarray(labels)
        for c in np.unique(labels):
            m = (labels == c) & np.isfinite(d)
            if m.sum() >= 2:
                sd = d[m].std()
                out[m] = (d[m] - d[m].mean()) / sd if sd > 0 else 0.0
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": list(self.epochs), "values": [list(v) for v in self.values], "first": self.first,
                "history": self.history, "sign": self.sign}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "TrajectoryState":
        out = cls(int(state["history"]), float(state["sign"]))
        out.epochs, out.values = [int(e) for e in state["epochs"]], [list(map(float, v)) for v in state["values"]]
        out.first = None if state.get("first") is None else list(map(float, state["first"]))
        return out
