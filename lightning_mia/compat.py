"""Both Lightning packages, and the Lightning-specific pieces of the audit pass, in one place.

Lightning ships under two names whose classes are distinct: ``pytorch_lightning`` and ``lightning.pytorch``
(``import lightning as L``). A Trainer accepts only its own package's LightningModule, LightningDataModule,
Callback and Logger classes. This package supports whichever is installed (both may be):

- **Callbacks and datamodules are one class for both packages.** :data:`Callback` and :data:`LightningDataModule`
  here subclass every installed package's base class (``pytorch_lightning.Callback`` *and*
  ``lightning.pytorch.Callback``), so ``MembershipInferenceMonitor``, ``EarlyStoppingComparison``,
  ``PrivacyConstraint`` and every ``MIADataModule`` pass both Trainers' ``isinstance`` checks and both
  LightningCLIs' ``issubclass`` checks. That is sound because these bases hold no engine: a Callback's hooks are
  no-ops and a LightningDataModule's are dataloader stubs plus ``save_hyperparameters``, and the two packages'
  copies are the same source (their functions compare equal, ``__code__ ==``, except those whose docstrings name
  the package; Lightning's ``is_overridden`` compares exactly that, so every hook that a Trainer checks and this
  package does not implement compares equal, and the datamodule implements the four dataloaders itself).
- **A LightningModule must belong to one package**: its base class is the engine (``log``, ``optimizers``, device
  and precision moves, the fabric/trainer shims) and calls into its own package's internals. So the
  implementation is a mixin without a Lightning base (:class:`lightning_mia.module.ImageClassifierMixin`) and there
  is one concrete class per package: ``lightning_mia.module.ImageClassifier`` (``pytorch_lightning``, or
  ``lightning.pytorch`` when only that is installed) and ``lightning_mia.lightning.ImageClassifier``
  (``lightning.pytorch``; that module imports ``lightning`` when it is imported itself, never before).

Nothing here imports Lightning at import time: the base classes are built on first access.

Example:
    >>> from lightning_mia.compat import hash_inputs
    >>> import torch
    >>> a = {"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1])}
    >>> b = {"input_ids": torch.tensor([1, 3]), "attention_mask": torch.tensor([1, 1])}
    >>> hash_inputs(a) == hash_inputs(dict(a)), hash_inputs(a) == hash_inputs(b)
    (True, False)
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
from typing import Any, Callable, List, Mapping, Optional, Tuple

import numpy as np

__all__ = [
    "NAMESPACES",
    "Callback",
    "LightningDataModule",
    "audit_forward",
    "available_namespaces",
    "default_namespace",
    "hash_inputs",
    "input_bytes",
    "lightning_step",
    "namespace",
    "namespace_of",
    "rank_zero_info",
    "rank_zero_warn",
    "sigterm_check",
    "sigterm_received",
]

#: The two import names of Lightning's PyTorch package, the classic one first.
NAMESPACES: Tuple[str, ...] = ("pytorch_lightning", "lightning.pytorch")
#: Top-level module prefixes of each namespace's classes (the fabric each one ships with included).
_PREFIXES = {"pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
             "lightning.pytorch": ("lightning.pytorch", "lightning.fabric")}


@functools.lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def available_namespaces() -> Tuple[str, ...]:
    """The installed Lightning namespaces, in :data:`NAMESPACES` order."""
    return tuple(n for n in NAMESPACES if _importable(n))


def default_namespace() -> str:
    """``pytorch_lightning`` when it is installed, else ``lightning.pytorch``; the package's default classes
    (``lightning_mia.module.ImageClassifier``, the CLI without ``lightning.pytorch`` class paths) use it."""
    found = available_namespaces()
    if not found:
        raise ImportError("lightning-mia needs PyTorch Lightning: pip install pytorch-lightning (or lightning)")
    return found[0]


def namespace(name: Optional[str] = None) -> Any:
    """The Lightning package module of ``name`` (``pytorch_lightning`` or ``lightning.pytorch``; default
    :func:`default_namespace`)."""
    name = default_namespace() if name is None else _check_namespace(name)
    return importlib.import_module(name)


def _check_namespace(name: str) -> str:
    aliases = {"pl": "pytorch_lightning", "pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch",
               "lightning.pytorch": "lightning.pytorch", "L": "lightning.pytorch"}
    if name not in aliases:
        raise ValueError(f"Unknown Lightning namespace {name!r}: use 'pytorch_lightning' or 'lightning.pytorch'")
    name = aliases[name]
    if not _importable(name):
        pip = "pytorch-lightning" if name == "pytorch_lightning" else "lightning"
        raise ImportError(f"{name} is not installed (pip install {pip})")
    return name


def namespace_of(obj: Any) -> Optional[str]:
    """The Lightning namespace an object or class belongs to: the one whose classes are in its MRO (``None`` for
    neither, or for the dual classes of this module, which belong to both)."""
    cls = obj if isinstance(obj, type) else type(obj)
    found = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        module = getattr(klass, "__module__", "") or ""
        for ns, prefixes in _PREFIXES.items():
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                found.add(ns)
    return found.pop() if len(found) == 1 else None


def _dual_base(attr: str, name: str, doc: str) -> type:
    bases = tuple(getattr(importlib.import_module(ns), attr) for ns in available_namespaces())
    if not bases:
        default_namespace()  # raises the install hint
    return type(name, bases, {"__doc__": doc, "__module__": __name__, "__qualname__": name})


@functools.lru_cache(maxsize=None)
def _callback() -> type:
    return _dual_base("Callback", "Callback", "A Lightning Callback of every installed Lightning package.")


@functools.lru_cache(maxsize=None)
def _datamodule() -> type:
    return _dual_base("LightningDataModule", "LightningDataModule",
                      "A LightningDataModule of every installed Lightning package.")


def __getattr__(name: str) -> Any:  # PEP 562: build the dual bases (and import Lightning) on first use
    if name == "Callback":
        return _callback()
    if name == "LightningDataModule":
        return _datamodule()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------- messages
def _trainer_namespace(trainer: Any) -> str:
    return namespace_of(trainer) or default_namespace()


def rank_zero_info(message: str, trainer: Any = None) -> None:
    """Lightning's ``rank_zero_info`` of the trainer's package (its rank is the one that trainer set)."""
    importlib.import_module(_trainer_namespace(trainer) + ".utilities.rank_zero").rank_zero_info(message)


def rank_zero_warn(message: str, trainer: Any = None, **kwargs: Any) -> None:
    """Lightning's ``rank_zero_warn`` of the trainer's package."""
    importlib.import_module(_trainer_namespace(trainer) + ".utilities.rank_zero").rank_zero_warn(message, **kwargs)


# ----------------------------------------------------------------------------------------------- the trainer
def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (a plain ``nn.Module``, or not attached)."""
    return getattr(module, "_trainer", None) if namespace_of(module) is not None else None


def lightning_step(trainer: Any) -> int:
    """The step Lightning logs at right now (``self.log`` in an epoch-end hook lands there): the loop's count of
    batches that stepped an optimizer, which is ``trainer.global_step`` with one optimizer."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step if isinstance(step, int) else trainer.global_step)


def sigterm_received(trainer: Any) -> bool:
    """Whether Lightning's SIGTERM handler has seen a SIGTERM (``trainer.received_sigterm``, Lightning 2.x)."""
    flag = getattr(trainer, "received_sigterm", None)
    if flag is None:
        flag = getattr(getattr(trainer, "_signal_connector", None), "received_sigterm", False)
    return bool(flag)


def _sigterm_exception(trainer: Any) -> type:
    try:
        return importlib.import_module(_trainer_namespace(trainer) + ".utilities.exceptions").SIGTERMException
    except (ImportError, AttributeError):  # older Lightning: a plain SystemExit does the same
        return SystemExit


def sigterm_check(trainer: Any) -> Callable[[], None]:
    """A check for the audit pass to call between batches: raises the trainer's own ``SIGTERMException`` (what
    Lightning's loops raise) once a SIGTERM arrived, so the audit stops within one batch and Lightning shuts down
    as it does on a SIGTERM during training (callbacks' ``on_exception``, loggers finalised). Audits already
    written stay as they are: an audit writes its files only after its extraction and attacks."""
    def check() -> None:
        if sigterm_received(trainer):
            raise _sigterm_exception(trainer)(
                "SIGTERM received during the membership-inference audit: stopped before this audit was written")
    return check


def audit_forward(trainer: Any, module: Any) -> Any:
    """How the audit pass runs ``module`` so that it computes what the trainer computes
    (:class:`lightning_mia.features.extract.AuditForward`):

    - the inputs go through the precision plugin's ``convert_input`` (``bf16-true``: floating tensors to
      bfloat16, ``64-true``: to float64) and the module's ``transfer_batch_to_device`` (Lightning's
      ``move_data_to_device`` unless the module overrides it) -- not ``on_before/after_batch_transfer``, which
      often hold training augmentation;
    - the forward pass runs in ``precision_plugin.forward_context()`` (autocast for ``*-mixed``, the default
      dtype for ``*-true``), so the logits, losses, confidences and intermediate activations are the model's as
      trained; logits are cast to float32 before any log-softmax;
    - features that need autograd (gradient norms, the boundary walk) run in float32: outside autocast under
      ``*-mixed``, and on a float32 copy of the model (the same weights, exactly representable) under ``16-true`` /
      ``bf16-true``, where half-precision gradients and steps below bf16's resolution would vanish; under
      ``64-true`` they run in float64 on the model itself.
    """
    from lightning_mia.features.extract import AuditForward

    plugin = getattr(trainer, "precision_plugin", None)
    flag = str(getattr(plugin, "precision", "32-true"))
    context = getattr(plugin, "forward_context", None) or contextlib.nullcontext
    convert = getattr(plugin, "convert_input", None)

    def transfer(batch: Any, device: Any) -> Any:
        hook = getattr(module, "transfer_batch_to_device", None)
        if callable(hook):
            return hook(batch, device, 0)
        from lightning_mia.features.extract import move_to_device

        return move_to_device(batch, device)

    if flag.endswith("-mixed") or flag in ("16", "bf16"):
        grad_context, grad_float32 = contextlib.nullcontext, False
    elif flag in ("16-true", "bf16-true"):
        grad_context, grad_float32 = contextlib.nullcontext, True
    else:
        grad_context, grad_float32 = context, False
    return AuditForward(context=context, grad_context=grad_context, convert_input=convert, transfer=transfer,
                        float32_grad_model=grad_float32, precision=flag)


# ----------------------------------------------------------------------------------------------- hashing
def _write(x: Any, out: List[bytes], top: bool) -> None:
    import torch

    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu()
        if arr.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits
            arr = arr.view(torch.int16)
        a = np.ascontiguousarray(arr.numpy())
        if not top:
            out.append(f"T{a.dtype.str}{a.shape}:".encode())
        out.append(a.tobytes())
    elif isinstance(x, np.ndarray) and x.dtype != object:
        a = np.ascontiguousarray(x)
        if not top:
            out.append(f"A{a.dtype.str}{a.shape}:".encode())
        out.append(a.tobytes())
    elif isinstance(x, Mapping):
        out.append(f"D{len(x)}{{".encode())
        for k in sorted(x, key=repr):
            out.append(f"{k!r}=".encode())
            _write(x[k], out, False)
        out.append(b"}")
    elif isinstance(x, (tuple, list)):
        out.append(f"{'L' if isinstance(x, list) else 'U'}{len(x)}(".encode())
        for v in x:
            _write(v, out, False)
        out.append(b")")
    elif isinstance(x, (str, bytes)):
        b = x.encode() if isinstance(x, str) else x
        out.append(f"{'S' if isinstance(x, str) else 'B'}{len(b)}:".encode() + b)
    elif x is None or isinstance(x, (bool, int, float, complex, np.generic)):
        if isinstance(x, float) and math.isnan(x):
            x = "nan"
        out.append(f"N{type(x).__name__}:{x!r};".encode())
    elif isinstance(x, np.ndarray):  # object arrays: element by element
        _write(x.tolist(), out, False)
    else:
        raise TypeError(f"Cannot hash an input of type {type(x).__name__}: audit inputs must be tensors, arrays, "
                        "numbers, strings, or tuples / lists / dicts of them")


def input_bytes(x: Any) -> bytes:
    """A deterministic byte encoding of one sample's input, by content (never by object identity): a tensor or
    array is its raw bytes (as the overlap check always hashed them), a dict, tuple or list its keys, types,
    shapes, dtypes and leaves, recursively. Raises ``TypeError`` for objects it cannot encode by content."""
    out: List[bytes] = []
    _write(x, out, True)
    return b"".join(out)


def hash_inputs(x: Any) -> bytes:
    """A 16-byte BLAKE2b digest of :func:`input_bytes` of one sample's input (nested tensors included)."""
    return hashlib.blake2b(input_bytes(x), digest_size=16).digest()
