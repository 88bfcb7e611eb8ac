"""Feature base class, the ``FEATURES`` registry and the helpers features share (eval mode, autograd, chunks).

A feature turns a batch ``(x, y)`` and the model's logits on it into a float32 ``(n, d)`` tensor, one row per
sample. Features are plain objects on tensors; the membership-inference callback only orchestrates them.

Example:
    >>> from lightning_mia.features import FEATURES
    >>> FEATURES.build({"name": "confidence", "top_k": 2}).top_k
    2
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_mia.registry import Registry
from lightning_mia.validation import check_choice, check_positive  # noqa: F401 - used by the feature modules

__all__ = [
    "FEATURES",
    "Feature",
    "build_feature",
    "eval_mode",
    "model_device",
    "iter_chunks",
    "autograd_on",
    "autograd_input",
]

FEATURES = Registry("feature")

Spec = Union[str, Mapping[str, Any]]


class Feature:
    """Base class of per-sample features.

    Subclasses set ``name`` (the registry name), ``requires_grad`` (True when :meth:`extract` needs autograd;
    callers then run it outside ``torch.no_grad``) and implement :meth:`extract`.

    Example:
        >>> import torch
        >>> class Margin(Feature):
        ...     name = "margin"
        ...     def extract(self, model, x, y, logits=None):
        ...         logits = self.logits(model, x, logits)
        ...         top2 = logits.topk(2, dim=1).values
        ...         return (top2[:, :1] - top2[:, 1:]).float()
        >>> Margin().extract(torch.nn.Identity(), torch.tensor([[3.0, 1.0, 0.0]]), None).tolist()
        [[2.0]]
    """

    name: str = "feature"
    requires_grad: bool = False

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        """Return a float32 ``(n, d)`` tensor for the batch ``x`` (labels ``y``).

        ``logits`` is ``model(x)`` computed by the caller in eval mode under ``no_grad``; features that only
        need logits use it, others may recompute what they need.
        """
        raise NotImplementedError

    def fit_postprocess(self, X: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Fit a post-processing transform on the whole audit pool's ``(n, d)`` array and return it.

        The transform applies to the pool and to any other rows later (e.g. out-of-distribution probes), so
        they are projected the same way. Default: the identity.
        """
        return _identity

    def dim_names(self, d: int) -> List[str]:
        """Names of the ``d`` output columns (default ``{name}_{i}``)."""
        if d == 1:
            return [self.name]
        return [f"{self.name}_{i}" for i in range(d)]

    @staticmethod
    def logits(model: nn.Module, x: Tensor, logits: Optional[Tensor]) -> Tensor:
        """``logits`` when given, else ``model(x)`` in eval mode without autograd."""
        if logits is not None:
            return logits
        with eval_mode(model), torch.no_grad():
            return model(x)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def _identity(X: np.ndarray) -> np.ndarray:
    return X


def build_feature(spec: Union[Spec, Feature], **defaults: Any) -> Feature:
    """A :class:`Feature` from an instance, a registered name or ``{"name": ..., **options}``."""
    if isinstance(spec, Feature):
        return spec
    return FEATURES.build(spec, **defaults)


@contextlib.contextmanager
def eval_mode(model: nn.Module, requires_grad: Optional[bool] = None) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's ``training`` flag (and, when
    ``requires_grad`` is given, every parameter's ``requires_grad`` after setting it) on exit.

    Per-module restoration matters: a model may deliberately keep e.g. frozen BatchNorm layers in eval mode
    while training.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        if requires_grad is not None:
            for p, _ in flags:
                p.requires_grad_(requires_grad)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad()`` or ``torch.inference_mode()`` (Lightning runs its
    validation loop in inference mode); use :func:`autograd_input` for tensors created there."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def autograd_input(x: Tensor) -> Tensor:
    """``x`` detached, as a normal tensor usable by autograd (inference-mode tensors are copied)."""
    x = x.detach()
    if x.is_inference():
        with torch.inference_mode(False):
            x = x.clone()
    return x


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0:size], [size:2*size], ...`` covering ``range(n)``."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def as_long_labels(y: Optional[Tensor], n: int, device: torch.device) -> Tensor:
    """Labels as an int64 tensor of shape ``(n,)`` on ``device`` (raises when missing)."""
    if y is None:
        raise ValueError("This feature needs the true labels y")
    y = torch.as_tensor(y, device=device).long().reshape(-1)
    if y.numel() != n:
        raise ValueError(f"Got {y.numel()} labels for {n} samples")
    return y



