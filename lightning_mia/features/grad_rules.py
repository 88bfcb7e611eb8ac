"""Exact per-sample parameter gradients from one batched forward and one backward pass, layer by layer.

In eval mode (BatchNorm on its running statistics, no dropout) samples do not interact, so the gradient of the
*summed* loss with respect to a layer's output holds, in row ``b``, sample ``b``'s own output gradient. Forward
hooks keep each layer's input and output, one ``autograd.grad`` gives all output gradients, and each layer's
per-sample weight gradient follows from the two (the approach of Goodfellow 2015, "Efficient per-example
gradient computations", and of Opacus' ``grad_sample`` rules / BackPACK). Rules (:func:`rule_kind`):

=================================  ========================================================================
``nn.Linear``                      ``g^T a`` per sample (a ``bmm`` over tokens); on a flat input the outer
                                   product ``g (x) a`` is summarised from its factors (:class:`Outer`)
``nn.Conv1d/2d/3d``                one grouped convolution backward with a group per sample and group (any
                                   stride, dilation, groups, numeric/"same"/"valid" padding, padding mode)
BatchNorm (eval, running stats)    ``sum(g * x_hat)``, ``sum(g)`` with ``x_hat`` from the running statistics
``nn.GroupNorm``                   ``sum(g * x_hat)``, ``sum(g)``, ``x_hat = group_norm(a)`` (Opacus' rule)
``nn.InstanceNorm1d/2d/3d``        as GroupNorm with per-channel statistics (running ones when tracked)
``nn.LayerNorm``, ``nn.RMSNorm``   sums of ``g * x_hat`` and ``g`` over all but the normalised dims
``nn.Embedding``                   the output gradients of each sample's tokens, summed per distinct token
                                   (scaled by 1/frequency with ``scale_grad_by_freq``; zero at
                                   ``padding_idx``) -- at most ``tokens`` non-zero rows per sample, kept
                                   compact (:class:`Compact`) instead of Opacus' dense ``(n, vocab, dim)``
``nn.MultiheadAttention``          batch first, no ``bias_k/v``: run in the pass as in-projections, core
                                   and ``out_proj`` (:func:`_mha_forward`), so the same backward also gives
                                   the gradients at the projected q, k, v; then all four are linear layers
=================================  ========================================================================

Every other layer with trainable parameters -- and a rule layer whose call does not fit (e.g. a user hook on
it) -- gets its per-sample gradients from ``torch.func`` on that call alone (:func:`replay_grads`:
``vmap(grad(...))`` of ``functional_call(layer, ...)`` over the kept inputs, dotted with the kept output
gradient, as Opacus' functorch fallback), differentiating only the parameters it owns: one unknown layer does
not slow down the others.

Which call a parameter belongs to is observed, not guessed: a one-sample probe forward (:func:`make_plan`)
records, with a ``TorchFunctionMode``, the innermost module call running whenever a parameter enters a torch
operation. A parameter used by one call of a rule layer (run once, batch first) gets that rule; one used
elsewhere too (weight tying, a module reading another's weight, a layer run twice) is differentiated at the
innermost module call enclosing all its uses that runs once, has batch-first outputs and owns it -- at worst
the model itself, which is the whole-model ``vmap``. Assumptions: samples do not interact in eval mode
(modules that mix them, BatchNorm on batch statistics, are refused by the caller), each sample takes the same
path through the model (no data-dependent control flow; ``vmap`` needs that too), and a parameter's effect
leaves the module call that uses it only through that call's outputs. The batched pass checks that every
module runs as often as in the probe, that kept tensors were not modified in place and that kept tensors are
batch-first; :func:`batched_pass` returns ``None`` otherwise and the caller falls back to the whole model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(12, 2))
    >>> x, y = torch.randn(4, 2, 6), torch.tensor([0, 1, 1, 0])
    >>> plan = make_plan(model, x[:1])
    >>> sorted({u.kind for u in plan.units})
    ['conv', 'groupnorm', 'linear']
    >>> _, grads = batched_pass(model, plan, x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    >>> grads.pop("0.weight").shape  # per-sample gradients of the convolution's weight
    torch.Size([4, 3, 2, 3])
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["Outer", "Compact", "Grad", "Unit", "Plan", "rule_kind", "make_plan", "batched_pass", "replay_grads",
           "ChunkGrads"]


class Outer(NamedTuple):
    """A per-sample gradient ``delta[b] (x) act[b]`` (an ``nn.Linear`` weight on a flat input), not formed."""

    delta: Tensor  # (n, out_features)
    act: Tensor  # (n, in_features)


class Compact(NamedTuple):
    """A per-sample gradient whose entries are those of ``values`` (``(n, k)``) plus ``zeros`` exact zeros."""

    values: Tensor
    zeros: int


Grad = Union[Tensor, Outer, Compact]

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCENORMS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_MHA_NAMES = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
              "out_proj.weight", "out_proj.bias")
# Per-sample chunks of at most this many output channels in all for grouped convolutions (see _conv).
GROUPED_CHANNELS = 512


def rule_kind(mod: nn.Module, name: str) -> Optional[str]:
    """The rule computing the per-sample gradient of ``mod``'s parameter ``name`` (a name within ``mod``)
    from its input and output gradient, or ``None`` when it has none. Exact classes only: a subclass may
    override ``forward``."""
    t = type(mod)
    if name in ("weight", "bias"):
        if t is nn.Linear:
            return "linear"
        if t in _CONVS:
            return "conv"
        if t in _BATCHNORMS:
            # Eval mode on running statistics only: otherwise samples interact through the batch statistics.
            ok = not mod.training and mod.track_running_stats and mod.running_mean is not None
            return "batchnorm" if ok and mod.running_var is not None else None
        if t is nn.GroupNorm:
            return "groupnorm"
        if t in _INSTANCENORMS:
            return "instancenorm"
        if t is nn.LayerNorm or (_RMSNORM is not None and t is _RMSNORM):
            return "layernorm"
    if t is nn.Embedding and name == "weight" and mod.max_norm is None:  # max_norm rewrites the table in place
        return "embedding"
    if (t is nn.MultiheadAttention and name in _MHA_NAMES and mod.batch_first and mod.bias_k is None
            and mod.bias_v is None and "forward" not in vars(mod)):  # its forward is swapped in the pass
        return "mha"
    return None


def mixes_samples(mod: nn.Module) -> bool:
    """Whether ``mod`` makes samples interact in eval mode (BatchNorm on batch statistics)."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.training or not (mod.track_running_stats and mod.running_mean is not None)
    return False


# ---------------------------------------------------------------------------------------------- rules
@dataclass
class Call:
    """One captured module call: its positional and keyword arguments and its output."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    out: Any = None
    extra: Dict[str, Tensor] = field(default_factory=dict)  # kept by a decomposed forward (_FORWARDS)
    extra_grads: Dict[str, Optional[Tensor]] = field(default_factory=dict)


def _linear(mod: nn.Linear, call: Call, g: Tensor, names: Sequence[str], factorize: bool, **_) -> Dict[str, Grad]:
    a = call.args[0]
    n = len(g)
    g3 = g.reshape(n, -1, g.shape[-1])
    out: Dict[str, Grad] = {}
    for name in names:
        if name == "bias":
            out[name] = g3.sum(dim=1)
        elif factorize and a.dim() == 2:
            out[name] = Outer(g, a)
        else:
            out[name] = torch.bmm(g3.transpose(1, 2), a.reshape(n, -1, a.shape[-1]).to(g.dtype))
    return out


def _conv_geometry(mod: nn.Module, a: Tensor) -> Tuple[Tensor, List[int]]:
    """The input as the convolution sees it and the (symmetric) zero padding left to apply."""
    d = _CONVS[type(mod)]
    if mod.padding_mode != "zeros":  # nn.ConvNd pads explicitly, then convolves without padding
        return F.pad(a, mod._reversed_padding_repeated_twice, mode=mod.padding_mode), [0] * d
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return a, [0] * d
        # "same" (stride 1): as aten's _convolution_same, total d*(k-1), left half rounded down, extra on the right.
        total = [dil * (k - 1) for dil, k in zip(mod.dilation, mod.kernel_size)]
        pad: List[int] = []
        for t in reversed(total):
            pad += [t // 2, t - t // 2]
        return F.pad(a, pad), [0] * d
    return a, list(mod.padding)


def _grouped_weight_grad(mod: nn.Module, a: Tensor, g: Tensor, padding: List[int]) -> Tensor:
    """Per-sample weight gradients of a convolution: the batch folded into the channels of one grouped
    convolution (one group per sample and group), whose weight gradient is the stack of per-sample ones (the
    batching rule torch.func uses for convolutions)."""
    n, w = len(g), mod.weight
    go = g.reshape(1, n * g.shape[1], *g.shape[2:])
    inp = a.reshape(1, n * a.shape[1], *a.shape[2:])
    w_all = w.detach().expand(n, *w.shape).reshape(n * w.shape[0], *w.shape[1:])
    gw = torch.ops.aten.convolution_backward(
        go, inp, w_all, None, list(mod.stride), padding, list(mod.dilation), False, [0] * len(padding),
        n * mod.groups, [False, True, False])[1]
    return gw.reshape(n, *w.shape)


def _conv(mod: nn.Module, call: Call, g: Tensor, names: Sequence[str], grouped_channels: int = GROUPED_CHANNELS,
          **_) -> Optional[Dict[str, Grad]]:
    a = call.args[0]
    if a.dim() != _CONVS[type(mod)] + 2:  # unbatched input
        return None
    n = len(g)
    out: Dict[str, Grad] = {}
    for name in names:
        if name == "bias":
            out[name] = g.reshape(n, g.shape[1], -1).sum(dim=2)
            continue
        a_pad, padding = _conv_geometry(mod, a.to(g.dtype))
        # Grouped convolutions over all samples at once: on CPU ~3x faster than unfold + bmm (Opacus), whose
        # im2col dominates. In chunks of at most ~512 output channels: oneDNN picks a much slower kernel for
        # wider grouped convolutions on CPU (ResNet-20's 64-channel layers: 17 ms for 64 samples at once, 4 ms
        # in chunks of 8).
        k = max(1, grouped_channels // mod.weight.shape[0])
        out[name] = torch.cat([_grouped_weight_grad(mod, a_pad[i:i + k], g[i:i + k], padding)
                               for i in range(0, n, k)])
    return out


def _channel_sums(g: Tensor, xhat: Tensor, names: Sequence[str]) -> Dict[str, Grad]:
    """``sum(g * x_hat)`` and ``sum(g)`` per sample and channel (dim 1) for an affine per-channel norm."""
    n, c = g.shape[0], g.shape[1]
    out: Dict[str, Grad] = {}
    for name in names:
        out[name] = (g * xhat if name == "weight" else g).reshape(n, c, -1).sum(dim=2)
    return out


def _batchnorm(mod: nn.Module, call: Call, g: Tensor, names: Sequence[str], **_) -> Dict[str, Grad]:
    # y = x_hat * w + b, x_hat = (x - running_mean) / sqrt(running_var + eps).
    a = call.args[0].to(g.dtype)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var.reshape(shape) + mod.eps)
    return _channel_sums(g, xhat, names)


def _groupnorm(mod: nn.GroupNorm, call: Call, g: Tensor, names: Sequence[str], **_) -> Dict[str, Grad]:
    # Per-sample statistics by construction: the batched normalisation is each sample's own (Opacus' rule).
    a = call.args[0].to(g.dtype)
    xhat = F.group_norm(a, mod.num_groups, eps=mod.eps) if "weight" in names else g
    return _channel_sums(g, xhat, names)


def _instancenorm(mod: nn.Module, call: Call, g: Tensor, names: Sequence[str], **_) -> Optional[Dict[str, Grad]]:
    a = call.args[0].to(g.dtype)
    if a.dim() != _INSTANCENORMS[type(mod)] + 2:  # unbatched input
        return None
    xhat = g
    if "weight" in names:
        if mod.track_running_stats and not mod.training and mod.running_mean is not None:
            # F.instance_norm then normalises with the running statistics (use_input_stats=False).
            shape = (1, -1) + (1,) * (a.dim() - 2)
            xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var.reshape(shape) + mod.eps)
        else:
            xhat = F.instance_norm(a, eps=mod.eps)
    return _channel_sums(g, xhat, names)


def _layernorm(mod: nn.Module, call: Call, g: Tensor, names: Sequence[str], **_) -> Dict[str, Grad]:
    a = call.args[0].to(g.dtype)
    shape = tuple(mod.normalized_shape)
    n = len(g)
    xhat = g
    if "weight" in names:
        if type(mod) is nn.LayerNorm:
            xhat = F.layer_norm(a, shape, eps=mod.eps)
        else:
            xhat = F.rms_norm(a, shape, eps=mod.eps)
    out: Dict[str, Grad] = {}
    for name in names:
        out[name] = (g * xhat if name == "weight" else g).reshape(n, -1, *shape).sum(dim=1)
    return out


def _embedding(mod: nn.Embedding, call: Call, g: Tensor, names: Sequence[str], **_) -> Dict[str, Grad]:
    """A sample's gradient of the table is zero except in the rows of its tokens, each the sum of the output
    gradients at that token's positions. The rows of each sample's distinct tokens are gathered into the first
    slots of an ``(n, tokens, dim)`` tensor (sorted tokens; a new slot where the token changes); the other
    ``vocab - tokens`` rows are counted as zeros, never formed."""
    t = call.args[0]
    n, dim = len(g), mod.embedding_dim
    t2, g2 = t.reshape(n, -1), g.reshape(n, -1, dim)
    if mod.padding_idx is not None:  # torch's backward leaves that row's gradient at zero
        g2 = g2.masked_fill((t2 == mod.padding_idx).unsqueeze(-1), 0.0)
    ts, perm = t2.sort(dim=1)
    new = torch.ones_like(ts, dtype=torch.bool)
    new[:, 1:] = ts[:, 1:] != ts[:, :-1]
    slot = new.long().cumsum(dim=1) - 1
    rows = torch.zeros_like(g2).scatter_add_(1, slot.unsqueeze(-1).expand_as(g2),
                                             g2.gather(1, perm.unsqueeze(-1).expand_as(g2)))
    if mod.scale_grad_by_freq:  # frequencies within the sample, as in a one-sample backward
        counts = torch.zeros(ts.shape, dtype=g.dtype, device=g.device).scatter_add_(
            1, slot, torch.ones(ts.shape, dtype=g.dtype, device=g.device))
        rows = rows / counts.clamp_min(1.0).unsqueeze(-1)
    k = min(rows.shape[1], mod.num_embeddings)  # at most vocab distinct tokens: later slots are empty
    return {"weight": Compact(rows[:, :k].reshape(n, -1), (mod.num_embeddings - k) * dim)}


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_in_projections(mod: nn.MultiheadAttention) -> Tuple[Tuple[Tensor, ...], Tuple[Optional[Tensor], ...]]:
    if mod._qkv_same_embed_dim:
        w = mod.in_proj_weight.chunk(3)
    else:
        w = (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)
    b = mod.in_proj_bias.chunk(3) if mod.in_proj_bias is not None else (None, None, None)
    return w, b


def _mha_core(mod: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor],
              am: Optional[Tensor], need_weights: bool, average: bool, is_causal: bool
              ) -> Tuple[Tensor, Optional[Tensor]]:
    """The attention of projected batch-first ``q``, ``k``, ``v`` before the output projection, as
    ``F.multi_head_attention_forward`` computes it: directly with ``scaled_dot_product_attention`` when there is
    nothing else to do (the core of that function then), else by that function itself with identity
    projections (masks, ``is_causal``, ``add_zero_attn`` and the returned weights exactly as torch has them)."""
    n, t, e = q.shape
    h = mod.num_heads
    dropout = mod.dropout if mod.training else 0.0
    if kpm is None and am is None and not need_weights and not is_causal and not mod.add_zero_attn:
        qh, kh, vh = (z.reshape(n, z.shape[1], h, e // h).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout)
        return o.transpose(1, 2).reshape(n, t, e), None
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    core, weights = F.multi_head_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), e, h, None, None, None, None, mod.add_zero_attn,
        mod.dropout, eye, None, training=mod.training, key_padding_mask=kpm, need_weights=need_weights,
        attn_mask=am, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average, is_causal=is_causal)
    return core.transpose(0, 1), weights


def _mha_forward(mod: nn.MultiheadAttention, extra: Dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """``nn.MultiheadAttention.forward`` (batch first, no ``bias_k`` / ``bias_v``) in the batched pass, as
    in-projections, attention core and output projection, keeping the projected ``q``, ``k``, ``v`` and the
    core's output in ``extra`` so that the one backward pass also gives the gradients at ``q``, ``k``, ``v``."""
    bound = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
    bound.apply_defaults()
    p = bound.arguments
    query, key, value = p["query"], p["key"], p["value"]
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:  # unbatched: the layer's own forward, replayed
        return nn.MultiheadAttention.forward(mod, *args, **kwargs)
    (wq, wk, wv), (bq, bk, bv) = _mha_in_projections(mod)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    # The masks as MultiheadAttention.forward canonicalises them.
    kpm = F._canonical_mask(mask=p["key_padding_mask"], mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(p["attn_mask"]), other_name="attn_mask",
                            target_type=query.dtype)
    am = F._canonical_mask(mask=p["attn_mask"], mask_name="attn_mask", other_type=None, other_name="",
                           target_type=query.dtype, check_other=False)
    o, weights = _mha_core(mod, q, k, v, kpm, am, p["need_weights"], p["average_attn_weights"], p["is_causal"])
    extra.update(query=query, key=key, value=value, q=q, k=k, v=v, o=o)
    return F.linear(o, mod.out_proj.weight, mod.out_proj.bias), weights


def _mha(mod: nn.MultiheadAttention, call: Call, g: Tensor, names: Sequence[str], **_) -> Optional[Dict[str, Grad]]:
    """Per-sample gradients of a batch-first ``nn.MultiheadAttention`` from its pass through
    :func:`_mha_forward`: ``out_proj`` is a linear layer on the core's output ``o``, the in-projections are
    linear layers on ``query`` / ``key`` / ``value`` with output gradients at ``q`` / ``k`` / ``v``."""
    ex = call.extra
    if "o" not in ex:
        return None
    query, key, value = (ex[z].detach().to(g.dtype) for z in ("query", "key", "value"))
    gq, gk, gv = (call.extra_grads.get(z) for z in "qkv")
    gq, gk, gv = (torch.zeros_like(ex[z], dtype=g.dtype) if gz is None else gz
                  for z, gz in zip("qkv", (gq, gk, gv)))
    out: Dict[str, Grad] = {}
    for name in names:
        if name == "out_proj.weight":
            out[name] = torch.bmm(g.transpose(1, 2), ex["o"].detach().to(g.dtype))
        elif name == "out_proj.bias":
            out[name] = g.sum(dim=1)
        elif name == "in_proj_weight":
            out[name] = torch.cat([torch.bmm(gq.transpose(1, 2), query), torch.bmm(gk.transpose(1, 2), key),
                                   torch.bmm(gv.transpose(1, 2), value)], dim=1)
        elif name == "in_proj_bias":
            out[name] = torch.cat([gq.sum(dim=1), gk.sum(dim=1), gv.sum(dim=1)], dim=1)
        else:  # q_proj_weight, k_proj_weight, v_proj_weight
            gz, inp = {"q": (gq, query), "k": (gk, key), "v": (gv, value)}[name[0]]
            out[name] = torch.bmm(gz.transpose(1, 2), inp)
    return out


# Rules whose layer runs a decomposed forward in the batched pass, keeping extra tensors whose gradients the
# rule needs: kind -> (forward(mod, extra, *args, **kwargs), {parameter names: extra tensors needed}).
_FORWARDS: Dict[str, Tuple[Callable[..., Any], Callable[[Sequence[str]], List[str]]]] = {
    "mha": (_mha_forward, lambda names: ["q", "k", "v"] if any(not n.startswith("out_proj.") for n in names)
            else []),
}


_RULES: Dict[str, Callable[..., Optional[Dict[str, Grad]]]] = {
    "linear": _linear, "conv": _conv, "batchnorm": _batchnorm, "groupnorm": _groupnorm,
    "instancenorm": _instancenorm, "layernorm": _layernorm, "embedding": _embedding, "mha": _mha,
}
# Rules that need more of the call than its first argument and one output tensor (checked by the planner).
_MULTI_OUTPUT = {"mha"}


# ------------------------------------------------------------------------------------- the fallback
def replay_grads(mod: nn.Module, call: Call, gouts: Sequence[Optional[Tensor]], names: Sequence[str],
                 batched: Sequence[bool]) -> Dict[str, Tensor]:
    """Per-sample gradients of ``mod``'s parameters ``names`` (names within ``mod``) in one captured call,
    with ``torch.func``: ``vmap`` over the samples of ``grad`` of ``<mod(params, inputs_b), g_b>``, the call's
    output dotted with its output gradient (Opacus' functorch fallback, ``grad_sample/functorch.py``, here on
    every argument and keyword argument of the call). ``batched[i]`` says whether the ``i``-th tensor leaf of
    ``(args, kwargs)`` has the samples on dim 0 (the others are the same for every sample); ``gouts`` are the
    gradients of the floating-point tensor leaves of the output, in order (``None``: not used by the loss)."""
    from torch.func import functional_call, grad, vmap

    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    idx = [i for i, b in enumerate(batched) if b]
    out_leaves = tree_flatten(call.out)[0]
    fl = [j for j, t in enumerate(out_leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    used = [(j, gq.detach()) for j, gq in zip(fl, gouts) if gq is not None]
    consts = {k: v.detach() for k, v in mod.named_parameters()}
    diff = {k: consts.pop(k) for k in names}
    buffers = dict(mod.named_buffers())

    def f(p: Dict[str, Tensor], xs: List[Tensor], gs: List[Tensor]) -> Tensor:
        vals = list(leaves)
        for i, v in zip(idx, xs):
            vals[i] = v.unsqueeze(0)
        args, kwargs = tree_unflatten(vals, spec)
        o = tree_flatten(functional_call(mod, (p, consts, buffers), tuple(args), dict(kwargs)))[0]
        total = diff[names[0]].new_zeros(())
        for (j, _), gj in zip(used, gs):
            total = total + (o[j] * gj.unsqueeze(0)).sum()
        return total

    with warnings.catch_warnings():
        # vmap without a batching rule (e.g. CPU flash attention) loops over samples: slower, still exact.
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        return vmap(grad(f), in_dims=(None, 0, 0))(diff, [leaves[i] for i in idx], [gq for _, gq in used])


# -------------------------------------------------------------------------------------------- planning
@dataclass
class Unit:
    """Where the per-sample gradients of some parameters come from: a rule of ``kind`` or (``"replay"``)
    :func:`replay_grads`, on the one call of ``module`` (at ``path``). ``names`` maps the model's parameter
    names to names within ``module``."""

    module: nn.Module
    path: str
    kind: str
    names: Dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """Result of :func:`make_plan`: each trainable parameter's :class:`Unit` (``owner``), the parameters no
    module uses (per-sample gradient zero), the probe's module call counts and, for each unit module, the
    shapes of the tensor leaves of its call's ``(args, kwargs)`` and output (``None`` for other leaves)."""

    units: List[Unit]
    owner: Dict[str, Unit]
    unused: List[str]
    counts: Dict[int, int]
    shapes: Dict[int, Tuple[List[Optional[Tuple[int, ...]]], List[Optional[Tuple[int, ...]]], int]]
    sizes: Dict[str, int]  # per-sample entries materialised per parameter (chunk sizing)


def _shapes(tree: Any) -> List[Optional[Tuple[int, ...]]]:
    return [tuple(t.shape) if isinstance(t, Tensor) else None for t in tree_flatten(tree)[0]]


class _UsageMode(TorchFunctionMode):
    """Records, for each parameter entering a torch operation, the innermost module call running then."""

    def __init__(self, ids: Dict[int, str], stack: List[int], uses: Dict[str, Set[int]]) -> None:
        super().__init__()
        self.ids, self.stack, self.uses = ids, stack, uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:
            for t in tree_flatten((args, kwargs))[0]:
                name = self.ids.get(id(t))
                if name is not None:
                    self.uses[name].add(self.stack[-1])
        return func(*args, **kwargs)


def _user_hooks(mod: nn.Module) -> bool:
    # A hook may change the layer's inputs or output, which a rule would not see (the replay runs them).
    return bool(mod._forward_hooks or mod._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def make_plan(model: nn.Module, probe: Tensor, factorize: bool = True) -> Optional[Plan]:
    """Assign every trainable parameter of ``model`` to a :class:`Unit` from a forward pass on ``probe`` (one
    sample, the batch dimension first); see the module docstring. ``None`` when some parameter has no module
    call to be differentiated at (the model's output is not batch-first)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = {id(p): n for n, p in named}
    paths = {id(m): path for path, m in model.named_modules()}
    calls: List[Tuple[nn.Module, int]] = []  # (module, index of the enclosing call or -1)
    shapes: Dict[int, Tuple[List, List]] = {}
    counts: Dict[int, int] = {id(m): 0 for m in model.modules()}
    stack: List[int] = []
    uses: Dict[str, Set[int]] = {n: set() for n, _ in named}

    def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        counts[id(mod)] += 1
        calls.append((mod, stack[-1] if stack else -1))
        stack.append(len(calls) - 1)
        shapes[len(calls) - 1] = (_shapes((args, kwargs)), [], len(args))

    def post(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> None:
        shapes[stack.pop()][1].extend(_shapes(out))

    modules = list(model.modules())
    handles = [m.register_forward_pre_hook(pre, prepend=True, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in modules]
    try:
        # With autograd on, as in the batched pass (some layers, e.g. nn.TransformerEncoderLayer, take a fused
        # path without it, which never calls their submodules).
        with torch.enable_grad(), _UsageMode(ids, stack, uses):
            model(probe)
    finally:
        for h in handles:
            h.remove()

    def batch_first(i: int, rule: bool) -> bool:
        ins, outs, nargs = shapes[i]
        fl = [s for s in outs if s is not None]
        if not fl or any(len(s) == 0 or s[0] != 1 for s in fl):
            return False
        # A rule reads its input from the first positional argument.
        return not rule or (nargs > 0 and ins[0] is not None and len(ins[0]) > 0 and ins[0][0] == 1)

    def chain(i: int) -> List[int]:
        out = []
        while i != -1:
            out.append(i)
            i = calls[i][1]
        return out[::-1]  # root first

    units: Dict[Tuple[int, str], Unit] = {}
    owner: Dict[str, Unit] = {}
    unused: List[str] = []
    sizes: Dict[str, int] = {}
    for name, param in named:
        used = uses[name]
        if not used:
            unused.append(name)
            sizes[name] = 0
            continue
        chains = [chain(i) for i in used]
        common = chains[0]
        for c in chains[1:]:
            k = 0
            while k < min(len(common), len(c)) and common[k] == c[k]:
                k += 1
            common = common[:k]
        unit = None
        if len(used) == 1:
            i = next(iter(used))
            mod = calls[i][0]
            local = next((ln for ln, q in mod.named_parameters() if q is param), None)
            kind = rule_kind(mod, local) if local is not None else None
            if (kind is not None and counts[id(mod)] == 1 and not _user_hooks(mod)
                    and batch_first(i, rule=True)
                    and (kind in _MULTI_OUTPUT or len(shapes[i][1]) == 1)):
                unit = units.setdefault((id(mod), kind), Unit(mod, paths.get(id(mod), ""), kind))
                unit.names[name] = local
                if kind == "linear" and local == "weight" and factorize and len(shapes[i][0][0]) == 2:
                    sizes[name] = 0  # summarised from its factors
                elif kind == "embedding":
                    tokens = 1
                    for s in shapes[i][0][0][1:]:
                        tokens *= s
                    sizes[name] = min(tokens, mod.num_embeddings) * mod.embedding_dim
                else:
                    sizes[name] = param.numel()
        if unit is None:
            for i in reversed(common):  # innermost first
                mod = calls[i][0]
                local = next((ln for ln, q in mod.named_parameters() if q is param), None)
                if local is not None and counts[id(mod)] == 1 and batch_first(i, rule=False):
                    unit = units.setdefault((id(mod), "replay"), Unit(mod, paths.get(id(mod), ""), "replay"))
                    unit.names[name] = local
                    break
            if unit is None:  # not even the model's own call (e.g. its output is not batch-first)
                return None
            sizes[name] = param.numel()
        owner[name] = unit
    # Shapes of each unit module's (single) call, for the batched pass's batch-first checks.
    call_of = {id(m): i for i, (m, _) in enumerate(calls)}
    unit_shapes = {id(u.module): shapes[call_of[id(u.module)]] for u in units.values()}
    return Plan(list(units.values()), owner, unused, counts, unit_shapes, sizes)


# ------------------------------------------------------------------------------------- batched pass
class ChunkGrads:
    """Per-sample gradients of one batched pass, computed unit by unit on first request (:meth:`pop`); a
    unit's captured tensors and results are dropped once all its parameters were handed out, so that about one
    unit's gradients are held at a time."""

    def __init__(self, plan: Plan, n: int, calls: Dict[int, Call], gouts: Dict[int, List[Optional[Tensor]]],
                 batched: Dict[int, List[bool]], options: Dict[str, Any]) -> None:
        self.plan, self.n, self.calls, self.gouts, self.batched = plan, n, calls, gouts, batched
        self.options = options
        self._ready: Dict[str, Grad] = {}
        self._left: Dict[int, int] = {}
        for u in plan.units:
            self._left[id(u.module)] = self._left.get(id(u.module), 0) + len(u.names)

    def pop(self, name: str, like: Optional[Tensor] = None) -> Grad:
        """Per-sample gradient ``(n, *param.shape)`` (or its :class:`Outer` / :class:`Compact` summary) of the
        model's parameter ``name``; ``like`` (the parameter) gives the shape of an unused parameter's zeros."""
        if name in self.plan.unused:
            if like is None:
                raise ValueError(f"parameter {name!r} is unused: pass it as like= for its zero gradient")
            return torch.zeros(self.n, *like.shape, dtype=like.dtype, device=like.device)
        unit = self.plan.owner[name]
        if name not in self._ready:
            self._ready.update(self._compute(unit))
        key = id(unit.module)
        self._left[key] -= 1
        if self._left[key] == 0:
            self.calls.pop(key, None)
            self.gouts.pop(key, None)
        return self._ready.pop(name)

    def _compute(self, unit: Unit) -> Dict[str, Grad]:
        key = id(unit.module)
        call, gouts = self.calls[key], self.gouts[key]
        local = list(unit.names.values())
        res: Optional[Dict[str, Grad]] = None
        # A rule reads the first output only; a used second one (attention weights) needs the replay.
        if unit.kind != "replay" and all(gq is None for gq in gouts[1:]):
            g = gouts[0]
            if g is None:  # the output does not reach the loss
                g = torch.zeros_like(next(t for t in tree_flatten(call.out)[0] if isinstance(t, Tensor)))
            res = _RULES[unit.kind](unit.module, call, g.detach(), local, **self.options)
        if res is None:  # no rule fits this call
            res = replay_grads(unit.module, call, gouts, local, self.batched[key])
        return {glob: res[loc] for glob, loc in unit.names.items()}


def _batched_leaves(probe: List[Optional[Tuple[int, ...]]], now: List[Any], n: int) -> Optional[List[bool]]:
    """For each leaf of a call's ``(args, kwargs)``: whether its dim 0 holds the samples (size 1 in the
    one-sample probe, ``n`` now) or it is shared by all samples (same shape as in the probe); ``None`` when a
    leaf is neither (the batch is elsewhere) or the structure changed."""
    if len(probe) != len(now):
        return None
    out = []
    for ps, t in zip(probe, now):
        if not isinstance(t, Tensor):
            out.append(False)
            continue
        s = tuple(t.shape)
        if ps is None:
            return None
        if len(ps) > 0 and ps[0] == 1 and len(s) == len(ps) and s[0] == n and (n > 1 or s == ps):
            out.append(True)
        elif s == ps:
            out.append(False)
        else:
            return None
    return out


def batched_pass(model: nn.Module, plan: Plan, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                 want_x: bool = False, factorize: bool = True, grouped_channels: int = GROUPED_CHANNELS,
                 ) -> Optional[Tuple[Optional[Tensor], ChunkGrads]]:
    """One forward of ``model`` on ``x`` and one ``autograd.grad`` of ``loss_fn(logits)`` (a sum of per-sample
    losses): ``(dL/dx or None, per-sample parameter gradients)``, or ``None`` when the pass does not match the
    plan (a module ran a different number of times, a kept tensor was modified in place or is not batch-first).
    ``x`` gets ``requires_grad`` only with ``want_x`` (a float tensor then), so integer token inputs work."""
    n = len(x)
    unit_mods = {id(u.module): u.module for u in plan.units}
    calls: Dict[int, Call] = {}
    versions: Dict[int, List[int]] = {}
    counts: Dict[int, int] = {id(m): 0 for m in model.modules()}

    def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        counts[id(mod)] += 1
        if id(mod) in unit_mods:
            calls[id(mod)] = Call(args, dict(kwargs))

    def post(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> None:
        if id(mod) not in unit_mods or id(mod) not in calls:
            return
        call = calls[id(mod)]
        call.out = out
        for t in tree_flatten(out)[0]:
            # Gradients are asked of every kept output: it must be in the graph even when nothing before it
            # requires grad (a first layer on an input without requires_grad, whose weight the flipped-kernel
            # convolution of conv_backward.py detaches).
            if isinstance(t, Tensor) and t.is_floating_point() and not t.requires_grad and t.is_leaf:
                t.requires_grad_(True)
        # Versions at capture: an in-place op later in the forward (ReLU(inplace=True)) bumps them.
        versions[id(mod)] = [t._version if isinstance(t, Tensor) else -1
                             for t in tree_flatten((call.args, call.kwargs, out))[0]]

    modules = list(model.modules())
    handles = [m.register_forward_pre_hook(pre, prepend=True, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in modules]
    # Decomposed forwards (instance attributes, removed below) of the rule layers that need them.
    extras: Dict[int, Tuple[Dict[str, Tensor], List[str]]] = {}
    for u in plan.units:
        if u.kind in _FORWARDS and "forward" not in vars(u.module):
            fwd, needed = _FORWARDS[u.kind]
            store: Dict[str, Tensor] = {}
            extras[id(u.module)] = (store, needed(list(u.names.values())))
            u.module.forward = functools.partial(fwd, u.module, store)
    try:
        xc = x.clone().requires_grad_(True) if want_x else x
        loss = loss_fn(model(xc))
    finally:
        for h in handles:
            h.remove()
        for u in plan.units:
            if id(u.module) in extras:
                vars(u.module).pop("forward", None)
    if counts != plan.counts:
        return None
    batched: Dict[int, List[bool]] = {}
    outs: List[Tensor] = []
    spans: Dict[int, Tuple[int, int]] = {}
    extra_spans: Dict[int, Tuple[int, List[str]]] = {}
    for key, call in calls.items():
        now = [t._version if isinstance(t, Tensor) else -1 for t in tree_flatten((call.args, call.kwargs,
                                                                                   call.out))[0]]
        if now != versions.get(key):
            return None
        probe_in = plan.shapes[key][0]
        b = _batched_leaves(probe_in, tree_flatten((call.args, call.kwargs))[0], n)
        if b is None:
            return None
        batched[key] = b
        fl = [t for t in tree_flatten(call.out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
        if not fl or any(t.dim() == 0 or t.shape[0] != n for t in fl):
            return None
        spans[key] = (len(outs), len(outs) + len(fl))
        outs.extend(fl)
    for key, (store, needed) in extras.items():
        calls[key].extra = store
        wanted = [z for z in needed if z in store]
        for z in wanted:
            if not store[z].requires_grad:  # e.g. frozen in-projections on an input without requires_grad
                store[z].requires_grad_(True)
        extra_spans[key] = (len(outs), wanted)
        outs.extend(store[z] for z in wanted)
    inputs = ([xc] if want_x else []) + outs
    grads = list(torch.autograd.grad(loss, inputs, allow_unused=True)) if inputs else []
    del loss
    gx = grads.pop(0) if want_x else None
    if want_x and gx is None:
        gx = torch.zeros_like(x)
    for key, (start, wanted) in extra_spans.items():
        calls[key].extra_grads = dict(zip(wanted, grads[start:start + len(wanted)]))
    gouts = {key: grads[a:b] for key, (a, b) in spans.items()}
    options = dict(factorize=factorize, grouped_channels=grouped_channels)
    return gx, ChunkGrads(plan, n, calls, gouts, batched, options)
