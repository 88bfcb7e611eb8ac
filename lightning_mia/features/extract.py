"""The one extraction loop: batches in, per-sample logits-derived arrays and feature values out.

Both :func:`extract_features` (scripts, no Lightning) and the monitor's audit pass
(:func:`lightning_mia.extraction.extract_pass`) run through :func:`run_extraction`, so eval mode, label handling,
the loss and the feature calls are the same everywhere. The model is put in eval mode for the pass and every
submodule's own ``training`` flag is restored afterwards (a BatchNorm a user froze with ``.eval()`` stays frozen).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    >>> extract_features(model, "loss", (x, y), batch_size=4).shape
    (10, 1)
    >>> extract_features(model, {"name": "confidence", "top_k": 2}, (x, y)).shape
    (10, 2)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mia.features.base import Feature, Spec, build_feature, eval_mode, iter_chunks, model_device

__all__ = ["run_extraction", "extract_features", "PER_SAMPLE_KEYS"]

#: The per-sample arrays every pass returns besides the features.
PER_SAMPLE_KEYS = ("index", "label", "pred", "correct", "loss")
Batch = Tuple[Tensor, Tensor, Optional[Tensor]]


def run_extraction(
    model: nn.Module,
    batches: Iterable[Batch],
    features: Mapping[str, Feature],
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[int], None]] = None,
    forward: Optional[Callable[[nn.Module, Any], Tensor]] = None,
) -> Dict[str, np.ndarray]:
    """Run ``model`` in eval mode over ``batches`` of ``(x, y, index)`` (``index`` may be ``None``).

    Returns ``index``, ``label``, ``pred``, ``correct``, ``loss``, ``logits`` ``(n, C)`` and ``feat:{tag}`` ``(n, d)``
    float32 arrays.
    A label ``< 0`` marks an unlabelled sample (e.g. out-of-distribution noise): label-dependent values then use
    the predicted class. The per-sample loss is the module's ``mia_loss(logits, y)`` when it has one, else
    cross-entropy. ``forward(model, x)`` replaces ``model(x)`` (e.g. to run under a precision context).
    ``progress`` is called with the number of samples done after each batch.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    call = forward if forward is not None else (lambda m, inputs: m(inputs))
    out: Dict[str, List[np.ndarray]] = {k: [] for k in PER_SAMPLE_KEYS}
    feats: Dict[str, List[np.ndarray]] = {tag: [] for tag in features}
    all_logits: List[np.ndarray] = []
    n_done = 0
    with eval_mode(model):
        for x, y, idx in batches:
            x = x.to(dev)
            y = torch.as_tensor(y).to(dev).long().reshape(-1)
            with torch.no_grad():
                logits = call(model, x)
                y = torch.where(y < 0, logits.argmax(dim=1), y)
                hook = getattr(model, "mia_loss", None)  # optional per-sample loss of the user's module
                loss = hook(logits, y) if callable(hook) else F.cross_entropy(logits.float(), y, reduction="none")
                pred = logits.argmax(dim=1)
            index = torch.arange(n_done, n_done + len(y)) if idx is None else torch.as_tensor(idx)
            out["index"].append(index.cpu().numpy().astype(np.int64).reshape(-1))
            out["label"].append(y.cpu().numpy())
            out["pred"].append(pred.cpu().numpy())
            out["correct"].append((pred == y).cpu().numpy())
            out["loss"].append(loss.float().cpu().numpy().reshape(-1))
            all_logits.append(logits.detach().float().cpu().numpy().reshape(len(y), -1))
            for tag, feat in features.items():
                with torch.enable_grad() if feat.requires_grad else torch.no_grad():
                    values = feat.extract(model, x, y, logits)
                feats[tag].append(torch.as_tensor(values).detach().float().reshape(len(y), -1).cpu().numpy())
            n_done += len(y)
            if progress is not None:
                progress(len(y))
    arrays: Dict[str, np.ndarray] = {}
    for k, parts in out.items():
        arrays[k] = np.concatenate(parts) if parts else np.zeros(0, np.float32 if k == "loss" else np.int64)
    arrays["correct"] = arrays["correct"].astype(bool)
    arrays["logits"] = np.concatenate(all_logits) if all_logits else np.zeros((0, 0), np.float32)
    for tag, parts in feats.items():
        arrays[f"feat:{tag}"] = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    return arrays


def _batches(data: Union[Dataset, Sequence[Tensor], Tuple[Tensor, Tensor]], batch_size: int) -> Iterator[Batch]:
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, Tensor) for t in data[:2]):
        x, y = data[0], data[1]
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
        for sl in iter_chunks(len(x), batch_size):
            yield x[sl], y[sl], None
        return
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            "data must be a Dataset of (x, y, index) or (x, y) items, or a tuple of tensors (x, y); "
            f"got {type(data).__name__}"
        )
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("Dataset items must be (x, y, index) or (x, y) tuples")
        yield batch[0], batch[1], batch[2] if len(batch) > 2 else None


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
        postprocess: also fit ``feature.fit_postprocess`` (e.g. a PCA cap) on the result and apply it. Only
            right when ``data`` is the whole audit pool.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> extract_features(model, "softmax", (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))).dtype
        dtype('float32')
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    feat = build_feature(feature)
    arrays = run_extraction(model, _batches(data, batch_size), {"f": feat}, device=device)
    out = arrays["feat:f"].astype(np.float32, copy=False)
    if not len(out):
        return np.zeros((0, 0), dtype=np.float32)
    if postprocess:
        out = np.asarray(feat.fit_postprocess(out)(out), dtype=np.float32)
    return out
