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

import contextlib
import copy
import dataclasses
import warnings
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mia.features.base import Feature, Spec, build_feature, eval_mode, iter_chunks, model_device

__all__ = ["AuditForward", "run_extraction", "extract_features", "move_to_device", "needs_float_input",
           "PER_SAMPLE_KEYS"]

#: The per-sample arrays every pass returns besides the features.
PER_SAMPLE_KEYS = ("index", "label", "pred", "correct", "loss")
#: ``(inputs, y, index)``: ``inputs`` a tensor, or a tuple / list / dict of tensors (batch dimension first).
Batch = Tuple[Any, Tensor, Optional[Tensor]]
ForwardFn = Callable[[nn.Module, Any], Tensor]


def move_to_device(batch: Any, device: Union[str, torch.device]) -> Any:
    """``batch`` with every tensor moved to ``device``: tensors, tuples / lists / named tuples / dicts of them
    (recursively) and objects with a ``.to(device)`` method; anything else is returned as it is (what Lightning's
    ``move_data_to_device`` does, without Lightning)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def _identity(x: Any) -> Any:
    return x


@dataclasses.dataclass
class AuditForward:
    """How the extraction pass runs the model. The default runs it as a plain module; inside a Trainer,
    :func:`lightning_mia.compat.audit_forward` builds one from the trainer's precision plugin, so the audit
    computes what the trainer computes.

    Args:
        context: a context-manager factory the forward pass runs in (``precision_plugin.forward_context``).
        grad_context: the same for features that need autograd (default: ``context``); ``nullcontext`` under
            mixed precision keeps their numerics in float32, outside autocast.
        convert_input: applied to each ``(inputs, y, index)`` batch before the device move
            (``precision_plugin.convert_input``).
        transfer: ``transfer(batch, device)`` moves a batch (a LightningModule's ``transfer_batch_to_device``);
            default :func:`move_to_device`.
        float32_grad_model: run the autograd features on a float32 copy of a half-precision model (made once per
            set of weights, freed with this object), with the inputs before ``convert_input``.
        call: ``call(model, inputs) -> logits`` replaces the model's ``mia_forward`` / ``forward``.
        precision: the trainer's precision flag, for messages.
    """

    context: Callable[[], ContextManager] = contextlib.nullcontext
    grad_context: Optional[Callable[[], ContextManager]] = None
    convert_input: Optional[Callable[[Any], Any]] = None
    transfer: Optional[Callable[[Any, torch.device], Any]] = None
    float32_grad_model: bool = False
    call: Optional[ForwardFn] = None
    precision: str = "32-true"
    _copy: Optional[Tuple[Any, nn.Module]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def plain(self) -> bool:
        """True when this runs the model exactly as ``model(x)`` would (no context, hook or conversion)."""
        return (self.context is contextlib.nullcontext and self.grad_context in (None, contextlib.nullcontext)
                and self.convert_input is None and self.call is None and not self.float32_grad_model)

    def to_device(self, batch: Any, device: torch.device, convert: bool = True) -> Any:
        if convert and self.convert_input is not None:
            batch = self.convert_input(batch)
        return (self.transfer or move_to_device)(batch, device)

    def float32_model(self, model: nn.Module) -> Optional[nn.Module]:
        """A float32 copy of ``model`` when ``float32_grad_model`` and it holds half-precision parameters (cached
        for the same weights); ``None`` otherwise, or when the model cannot be copied (warned once)."""
        params = list(model.parameters())
        if not self.float32_grad_model or not any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
            return None
        key = (id(model), tuple((p.data_ptr(), p._version) for p in params))
        if self._copy is not None and self._copy[0] == key:
            return self._copy[1]
        try:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, also inside a validation loop
                twin = copy.deepcopy(model).float()
        except Exception as err:  # noqa: BLE001 - an uncopyable module: the features run in its own precision
            warnings.warn(f"Could not make a float32 copy of the {self.precision} model for the gradient features "
                          f"({err!r}); they run in the model's own precision", RuntimeWarning, stacklevel=3)
            self.float32_grad_model = False
            return None
        self._copy = (key, twin)
        return twin


def _as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"The model returned a {type(out).__name__}, not a logits tensor: give the module a "
                    "mia_forward(inputs) method that returns the (n, classes) logits")


def default_call(model: nn.Module, inputs: Any, forward: Optional[Callable[..., Any]] = None) -> Tensor:
    """The model's logits on ``inputs``: ``model.mia_forward(inputs)`` when the module has that hook, else
    ``forward(**inputs)`` for a dict and ``forward(inputs)`` otherwise."""
    hook = getattr(model, "mia_forward", None)
    if callable(hook):
        return _as_logits(hook(inputs))
    fwd = model.forward if forward is None else forward
    return _as_logits(fwd(**inputs) if isinstance(inputs, Mapping) else fwd(inputs))


def _select(inputs: Any, idx: Tensor) -> Any:
    """The samples ``idx`` of a nested batch (every tensor indexed along its first dimension)."""
    if isinstance(inputs, Tensor):
        return inputs[idx]
    if isinstance(inputs, Mapping):
        return {k: _select(v, idx) for k, v in inputs.items()}
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(_select(v, idx) for v in inputs))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_select(v, idx) for v in inputs)
    return inputs


def _batch_len(inputs: Any) -> Optional[int]:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.ndim else None
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else ()
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"a {str(inputs.dtype).replace('torch.', '')} tensor"
    if isinstance(inputs, Mapping):
        return f"a dict with keys {sorted(map(str, inputs))}"
    return f"a {type(inputs).__name__}"


def needs_float_input(feature: Feature) -> bool:
    """True for features that differentiate or step in input space (``boundary_distance``; ``gradient_norms``
    with ``wrt`` containing ``input``): they need the model's input to be one floating-point tensor. A feature
    class says so itself with a ``needs_float_input`` attribute."""
    flag = getattr(feature, "needs_float_input", None)
    if isinstance(flag, bool):
        return flag
    if feature.name == "boundary_distance":
        return True
    return feature.name == "gradient_norms" and "input" in (getattr(feature, "wrt", None) or ())


class _Router:
    """While installed, ``model(x)`` runs ``call(model, inputs)`` under ``context()``, where ``inputs`` is ``x``
    itself or, for a batch whose inputs are not one tensor, ``x`` is a 1-D tensor of positions into the current
    batch (features slice, index and count it like a batch; ``vmap`` over it works too) and ``inputs`` the
    selected samples. Calls made from inside (``mia_forward`` calling ``self(...)``) reach the real forward."""

    def __init__(self, model: nn.Module, call: Optional[ForwardFn]) -> None:
        self.model, self.call = model, call
        self.inputs: Any = None
        self.context: Callable[[], ContextManager] = contextlib.nullcontext
        self._inside = False
        self._had = "forward" in model.__dict__
        self._prev = model.__dict__.get("forward")
        self._orig = model.forward

    def _forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._inside or args or kwargs:
            return self._orig(*((x,) if x is not None else ()), *args, **kwargs)
        inputs = x if self.inputs is None else _select(self.inputs, x)
        self._inside = True
        try:
            with self.context():
                if self.call is not None:
                    return _as_logits(self.call(self.model, inputs))
                return default_call(self.model, inputs, self._orig)
        finally:
            self._inside = False

    def __enter__(self) -> "_Router":
        self.model.forward = self._forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._had:
            self.model.__dict__["forward"] = self._prev
        else:
            self.model.__dict__.pop("forward", None)


def run_extraction(
    model: nn.Module,
    batches: Iterable[Batch],
    features: Mapping[str, Feature],
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[int], None]] = None,
    forward: Union[None, AuditForward, ForwardFn] = None,
    stop_check: Optional[Callable[[], None]] = None,
) -> Dict[str, np.ndarray]:
    """Run ``model`` in eval mode over ``batches`` of ``(inputs, y, index)`` (``index`` may be ``None``).

    Returns ``index``, ``label``, ``pred``, ``correct``, ``loss``, ``logits`` ``(n, C)`` and ``feat:{tag}`` ``(n, d)``
    float32 arrays.
    A label ``< 0`` marks an unlabelled sample (e.g. out-of-distribution noise): label-dependent values then use
    the predicted class. The per-sample loss is the module's ``mia_loss(logits, y)`` when it has one, else
    cross-entropy; both get float32 logits.

    ``inputs`` is a tensor, or a tuple / list / dict of tensors (e.g. ``{"input_ids": ..., "attention_mask": ...}``)
    with the batch dimension first. The model computes its logits with ``model.mia_forward(inputs)`` when it has
    that method, else ``forward(**inputs)`` for a dict and ``forward(inputs)`` otherwise; features that call the
    model see the same. Features that work in input space (:func:`needs_float_input`) need one floating-point
    tensor and raise ``ValueError`` otherwise.

    ``forward``: an :class:`AuditForward` (precision context, input conversion, device move), or a function
    ``forward(model, inputs) -> logits`` that replaces ``mia_forward`` / ``forward``. ``progress`` is called with
    the number of samples done after each batch; ``stop_check()`` before each batch (it raises to stop the pass).
    """
    dev = torch.device(device) if device is not None else model_device(model)
    run = forward if isinstance(forward, AuditForward) else AuditForward(call=forward)
    grad_context = run.grad_context if run.grad_context is not None else run.context
    hooked = callable(getattr(model, "mia_forward", None))
    out: Dict[str, List[np.ndarray]] = {k: [] for k in PER_SAMPLE_KEYS}
    feats: Dict[str, List[np.ndarray]] = {tag: [] for tag in features}
    all_logits: List[np.ndarray] = []
    n_done = 0
    with eval_mode(model):
        for x, y, idx in batches:
            if stop_check is not None:
                stop_check()
            raw = (x, y, idx)
            x, y, idx = run.to_device(raw, dev)
            y = torch.as_tensor(y).to(dev).long().reshape(-1)
            n = len(y)
            one_tensor = isinstance(x, Tensor)
            if not one_tensor and _batch_len(x) != n:
                raise ValueError(f"The audit inputs are {_describe(x)} whose tensors do not have the batch size "
                                 f"{n} as their first dimension")
            for tag, feat in features.items():
                if needs_float_input(feat) and not (one_tensor and x.is_floating_point()):
                    raise ValueError(
                        f"Feature {tag!r} ({feat.name}) works in input space (gradients w.r.t. the input, or steps "
                        f"along it) and needs the model's input to be one floating-point tensor; these inputs are "
                        f"{_describe(x)}. Audit such a model with features of its logits, intermediate layers or "
                        f"{{name: gradient_norms, wrt: [weights]}}.")
            grad_feats = [(tag, f) for tag, f in features.items() if f.requires_grad]
            twin = run.float32_model(model) if grad_feats else None  # before routing: a clean copy
            routed = not (run.plain and one_tensor and not hooked)
            x_feat = x if one_tensor else torch.arange(n, device=dev)
            router = _Router(model, run.call) if routed else None
            with router if router is not None else contextlib.nullcontext():
                if router is not None:
                    router.inputs = None if one_tensor else x
                    router.context = run.context
                with torch.no_grad():
                    logits = model(x_feat).float()
                    y = torch.where(y < 0, logits.argmax(dim=1), y)
                    hook = getattr(model, "mia_loss", None)  # optional per-sample loss of the user's module
                    loss = hook(logits, y) if callable(hook) else F.cross_entropy(logits, y, reduction="none")
                    pred = logits.argmax(dim=1)
                for tag, feat in features.items():
                    if feat.requires_grad:
                        continue
                    with torch.no_grad():
                        values = feat.extract(model, x_feat, y, logits)
                    feats[tag].append(torch.as_tensor(values).detach().float().reshape(n, -1).cpu().numpy())
                if router is not None:
                    router.context = grad_context
                if twin is None:
                    for tag, feat in grad_feats:
                        with torch.enable_grad():
                            values = feat.extract(model, x_feat, y, logits)
                        feats[tag].append(torch.as_tensor(values).detach().float().reshape(n, -1).cpu().numpy())
            if twin is not None:  # half-precision weights: the autograd features on their float32 copy
                x32 = run.to_device(raw, dev, convert=False)[0]  # the inputs before the half-precision cast
                with eval_mode(twin), _Router(twin, run.call) as r32:
                    r32.inputs = None if one_tensor else x32
                    r32.context = grad_context
                    for tag, feat in grad_feats:
                        with torch.enable_grad():
                            values = feat.extract(twin, x32 if one_tensor else x_feat, y, logits)
                        feats[tag].append(torch.as_tensor(values).detach().float().reshape(n, -1).cpu().numpy())
            index = torch.arange(n_done, n_done + n) if idx is None else torch.as_tensor(idx)
            out["index"].append(index.cpu().numpy().astype(np.int64).reshape(-1))
            out["label"].append(y.cpu().numpy())
            out["pred"].append(pred.cpu().numpy())
            out["correct"].append((pred == y).cpu().numpy())
            out["loss"].append(torch.as_tensor(loss).float().cpu().numpy().reshape(-1))
            all_logits.append(logits.detach().cpu().numpy().reshape(n, -1))
            n_done += n
            if progress is not None:
                progress(n)
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
