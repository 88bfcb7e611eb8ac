"""A faster input gradient for ``nn.Conv2d`` on CPU, used while white-box features run.

The input gradient of a stride-1 convolution is itself a convolution: of the output gradient with the kernel
flipped spatially and its in/out channels swapped, padded by ``dilation * (k - 1) - padding``. On CPU the
oneDNN kernel behind ``convolution_backward`` computes it 2.5-4x slower than a forward convolution of the
same size (measured with torch 2.13 on LeNet's and ResNet-20's layers, ``benchmarks/features.py``), so the
walk of ``boundary_distance`` (a forward and an input gradient per step) and the backward pass of
``gradient_norms`` spend most of their time there. :func:`fast_conv_input_grad` swaps in an autograd function
whose backward computes it as that forward convolution; results equal the standard backward up to float
rounding (tests). Weight and bias gradients are unchanged (``convolution_backward`` / a sum).

Only stride-1 ``Conv2d`` layers with zero padding given as numbers, on CPU tensors, are affected; strided,
``padding="same"``-style and non-zero padding modes, other devices and everything under ``torch.func``
transforms keep PyTorch's own path. The patch is an instance attribute removed on exit, so the model is
unchanged afterwards (its ``state_dict``, hooks and class are never touched).

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    >>> x = torch.randn(4, 2, 8, 8, requires_grad=True)
    >>> with fast_conv_input_grad(conv):
    ...     (g,) = torch.autograd.grad(conv(x).square().sum(), x)
    >>> (ref,) = torch.autograd.grad(conv(x).square().sum(), x)
    >>> torch.allclose(g, ref, atol=1e-5)
    True
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["fast_conv_input_grad", "flipped_input_grad"]


def flipped_input_grad(g: Tensor, weight: Tensor, padding: Tuple[int, int], dilation: Tuple[int, int],
                       groups: int) -> Tensor:
    """Input gradient of a stride-1 ``conv2d(x, weight, padding=padding, dilation=dilation, groups=groups)``
    given its output gradient ``g``, as one forward convolution."""
    out_c, in_per_group, kh, kw = weight.shape
    w = weight.reshape(groups, out_c // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_c // groups, kh, kw).flip(2, 3)
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    return F.conv2d(g, w, None, 1, pad, dilation, groups)


class _Conv2dFlippedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Tuple[int, int],
                dilation: Tuple[int, int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (padding, dilation, groups)
        return F.conv2d(x, weight, bias, 1, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        padding, dilation, groups = ctx.conf
        g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = flipped_input_grad(g, weight, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(
                g, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], groups,
                [False, True, False])[1]
        if ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None, None


def _eligible(mod: nn.Module) -> bool:
    if not isinstance(mod, nn.Conv2d) or type(mod).forward is not nn.Conv2d.forward:
        return False
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str) or tuple(mod.stride) != (1, 1):
        return False
    kh, kw = mod.kernel_size
    # The flipped convolution needs a non-negative padding.
    return mod.padding[0] <= mod.dilation[0] * (kh - 1) and mod.padding[1] <= mod.dilation[1] * (kw - 1)


def _patched(mod: nn.Conv2d):
    original = mod._conv_forward  # the class's bound method

    def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return original(x, weight, bias)
        # Weights detached: the block computes input gradients only (a custom function cannot tell which of its
        # inputs autograd.grad asked for, and would compute an unused weight gradient per layer).
        return _Conv2dFlippedBackward.apply(x, weight.detach(), None if bias is None else bias.detach(),
                                            tuple(mod.padding), tuple(mod.dilation), mod.groups)

    return conv_forward


@contextlib.contextmanager
def fast_conv_input_grad(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, eligible ``nn.Conv2d`` layers of ``model`` back-propagate to their input with a
    flipped-kernel forward convolution (see the module docstring); restored on exit, even on error."""
    patched: List[nn.Module] = []
    try:
        if enabled:
            for mod in model.modules():
                if _eligible(mod) and "_conv_forward" not in vars(mod):
                    mod._conv_forward = _patched(mod)
                    patched.append(mod)
        yield model
    finally:
        for mod in patched:
            vars(mod).pop("_conv_forward", None)
