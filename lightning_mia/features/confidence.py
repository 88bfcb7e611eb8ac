"""Features computed from the model's output scores alone.

Registered names: ``confidence`` (softmax sorted descending, option ``top_k``), ``softmax``,
``true_class_prob``, ``loss``, ``entropy``, ``modified_entropy`` and ``logit_scaled_confidence``.

All of them work from the logits (given by the caller, or computed with ``model(x)`` when missing), in float64
log-space so that saturated softmax outputs (p = 1 - 1e-12) and extreme logits give finite, accurate values;
the result is cast to float32.

Example:
    >>> import torch
    >>> from lightning_mia.features import FEATURES
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> FEATURES["loss"]().extract(None, None, torch.tensor([0]), logits)
    tensor([[0.1698]])
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from lightning_mia.features.base import FEATURES, Feature, as_long_labels, check_positive

__all__ = [
    "Confidence",
    "Softmax",
    "TrueClassProb",
    "Loss",
    "Entropy",
    "ModifiedEntropy",
    "LogitScaledConfidence",
    "log_softmax64",
    "log1m_softmax",
]


def log_softmax64(logits: Tensor) -> Tensor:
    """``log_softmax`` in float64 of a ``(n, K)`` logit tensor, accurate also for the arg-max class.

    Plain ``log_softmax`` rounds ``log p_max = -log(1 + sum_{k != max} e^{z_k - z_max})`` to 0 once the other
    classes' mass drops below 1e-16, losing e.g. the loss of a confidently correct sample; here
    ``log p_max = log1p(-(1 - p_max))`` with ``1 - p_max`` from :func:`log1m_softmax`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (n, num_classes), got {tuple(logits.shape)}")
    z = logits.detach().double()
    # z - logsumexp(z) rather than torch.log_softmax: same arithmetic, but log_softmax's CPU kernel always
    # enters a parallel region, which costs a scheduler time slice (~10 ms) on a busy machine.
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    if z.shape[1] < 2:
        return logp
    top = z.argmax(dim=1, keepdim=True)
    rest = _log_rest_of_top(z, top)  # log(1 - p_max)
    return logp.scatter(1, top, torch.log1p(-rest.exp()))


def _log_rest_of_top(z: Tensor, top: Tensor) -> Tensor:
    """``log(sum_{k != top} p_k)`` of float64 logits ``z``: finite even where ``p_top`` rounds to 1."""
    others = z.scatter(1, top, float("-inf"))
    return torch.logsumexp(others, dim=1, keepdim=True) - torch.logsumexp(z, dim=1, keepdim=True)


def log1m_softmax(logits: Tensor) -> Tensor:
    """``log(1 - softmax(logits))`` in float64 without cancellation.

    For every class but the arg-max, ``p_j <= 1/2`` so ``log1p(-p_j)`` is accurate. For the arg-max class
    ``1 - p_j`` is the mass of the other classes, ``exp(logsumexp_{k != j} z_k - logsumexp_k z_k)``, which stays
    finite even when ``p_j`` rounds to 1.
    """
    z = logits.detach().double()
    if z.shape[1] < 2:
        raise ValueError("log(1 - p) needs at least two classes")
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    out = torch.log1p(-torch.exp(z - lse))
    top = z.argmax(dim=1, keepdim=True)
    out.scatter_(1, top, _log_rest_of_top(z, top))
    return out


@FEATURES.register("confidence")
class Confidence(Feature):
    """Softmax vector sorted in descending order (class-agnostic confidence profile).

    Args:
        top_k: keep only the ``top_k`` largest probabilities (``None``: all classes).

    Example:
        >>> import torch
        >>> Confidence(top_k=2).extract(None, None, None, torch.tensor([[0.0, 1.0, 0.0]])).shape
        torch.Size([1, 2])
    """

    name = "confidence"

    def __init__(self, top_k: Optional[int] = None) -> None:
        if top_k is not None:
            check_positive("top_k", top_k, integer=True)
        self.top_k = top_k

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        p = log_softmax64(self.logits(model, x, logits)).exp()
        p = p.sort(dim=1, descending=True).values
        if self.top_k is not None:
            p = p[:, : self.top_k]
        return p.float()

    def dim_names(self, d: int) -> List[str]:
        return [f"confidence_top{i + 1}" for i in range(d)]


@FEATURES.register("softmax")
class Softmax(Feature):
    """The full softmax vector in class order.

    Example:
        >>> import torch
        >>> Softmax().extract(None, None, None, torch.zeros(1, 4)).tolist()
        [[0.25, 0.25, 0.25, 0.25]]
    """

    name = "softmax"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        return log_softmax64(self.logits(model, x, logits)).exp().float()

    def dim_names(self, d: int) -> List[str]:
        return [f"p_{i}" for i in range(d)]


@FEATURES.register("true_class_prob")
class TrueClassProb(Feature):
    """Softmax probability of the true class, ``p_y`` (one column).

    Example:
        >>> import torch
        >>> TrueClassProb().extract(None, None, torch.tensor([1]), torch.zeros(1, 2)).tolist()
        [[0.5]]
    """

    name = "true_class_prob"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        logp = log_softmax64(self.logits(model, x, logits))
        y = as_long_labels(y, len(logp), logp.device)
        return logp.gather(1, y[:, None]).exp().float()


@FEATURES.register("loss")
class Loss(Feature):
    """Cross-entropy with the true label, ``-log p_y`` (one column; lower for members).

    A model with a ``mia_loss(logits, y)`` method (per-sample losses) is scored with that instead, so a
    LightningModule trained on another loss is audited on the loss it actually minimises.

    Example:
        >>> import torch
        >>> round(Loss().extract(None, None, torch.tensor([1]), torch.zeros(1, 2)).item(), 4)
        0.6931
    """

    name = "loss"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        logits = self.logits(model, x, logits)
        hook = getattr(model, "mia_loss", None)
        if callable(hook):
            return torch.as_tensor(hook(logits, y)).reshape(len(logits), 1).float()
        logp = log_softmax64(logits)
        y = as_long_labels(y, len(logp), logp.device)
        return (-logp.gather(1, y[:, None])).float()


@FEATURES.register("entropy")
class Entropy(Feature):
    """Shannon entropy of the softmax, ``-sum_j p_j log p_j`` in nats (one column).

    Example:
        >>> import torch
        >>> round(Entropy().extract(None, None, None, torch.zeros(1, 2)).item(), 4)
        0.6931
    """

    name = "entropy"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        logp = log_softmax64(self.logits(model, x, logits))
        # p * log p with p == 0 (exp underflow) and finite log p is exactly 0, never NaN.
        return (-(logp.exp() * logp).sum(dim=1, keepdim=True)).float()


@FEATURES.register("modified_entropy")
class ModifiedEntropy(Feature):
    """Modified entropy of Song & Mittal (USENIX Security 2021, eq. 5), one column:

    ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j)``

    It is monotonically decreasing in ``p_y`` and increasing in the wrong-class probabilities, so it is low for
    confidently correct samples (members) and high for confidently wrong ones.

    Example:
        >>> import torch
        >>> round(ModifiedEntropy().extract(None, None, torch.tensor([0]), torch.zeros(1, 2)).item(), 4)
        0.6931
    """

    name = "modified_entropy"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        z = self.logits(model, x, logits)
        logp = log_softmax64(z)
        log1m = log1m_softmax(z)
        y = as_long_labels(y, len(logp), logp.device)
        p = logp.exp()
        true_term = -log1m.gather(1, y[:, None]).exp() * logp.gather(1, y[:, None])
        wrong = -(p * log1m)
        wrong = wrong.scatter(1, y[:, None], 0.0)
        return (true_term + wrong.sum(dim=1, keepdim=True)).float()


@FEATURES.register("logit_scaled_confidence")
class LogitScaledConfidence(Feature):
    """``log p_y - log sum_{j != y} p_j`` (the logit of the true-class probability, as in LiRA, Carlini et
    al. 2022, Sec. IV-B), one column.

    Computed as ``z_y - logsumexp_{j != y} z_j`` from the logits: no ``log(0)``, finite for any finite logits.

    Example:
        >>> import torch
        >>> LogitScaledConfidence().extract(None, None, torch.tensor([0]), torch.tensor([[1000.0, 0.0]])).tolist()
        [[1000.0]]
    """

    name = "logit_scaled_confidence"

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        z = self.logits(model, x, logits).detach().double()
        if z.dim() != 2 or z.shape[1] < 2:
            raise ValueError(f"logit_scaled_confidence needs (n, K >= 2) logits, got {tuple(z.shape)}")
        y = as_long_labels(y, len(z), z.device)
        others = z.scatter(1, y[:, None], float("-inf"))
        return (z.gather(1, y[:, None]) - torch.logsumexp(others, dim=1, keepdim=True)).float()
