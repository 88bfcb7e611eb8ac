"""Feature base class, the ``FEATURES`` registry and :func:`extract_features`.

A feature turns a batch ``(x, y)`` and the model's logits on it into a float32 ``(n, d)`` tensor, one row per
sample. Features are plain objects on tensors; the membership-inference callback only orchestrates them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_mia.features import FEATURES, extract_features
    >>> model = nn.Linear(4, 3)
    >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    >>> extract_features(model, "loss", (x, y), batch_size=4).shape
    (10, 1)
    >>> extract_features(model, {"name": "confidence", "top_k": 2}, (x, y)).shape
    (10, 2)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mia.registry import Registry

__all__ = [
    "FEATURES",
    "Feature",
    "build_feature",
    "extract_features",
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

    def fit_postprocess(self, X: np.ndarray) -> np.ndarray:
        """Post-process the whole audit pool's ``(n, d)`` array at once (default: identity)."""
        return X

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


def _batches(
    data: Union[Dataset, Sequence[Tensor], Tuple[Tensor, Tensor]], batch_size: int
) -> Iterator[Tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, Tensor) for t in data[:2]):
        x, y = data[0], data[1]
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
        for sl in iter_chunks(len(x), batch_size):
            yield x[sl], y[sl]
        return
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            "data must be a Dataset of (x, y, index) or (x, y) items, or a tuple of tensors (x, y); "
            f"got {type(data).__name__}"
        )
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("Dataset items must be (x, y, index) or (x, y) tuples")
        yield batch[0], batch[1]


def extract_features(
    model: nn.Module,
    feature: Union[Spec, Feature],
    data: Union[Dataset, Sequence[Tensor], Tuple[Tensor, Tensor]],
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    postprocess: bool = False,
) -> np.ndarray:
    """Run ``feature`` over ``data`` and return a float32 ``(n, d)`` numpy array.

    Works outside Lightning. The model is put in eval mode for the pass; every module's training flag and
    every parameter's ``requires_grad`` flag are restored afterwards.

    Args:
        model: the target classifier (returns logits).
        feature: a :class:`Feature`, a registered name, or ``{"name": ..., **options}``.
        data: a Dataset yielding ``(x, y, index)`` or ``(x, y)`` items, or a tuple of tensors ``(x, y)``.
        batch_size: samples per forward pass (gradient features chunk further internally).
        device: where to compute; default the model's device (the model is not moved).
        postprocess: also apply ``feature.fit_postprocess`` (e.g. a PCA cap) to the result. Only correct when
            ``data`` is the whole audit pool; otherwise call ``fit_postprocess`` once on the concatenated pool.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> extract_features(model, "softmax", (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))).dtype
        dtype('float32')
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    feat = build_feature(feature)
    dev = torch.device(device) if device is not None else model_device(model)
    parts: List[np.ndarray] = []
    with eval_mode(model):
        for x, y in _batches(data, batch_size):
            x = x.to(dev)
            y = torch.as_tensor(y).to(dev).long()
            with torch.no_grad():
                logits = model(x)
            ctx = torch.enable_grad() if feat.requires_grad else torch.no_grad()
            with ctx:
                values = feat.extract(model, x, y, logits)
            parts.append(values.detach().float().reshape(len(x), -1).cpu().numpy())
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.concatenate(parts).astype(np.float32, copy=False)
    if postprocess:
        out = np.asarray(feat.fit_postprocess(out), dtype=np.float32)
    return out


def as_long_labels(y: Optional[Tensor], n: int, device: torch.device) -> Tensor:
    """Labels as an int64 tensor of shape ``(n,)`` on ``device`` (raises when missing)."""
    if y is None:
        raise ValueError("This feature needs the true labels y")
    y = torch.as_tensor(y, device=device).long().reshape(-1)
    if y.numel() != n:
        raise ValueError(f"Got {y.numel()} labels for {n} samples")
    return y


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Raise a ValueError naming the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> Any:
    """Raise a ValueError unless ``value`` is a positive (or non-negative) number / integer."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (value < 0 if allow_zero else value <= 0) or value != value:
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a {kind} {bound}, got {value!r}")
    return value

