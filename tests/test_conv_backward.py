"""The flipped-kernel input gradient of Conv2d (features/conv_backward.py) against PyTorch's own backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mia.features.conv_backward import _eligible, fast_conv_input_grad

CASES = [
    dict(in_channels=1, out_channels=6, kernel_size=3),  # LeNet conv1
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),  # ResNet-style
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=1),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_input_gradient_equals_the_standard_backward(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten())
    assert _eligible(conv)
    x = torch.randn(5, kwargs["in_channels"], 9, 11, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(model(x).sin().sum(), x)
    with fast_conv_input_grad(model):
        out = model(x)
        assert "_conv_forward" in vars(conv)
        (got,) = torch.autograd.grad(out.sin().sum(), x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert "_conv_forward" not in vars(conv)  # restored: the class's method again


def test_ineligible_layers_keep_the_standard_path_and_weights_get_no_gradient_inside():
    strided = nn.Conv2d(2, 2, 3, stride=2)
    same = nn.Conv2d(2, 2, 3, padding="same")
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    too_wide = nn.Conv2d(2, 2, 3, padding=3)  # more padding than the kernel reaches: no flipped form
    for conv in (strided, same, reflect, too_wide):
        assert not _eligible(conv)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), strided, same, reflect, too_wide)
    x = torch.randn(2, 2, 12, 12, requires_grad=True)
    (ref,) = torch.autograd.grad(model(x).sum(), x)
    with fast_conv_input_grad(model):
        out = model(x)
        (got,) = torch.autograd.grad(out.sum(), x)
        # Input gradients only within the block: the patched layer's weight is not part of the graph.
        (gw,) = torch.autograd.grad(model(x).sum(), [model[0].weight], allow_unused=True)
        assert gw is None
    torch.testing.assert_close(got, ref)
    assert all("_conv_forward" not in vars(m) for m in model)


def test_patch_is_removed_when_the_block_raises():
    conv = nn.Conv2d(1, 1, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with fast_conv_input_grad(conv):
            raise RuntimeError("boom")
    assert "_conv_forward" not in vars(conv)
