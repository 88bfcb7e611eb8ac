"""Per-sample gradient norms (Rezaei & Liu 2021, Sec. 4 "Gradient norm", Table 7).

For every sample, the gradient of the cross-entropy with its true label with respect to all trainable weights
(flattened together into one vector, ``dL/dw``) and with respect to the input (``dL/dx``) is summarised by
the seven statistics the paper adopts from Oberdiek et al. (2018), in the order and with the definitions of the
authors' ``return_norm_metrics`` (``attacks/gradient_analysis.py`` of shrezaei/MI-Attack):

====== =======================================================================================
l1     ``sum |g|``                  (``np.linalg.norm(g, ord=1)``)
l2     ``sqrt(sum g**2)``           (``np.linalg.norm(g)``)
min    ``min |g|``                  (``np.linalg.norm(g, ord=-inf)``: the smallest *absolute* value)
max    ``max |g|``                  (``np.linalg.norm(g, ord=inf)``)
mean   ``mean(g)``                  (``np.average(g)``: the signed mean, not the mean of ``|g|``)
skew   ``scipy.stats.skew(g)``      (biased: ``m3 / m2**1.5``)
kurt   ``scipy.stats.kurtosis(g)``  (Fisher, biased: ``m4 / m2**2 - 3``)
====== =======================================================================================

where ``m_k`` are the central moments of the entries of ``g``. One deviation: where scipy returns NaN because
the entries are constant (zero variance, e.g. the all-zero gradient of a sample whose float32 softmax
saturated to exactly one-hot), skew and kurtosis are 0 here so that attack models get finite inputs.

How it is computed
------------------
In eval mode (BatchNorm on its running statistics, no dropout) samples do not interact, so per-sample gradients
come from one batched forward and one backward pass per chunk of ``chunk_size`` samples (as in Opacus / BackPACK;
:mod:`~lightning_mia.features.grad_rules`): forward hooks keep each layer's input and output, ``autograd.grad`` of
the summed loss gives the output gradients and ``dL/dx`` (on CPU, stride-1 convolutions back-propagate with a
flipped-kernel forward convolution, 2-4x faster than oneDNN's backward there: ``conv_backward.py``), and the
per-sample weight gradients follow per layer: ``nn.Linear`` (``g^T a``), ``nn.Conv1d/2d/3d`` (one grouped
convolution with a group per sample), eval-mode BatchNorm, ``nn.GroupNorm``, ``nn.InstanceNorm1d/2d/3d``,
``nn.LayerNorm`` / ``nn.RMSNorm`` (sums of ``g * x_hat`` and ``g``), ``nn.Embedding`` (each sample's output
gradients summed per distinct token, the other rows counted as zeros without being formed) and
``nn.MultiheadAttention`` (its projections as linear layers, the gradients at the projected queries, keys and
values from the same backward pass). A layer without a rule -- or a parameter used outside one call of its
layer (weight tying, a layer run twice) -- gets its per-sample gradients from ``torch.func``
(``vmap(grad(...))``) on that one call (or the smallest call enclosing all its uses), differentiating only
those parameters: one unknown layer does not slow down the rest. Which call uses a parameter is recorded on a
one-sample probe forward. Only when samples interact even in eval mode (BatchNorm on batch statistics), or a
batched pass does not match the probe (a kept tensor modified in place later in the forward, a module run a
different number of times), do all per-sample gradients come from ``torch.func`` on the whole model
(``vmap(grad(functional_call(model, ...)))``). Each chunk's per-sample gradients are reduced to statistics one
parameter tensor at a time and freed (small tensors -- biases, norm vectors -- pooled into one reduction): each
tensor (in cache-sized column blocks) contributes its count, mean, central moment sums ``M2, M3, M4``, L1 norm,
sum of squares and min / max ``|g|``, and the pieces are merged with the pairwise update formulas of Pebay (2008)
in float64, which are exact (no raw power sums over mixed tensors, so no cancellation). Weights of ``nn.Linear``
layers applied once to a flat input are not formed at all (``factorize=True``): their per-sample gradient is the
outer product ``delta (x) a`` of the layer's output gradient and its input, whose power sums factorise,
``sum_ij (delta_i a_j)^k = (sum delta^k)(sum a^k)`` -- the statistics come without forming the matrix (on LeNet
97% of the weights). Peak memory is one chunk of the remaining per-sample weight gradients (``chunk_size x
n_params`` floats, which the default ``chunk_size=None`` keeps within ``memory_budget_mb``) plus activations,
plus the statistic temporaries of one block. When only ``wrt=["input"]`` is asked for, one batched backward pass
gives every per-sample input gradient.

Inputs of any dtype work for the weight statistics: the input gets ``requires_grad`` only when input statistics
are asked for. ``dL/dx`` needs a floating-point input: ``wrt`` containing ``"input"`` on integer inputs (token
ids) raises a ``ValueError`` rather than silently dropping those columns.

The model's parameters, their ``requires_grad`` flags and ``.grad`` fields, any optimizer state and every
module's training flag are left as they were.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x, y = torch.randn(5, 3, 2, 2), torch.randint(0, 3, (5,))
    >>> GradientNorms().extract(model, x, y).shape  # 7 weight statistics + 7 input statistics
    torch.Size([5, 14])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mia.features import grad_rules
from lightning_mia.features.base import (
    FEATURES,
    Feature,
    as_long_labels,
    autograd_input,
    autograd_on,
    check_positive,
    eval_mode,
    iter_chunks,
)
from lightning_mia.features.conv_backward import fast_conv_input_grad

__all__ = ["GradientNorms", "STAT_NAMES", "WRT", "Moments", "moments", "merge_moments", "finalize_moments",
           "gradient_statistics"]

#: The paper's seven statistics, in the authors' order (``return_norm_metrics``).
STAT_NAMES = ("l1", "l2", "min", "max", "mean", "skew", "kurt")
WRT = ("weights", "input")

# Per-sample bytes per trainable parameter while a chunk is in flight: the float32 per-sample gradient plus
# vmap's backward temporaries (measured peak ~2.5x on LeNet / ResNet-20; 3 leaves headroom).
_BYTES_PER_PARAM = 4 * 3


@dataclass
class Moments:
    """Per-sample summary of a set of gradient entries, each field a float64 tensor of shape ``(n_samples,)``
    (``count`` is the number of entries, shared by all samples)."""

    count: int
    mean: Tensor
    m2: Tensor  # sum of (g - mean)^2
    m3: Tensor
    m4: Tensor
    l1: Tensor
    sumsq: Tensor
    amin: Tensor  # min |g|
    amax: Tensor  # max |g|


def moments(g: Tensor, block_elements: int = 2 ** 18) -> Moments:
    """Moments of each row of ``g`` (``(n_samples, n_entries)``).

    Computed in the gradient's own precision (float32: ~2.5x faster than float64 on CPU; the centred sums keep
    it accurate to ~1e-6 relative) and returned as float64 for exact merging. Wide inputs are processed in
    column blocks of about ``block_elements`` entries, merged exactly: the temporaries stay cache-sized
    instead of costing fresh, page-faulting allocations the size of the whole chunk (3-5x faster on CPU).
    """
    g = g.detach()
    if not g.is_floating_point():
        g = g.double()
    width = max(1, block_elements // max(1, g.shape[0]))
    total: Optional[Moments] = None
    for start in range(0, g.shape[1], width):
        m = _block_moments(g[:, start:start + width])
        total = m if total is None else merge_moments(total, m)
    if total is None:
        raise ValueError("cannot summarise an empty gradient")
    return total


def _block_moments(g: Tensor) -> Moments:
    mean = g.mean(dim=1)
    d = g - mean[:, None]
    d2 = d * d
    m2 = d2.sum(dim=1)
    # Plain multiply-and-sum: on CPU 2.5x faster than a row-wise einsum/bmm, at the cost of one temporary.
    m3 = (d2 * d).sum(dim=1)
    m4 = (d2 * d2).sum(dim=1)
    del d, d2
    absg = g.abs()
    amin, amax = absg.amin(dim=1), absg.amax(dim=1)  # separately: aminmax is ~25x slower on CPU here
    l1 = absg.sum(dim=1)
    mean, m2 = mean.double(), m2.double()
    return Moments(
        count=g.shape[1],
        mean=mean,
        m2=m2,
        m3=m3.double(),
        m4=m4.double(),
        l1=l1.double(),
        sumsq=m2 + g.shape[1] * mean * mean,  # sum g^2 = M2 + n mean^2: two non-negative terms, no cancellation
        amin=amin.double(),
        amax=amax.double(),
    )


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets of entries (Pebay 2008, eqs. 3.1-3.3; exact)."""
    na, nb = float(a.count), float(b.count)
    n = na + nb
    delta = b.mean - a.mean
    d_n = delta / n
    m2 = a.m2 + b.m2 + delta * d_n * na * nb
    m3 = (a.m3 + b.m3 + delta * d_n * d_n * na * nb * (na - nb)
          + 3.0 * d_n * (na * b.m2 - nb * a.m2))
    m4 = (a.m4 + b.m4 + delta * d_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
          + 6.0 * d_n * d_n * (na * na * b.m2 + nb * nb * a.m2)
          + 4.0 * d_n * (na * b.m3 - nb * a.m3))
    return Moments(
        count=a.count + b.count,
        mean=a.mean + d_n * nb,
        m2=m2,
        m3=m3,
        m4=m4,
        l1=a.l1 + b.l1,
        sumsq=a.sumsq + b.sumsq,
        amin=torch.minimum(a.amin, b.amin),
        amax=torch.maximum(a.amax, b.amax),
    )


class _Pooled:
    """Moments of the union of many per-sample gradient tensors, added one at a time (``(n, k)`` gradients or
    ready :class:`Moments`). Small gradients are concatenated and reduced together once ``small`` entries are
    pending -- one reduction instead of one per tensor (LeNet's conv and bias tensors, ResNet's ~40 BatchNorm
    vectors: ~20 small ops each). With ``per_tensor`` every gradient is reduced on its own and its moments are
    kept in :attr:`tensors` (``per_layer=True``)."""

    def __init__(self, per_tensor: bool = False, small: int = 2 ** 16) -> None:
        self.per_tensor, self.small = per_tensor, small
        self.total: Optional[Moments] = None
        self.tensors: List[Moments] = []
        self._pending: List[Tensor] = []
        self._size = 0

    def add_moments(self, m: Moments) -> None:
        self.total = m if self.total is None else merge_moments(self.total, m)
        if self.per_tensor:
            self.tensors.append(m)

    def add(self, g: Tensor) -> None:
        g = g.reshape(len(g), -1)
        if self.per_tensor or g.numel() >= self.small:
            self.add_moments(moments(g))
            return
        self._pending.append(g)
        self._size += g.numel()
        if self._size >= self.small:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.add_moments(moments(torch.cat(self._pending, dim=1)))
            self._pending, self._size = [], 0

    def result(self) -> Tuple[Tensor, List[Tensor]]:
        """(the seven statistics of everything added, those of each tensor when ``per_tensor``)."""
        self._flush()
        if self.total is None:
            raise ValueError("cannot summarise an empty gradient")
        return finalize_moments(self.total), [finalize_moments(m) for m in self.tensors]


def finalize_moments(m: Moments) -> Tensor:
    """The seven statistics ``(n_samples, 7)`` (float64) in :data:`STAT_NAMES` order."""
    n = float(m.count)
    var = (m.m2 / n).clamp_min(0.0)
    # Zero variance: scipy returns NaN for skew/kurtosis; we return 0 (see the module docstring). The
    # tolerance mirrors scipy's own test ``m2 <= (eps * mean)**2`` at float32 resolution (our input dtype).
    zero = var <= (1e-5 * m.mean) ** 2
    safe = torch.where(zero, torch.ones_like(var), var)
    skew = torch.where(zero, torch.zeros_like(var), (m.m3 / n) / safe.pow(1.5))
    kurt = torch.where(zero, torch.zeros_like(var), (m.m4 / n) / (safe * safe) - 3.0)
    return torch.stack([m.l1, m.sumsq.sqrt(), m.amin, m.amax, m.mean, skew, kurt], dim=1)


def gradient_statistics(g: Tensor) -> Tensor:
    """The seven statistics of each row of ``g`` (``(n_samples, ...)``), float64 ``(n_samples, 7)``."""
    return finalize_moments(moments(g.reshape(len(g), -1)))


def _outer_moments(delta: Tensor, act: Tensor) -> Moments:
    """Moments of the entries of each per-sample outer product ``delta[b] (x) act[b]`` without forming it.

    Power sums factorise: ``sum_ij (d_i a_j)^k = (sum_i d_i^k)(sum_j a_j^k)``, and so do the L1 norm and the
    extreme absolute values; central moments follow from the power sums (float64; the cancellation only
    matters when the mean exceeds the standard deviation by ~1e5, far from what gradients do).
    """
    d, a = delta.detach().double(), act.detach().double()
    n = d.shape[1] * a.shape[1]
    s1, s2, s3, s4 = ((d ** k).sum(dim=1) * (a ** k).sum(dim=1) for k in (1, 2, 3, 4))
    mean = s1 / n
    m2 = (s2 - n * mean * mean).clamp_min(0.0)
    m3 = s3 - 3.0 * mean * s2 + 2.0 * n * mean ** 3
    m4 = s4 - 4.0 * mean * s3 + 6.0 * mean * mean * s2 - 3.0 * n * mean ** 4
    ad, aa = d.abs(), a.abs()
    return Moments(count=n, mean=mean, m2=m2, m3=m3, m4=m4.clamp_min(0.0),
                   l1=ad.sum(dim=1) * aa.sum(dim=1), sumsq=s2,
                   amin=ad.amin(dim=1) * aa.amin(dim=1), amax=ad.amax(dim=1) * aa.amax(dim=1))


def _factorable_linears(model: nn.Module, params: Dict[str, Tensor], probe: Tensor) -> Dict[str, Tuple[str, nn.Linear]]:
    """``{module_path: (weight_name, module)}`` of the trainable ``nn.Linear`` layers called exactly once per
    forward on a flat ``(batch, in_features)`` input, whose per-sample weight gradient is an outer product."""
    def weight_name(path: str) -> str:
        return f"{path}.weight" if path else "weight"  # "" is the model itself

    linears = {path: mod for path, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and weight_name(path) in params}
    calls: Dict[str, List[int]] = {path: [] for path in linears}
    handles = []
    for path, mod in linears.items():
        def hook(m: nn.Module, args: Tuple[Tensor, ...], path: str = path) -> None:
            calls[path].append(args[0].dim() if isinstance(args[0], Tensor) else -1)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return {path: (weight_name(path), mod) for path, mod in linears.items() if calls[path] == [2]}


def _trainable(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = p.detach()
    return trainable, frozen


def _hook_plan(model: nn.Module, params: Dict[str, Tensor]) -> Optional[Dict[str, str]]:
    """``{module_path: rule kind}`` of the modules whose trainable parameters have a one-backward rule
    (:func:`grad_rules.rule_kind`; the others are differentiated per call with ``torch.func``), or ``None`` when
    the one-backward path cannot apply: a module makes samples interact in eval mode (BatchNorm on batch
    statistics), so that the batched pass's output gradients are not per sample."""
    plan: Dict[str, str] = {}
    for path, mod in model.named_modules():
        if grad_rules.mixes_samples(mod):
            return None
        prefix = f"{path}." if path else ""
        for n, _ in mod.named_parameters(recurse=False):
            kind = grad_rules.rule_kind(mod, n) if prefix + n in params else None
            if kind is not None:
                plan[path] = kind
    return plan


_GROUPED_CHANNELS = grad_rules.GROUPED_CHANNELS


def _zero_moments(n: int, count: int, like: Tensor) -> Moments:
    z = torch.zeros(n, dtype=torch.float64, device=like.device)
    return Moments(count=count, mean=z, m2=z, m3=z, m4=z, l1=z, sumsq=z, amin=z, amax=z)


def _add_grad(pooled: "_Pooled", g: grad_rules.Grad) -> None:
    """Add one parameter's per-sample gradient, in whichever form its rule gave it, to ``pooled``."""
    if isinstance(g, grad_rules.Outer):
        pooled.add_moments(_outer_moments(g.delta, g.act))
    elif isinstance(g, grad_rules.Compact):
        m = moments(g.values)
        pooled.add_moments(merge_moments(m, _zero_moments(len(g.values), g.zeros, g.values)) if g.zeros else m)
    else:
        pooled.add(g)


@FEATURES.register("gradient_norms")
class GradientNorms(Feature):
    """Seven statistics of per-sample ``dL/dw`` and/or ``dL/dx`` (cross-entropy with the true label).

    Columns: for each entry of ``wrt`` in order, the seven :data:`STAT_NAMES` (``w_l1 ... w_kurt``,
    ``x_l1 ... x_kurt``); with ``per_layer=True`` the seven statistics of every trainable parameter tensor
    follow the global weight statistics (``w[conv1.weight]_l1`` ...).

    Args:
        wrt: ``"weights"``, ``"input"`` or both (default both). ``"input"`` needs a floating-point input
            (``ValueError`` otherwise); ``wrt="weights"`` works on any input, e.g. token ids.
        per_layer: add the statistics of each trainable parameter tensor separately.
        chunk_size: samples per ``vmap`` call; ``None`` sizes it from the parameter count so that a chunk's
            per-sample weight gradients fit in ``memory_budget_mb``.
        memory_budget_mb: memory allowed for one chunk of per-sample weight gradients (default 256 MiB).
        factorize: summarise the weight gradients of ``nn.Linear`` layers from their per-sample factors
            (output gradient and input) instead of materialising them; same values, much cheaper for
            FC-heavy models (LeNet: ~97% of its weights). ``False`` materialises every gradient.

    Example:
        >>> import torch
        >>> feat = GradientNorms(wrt="input")
        >>> feat.extract(torch.nn.Linear(4, 2), torch.randn(3, 4), torch.tensor([0, 1, 0])).shape
        torch.Size([3, 7])
        >>> text = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> GradientNorms(wrt="weights").extract(text, torch.tensor([[1, 2], [3, 3]]), torch.tensor([0, 1])).shape
        torch.Size([2, 7])
    """

    name = "gradient_norms"
    requires_grad = True

    def __init__(
        self,
        wrt: Union[str, Sequence[str]] = ("weights", "input"),
        per_layer: bool = False,
        chunk_size: Optional[int] = None,
        memory_budget_mb: float = 256.0,
        factorize: bool = True,
    ) -> None:
        wrt_list = [wrt] if isinstance(wrt, str) else list(wrt)
        if not wrt_list or any(w not in WRT for w in wrt_list) or len(set(wrt_list)) != len(wrt_list):
            raise ValueError(f"wrt must be a non-empty list of distinct values from {list(WRT)}, got {wrt!r}")
        if not isinstance(per_layer, bool):
            raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
        if chunk_size is not None:
            check_positive("chunk_size", chunk_size, integer=True)
        check_positive("memory_budget_mb", memory_budget_mb)
        self.wrt = wrt_list
        self.per_layer = per_layer
        self.chunk_size = chunk_size
        self.memory_budget_mb = float(memory_budget_mb)
        if not isinstance(factorize, bool):
            raise ValueError(f"factorize must be a bool, got {factorize!r}")
        self.factorize = factorize
        self._param_names: List[str] = []

    def auto_chunk_size(self, n_params: int) -> int:
        """Samples per chunk: ``chunk_size`` when set, else what fits ``memory_budget_mb``."""
        if self.chunk_size is not None:
            return self.chunk_size
        budget = self.memory_budget_mb * 2 ** 20
        return max(1, int(budget // max(1, n_params * _BYTES_PER_PARAM)))

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        if "input" in self.wrt and not x.is_floating_point():
            raise ValueError(
                f"gradient_norms with wrt containing 'input' needs a floating-point tensor input (dL/dx of "
                f"a {x.dtype} input, e.g. token ids, is not defined); use wrt='weights' for such models")
        with eval_mode(model), autograd_on():
            x = autograd_input(x)
            y = autograd_input(as_long_labels(y, len(x), x.device))
            if "weights" in self.wrt:
                out = self._with_weights(model, x, y)
            else:
                out = {"input": gradient_statistics(self._input_grads(model, x, y))}
        cols = []
        for w in self.wrt:
            cols.append(out[w])
            if w == "weights" and self.per_layer:
                cols.extend(out["layers"])
        return torch.cat(cols, dim=1).float()

    @staticmethod
    def _input_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        # In eval mode samples do not interact, so d(sum of losses)/dx_i = dL_i/dx_i.
        x = x.clone().requires_grad_(True)
        with fast_conv_input_grad(model):
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (gx,) = torch.autograd.grad(loss, x)
        return gx

    def _with_weights(self, model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, object]:
        from torch.func import functional_call, grad, vmap

        params, frozen = _trainable(model)
        if not params:
            raise ValueError("gradient_norms with wrt='weights' needs a model with trainable parameters")
        self._param_names = list(params)
        if _hook_plan(model, params) is not None:
            out = self._with_hooks(model, x, y)
            if out is not None:
                return out
        buffers = dict(model.named_buffers())
        want_x = "input" in self.wrt
        factored = _factorable_linears(model, params, x[:1]) if self.factorize else {}
        # Weights of factored linear layers are not differentiated: their per-sample gradient is the outer
        # product of the layer's output gradient (from a zero "probe" added to its output) and its input.
        diff_params = {n: p for n, p in params.items() if n not in {w for w, _ in factored.values()}}
        consts = {**frozen, **{w: params[w] for w, _ in factored.values()}}
        probes = {path: torch.zeros(1, mod.out_features, device=x.device, dtype=mod.weight.dtype)
                  for path, (_, mod) in factored.items()}
        current: Dict[str, Dict[str, Tensor]] = {}

        def make_hook(path: str):
            def hook(mod: nn.Module, args: Tuple[Tensor, ...], out: Tensor) -> Tensor:
                current["inputs"][path] = args[0]
                return out + current["probes"][path]
            return hook

        def loss_fn(p: Dict[str, Tensor], xi: Tensor, pr: Dict[str, Tensor], yi: Tensor):
            current["probes"], current["inputs"] = pr, {}
            out = functional_call(model, (p, consts, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0)), current["inputs"]

        # The input is differentiated only when its statistics are asked for (token ids cannot be).
        argnums = (0, 1, 2) if want_x else (0, 2)
        per_sample = vmap(grad(loss_fn, argnums=argnums, has_aux=True), in_dims=(None, 0, None, 0))
        n_params = sum(p.numel() for p in diff_params.values())
        w_stats, x_stats, layer_stats = [], [], []
        handles = [mod.register_forward_hook(make_hook(path)) for path, (_, mod) in factored.items()]
        try:
            for sl in iter_chunks(len(x), self.auto_chunk_size(n_params)):
                with warnings.catch_warnings():
                    # vmap without a batching rule (e.g. CPU flash attention) loops over samples: exact, slower.
                    warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
                    grads, acts = per_sample(diff_params, x[sl], probes, y[sl])
                (gw, gx, gprobe) = grads if want_x else (grads[0], None, grads[1])
                m = sl.stop - sl.start
                factored_moments = {
                    w: _outer_moments(gprobe[path].reshape(m, -1), acts[path].reshape(m, -1))
                    for path, (w, _) in factored.items()
                }
                del gprobe, acts
                pooled = _Pooled(self.per_layer)
                for name in self._param_names:
                    if name in factored_moments:
                        pooled.add_moments(factored_moments.pop(name))
                    else:
                        pooled.add(gw.pop(name))  # dropped from the chunk's gradients once reduced
                w, per_layer = pooled.result()
                w_stats.append(w)
                layer_stats.append(per_layer)
                if want_x:
                    x_stats.append(gradient_statistics(gx))
                del gw, gx
        finally:
            for h in handles:
                h.remove()
        return self._assemble(w_stats, x_stats, layer_stats, want_x)

    def _with_hooks(self, model: nn.Module, x: Tensor, y: Tensor) -> Optional[Dict[str, object]]:
        """All per-sample gradients from one batched forward and backward pass per chunk
        (:mod:`~lightning_mia.features.grad_rules`): a one-sample probe assigns each parameter to a rule or
        to a ``torch.func`` replay of the one layer call using it, one ``autograd.grad`` of the summed loss
        gives the layers' output gradients (and ``dL/dx``), and the per-sample gradients follow layer by layer,
        each reduced to statistics and freed before the next. ``None`` (the caller falls back to ``vmap`` over
        the whole model) when a chunk's pass does not match the probe."""
        want_x = "input" in self.wrt
        plan = grad_rules.make_plan(model, x[:1], factorize=self.factorize)
        if plan is None:
            return None
        named = dict(model.named_parameters())
        big = sum(plan.sizes.values())
        w_stats, x_stats, layer_stats = [], [], []
        for sl in iter_chunks(len(x), self.auto_chunk_size(big)):
            yc = y[sl]
            # Autograd gives only input and layer-output gradients here: convolutions may back-propagate with
            # the faster flipped-kernel convolution (conv_backward.py). Per-sample gradients are computed after
            # the block (lazily, by ChunkGrads), on the layers as they are.
            with fast_conv_input_grad(model):
                res = grad_rules.batched_pass(
                    model, plan, x[sl], lambda out: F.cross_entropy(out, yc, reduction="sum"), want_x=want_x,
                    factorize=self.factorize, grouped_channels=_GROUPED_CHANNELS)
            if res is None:
                return None
            gx, grads = res
            pooled = _Pooled(self.per_layer)
            for name in self._param_names:
                _add_grad(pooled, grads.pop(name, like=named[name]))
            w, per_layer = pooled.result()
            w_stats.append(w)
            layer_stats.append(per_layer)
            if want_x:
                x_stats.append(gradient_statistics(gx))
            del gx, grads
        return self._assemble(w_stats, x_stats, layer_stats, want_x)

    def _assemble(self, w_stats: List[Tensor], x_stats: List[Tensor], layer_stats: List[List[Tensor]],
                  want_x: bool) -> Dict[str, object]:
        """Per-chunk statistics of either gradient path, concatenated over chunks."""
        out: Dict[str, object] = {"weights": torch.cat(w_stats)}
        if want_x:
            out["input"] = torch.cat(x_stats)
        if self.per_layer:
            out["layers"] = [torch.cat([chunk[i] for chunk in layer_stats]) for i in range(len(self._param_names))]
        return out

    def dim_names(self, d: int) -> List[str]:
        names: List[str] = []
        for w in self.wrt:
            prefix = "w" if w == "weights" else "x"
            names.extend(f"{prefix}_{s}" for s in STAT_NAMES)
            if w == "weights" and self.per_layer:
                names.extend(f"w[{p}]_{s}" for p in self._param_names for s in STAT_NAMES)
        return names if len(names) == d else super().dim_names(d)
