"""Tests for lightning_mia.models: shapes, gradients, published parameter counts, recipe equivalence,
forward-order of leaf modules, torch.func compatibility and registry/argument errors."""
from __future__ import annotations

import doctest
import importlib
import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mia.models import MODELS, AlexNet, DenseNet, LeNet, ResNet, build_model

# Small configurations of every architecture (deep models kept shallow so the file runs in seconds).
SMALL: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "lenet": ("lenet", {}),
    "alexnet": ("alexnet", {}),
    "resnet8": ("resnet", {"depth": 8}),
    "resnet11_bottleneck": ("resnet", {"depth": 11, "block_name": "bottleneck"}),
    "densenet_bc10": ("densenet", {"depth": 10, "growth_rate": 4}),
    "densenet7_dropout": ("densenet", {"depth": 7, "growth_rate": 4, "bottleneck": False, "drop_rate": 0.2}),
}
SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: thread start-up and oversubscription of a shared CPU cost more than they save.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make(key: str, num_classes: int, shape: Tuple[int, int, int]) -> nn.Module:
    name, options = SMALL[key]
    return build_model(name, num_classes, shape, **options)


def _forward_backward(model: nn.Module, shape: Tuple[int, int, int], num_classes: int) -> None:
    x = torch.randn(3, *shape)
    y = torch.randint(0, num_classes, (3,))
    out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# --------------------------------------------------------------------------- shapes and gradients
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("key", list(SMALL))
def test_forward_backward(key: str, shape: Tuple[int, int, int], num_classes: int) -> None:
    torch.manual_seed(0)
    model = make(key, num_classes, shape)
    assert model.training
    _forward_backward(model, shape, num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("key", list(SMALL))
def test_forward_backward_digits_8x8(key: str, num_classes: int) -> None:
    # sklearn's digits are 8x8x1; every model must take them (LeNet switches to padded convolutions).
    torch.manual_seed(0)
    _forward_backward(make(key, num_classes, (1, 8, 8)), (1, 8, 8), num_classes)


def test_lenet_padding_choice() -> None:
    # The authors' Keras LeNet uses "valid" 3x3 convolutions; only images too small for them get padding 1.
    assert LeNet(10, (1, 28, 28)).conv1.padding == (0, 0)
    assert LeNet(10, (3, 32, 32)).conv2.padding == (0, 0)
    assert LeNet(10, (1, 10, 10)).conv1.padding == (0, 0)  # 10 -> 8 -> 4 -> 2 -> 1: smallest valid size
    assert LeNet(10, (1, 9, 9)).conv1.padding == (1, 1)
    assert LeNet(10, (1, 8, 8)).conv1.padding == (1, 1)
    assert LeNet(10, (1, 28, 28), padding=1).conv1.padding == (1, 1)


@pytest.mark.parametrize(
    "shape,padding,flat",
    [
        ((1, 28, 28), 0, 16 * 5 * 5),  # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5
        ((3, 32, 32), 0, 16 * 6 * 6),  # 32 -> 30 -> 15 -> 13 -> 6
        ((1, 8, 8), 1, 16 * 2 * 2),  # 8 -> 8 -> 4 -> 4 -> 2
    ],
)
def test_lenet_layer_sizes(shape: Tuple[int, int, int], padding: int, flat: int) -> None:
    model = LeNet(10, shape)
    assert model.fc1.in_features == flat
    c = shape[0]
    # Hand count: conv 6@3x3, conv 16@3x3, FC 120, FC 84, FC 10 (all with biases).
    expected = (6 * c * 9 + 6) + (16 * 6 * 9 + 16) + (flat * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(model) == expected
    assert model.conv1.padding == (padding, padding)


# --------------------------------------------------------------------------- parameter counts
def resnet_basic_params(n: int, in_channels: int, num_classes: int) -> int:
    """Independent count for a CIFAR ResNet with basic blocks and 1x1-conv+BN projection shortcuts."""
    total = 9 * in_channels * 16 + 2 * 16  # stem conv (no bias) + BN
    c = 16
    for p, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            total += 9 * c * p + 9 * p * p + 2 * (2 * p)  # two 3x3 convs + two BNs
            if i == 0 and (stride != 1 or c != p):
                total += c * p + 2 * p  # projection conv + BN
            c = p
    return total + 64 * num_classes + num_classes


def densenet_bc_params(depth: int, k: int, in_channels: int, num_classes: int) -> int:
    """Independent count for DenseNet-BC (bottleneck 4k, compression 0.5, stem 2k) following Huang et al."""
    n = (depth - 4) // 6
    c = 2 * k
    total = 9 * in_channels * c
    for block in range(3):
        for _ in range(n):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 9 * 4 * k * k
            c += k
        if block < 2:
            out = c // 2
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * num_classes + num_classes


def test_resnet20_param_count() -> None:
    # He et al. 2016 Table 6: ResNet-20 has 0.27M parameters; the exact count with projection shortcuts
    # (bearpaw's) for CIFAR-10 is 272,474.
    model = build_model("resnet", 10, (3, 32, 32), depth=20)
    assert n_params(model) == resnet_basic_params(3, 3, 10) == 272_474
    assert n_params(build_model("resnet20", 10, (3, 32, 32))) == 272_474
    assert n_params(build_model("resnet20", 100, (3, 32, 32))) == resnet_basic_params(3, 3, 100)


def test_resnet110_param_count() -> None:
    # He et al. 2016 Table 6: ResNet-110 has 1.7M parameters (1,730,714 with projection shortcuts).
    model = build_model("resnet110", 10, (3, 32, 32))
    assert n_params(model) == resnet_basic_params(18, 3, 10) == 1_730_714
    assert round(n_params(model) / 1e6, 1) == 1.7


def test_resnet164_bottleneck_matches_bearpaw_legacy_resnet110() -> None:
    # bearpaw README: "ResNet-110 | 1.70M" -- its old resnet.py used Bottleneck blocks for depth >= 44 with
    # n = (110-2)/6 = 18 blocks per stage, i.e. the 9n+2 = 164-layer bottleneck ResNet (He et al. 2016b: 1.7M).
    model = build_model("resnet164", 10, (3, 32, 32))
    assert model.layer1[0].conv3.out_channels == 64 and len(model.layer1) == 18
    assert round(n_params(model) / 1e6, 2) == 1.70


def test_densenet_bc_100_param_count() -> None:
    # Huang et al. 2017 Table 2: DenseNet-BC (L=100, k=12) 0.8M; bearpaw README 0.77M; exact C10 count 769,162.
    model = build_model("densenet", 10, (3, 32, 32))
    assert n_params(model) == densenet_bc_params(100, 12, 3, 10) == 769_162
    assert round(n_params(model) / 1e6, 2) == 0.77
    assert model.fc.in_features == 342  # 24 + 16*12 = 216 -> 108 + 192 = 300 -> 150 + 192 = 342
    assert n_params(build_model("densenet_bc_100", 100, (3, 32, 32))) == densenet_bc_params(100, 12, 3, 100)
    assert n_params(build_model("densenet_bc_40", 10, (3, 32, 32))) == densenet_bc_params(40, 12, 3, 10)


def test_alexnet_param_count() -> None:
    # bearpaw README: alexnet 2.47M parameters on CIFAR-10.
    model = build_model("alexnet", 10, (3, 32, 32))
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    expected = sum(cin * cout * k * k + cout for cin, cout, k in convs) + 256 * 10 + 10
    assert n_params(model) == expected
    assert round(expected / 1e6, 2) == 2.47


# --------------------------------------------------------------------------- recipe equivalence on 32x32
def test_alexnet_equals_bearpaw_on_cifar() -> None:
    # bearpaw's AlexNet verbatim in structure (floor max-pools, final MaxPool2d(2)); ours must compute the same.
    torch.manual_seed(0)
    ours = AlexNet(10, (3, 32, 32)).eval()
    ref = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(256, 10),
    ).eval()
    ours_params = [p for p in ours.parameters()]
    ref_params = [p for p in ref.parameters()]
    assert [p.shape for p in ours_params] == [p.shape for p in ref_params]
    with torch.no_grad():
        for a, b in zip(ref_params, ours_params):
            a.copy_(b)
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(ours(x), ref(x))


def _capture_output(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: List[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_cifar_spatial_plan_matches_fixed_pooling() -> None:
    # bearpaw ends with AvgPool2d(8) on an 8x8 map; our adaptive pooling must see that map and give the same.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model, last in ((ResNet(10, (3, 32, 32), depth=8), "layer3"), (DenseNet(10, (3, 32, 32), depth=10), "relu")):
        model.eval()
        feat = _capture_output(getattr(model, last), model, x)
        assert feat.shape[-2:] == (8, 8)
        with torch.no_grad():
            expected = model.fc(F.avg_pool2d(feat, 8).flatten(1))
            torch.testing.assert_close(model(x), expected)


# --------------------------------------------------------------------------- structure contracts
@pytest.mark.parametrize("key", list(SMALL))
def test_leaf_modules_run_once_in_registration_order(key: str) -> None:
    # The features package relies on leaf order == forward order (e.g. "the layer before the logits").
    model = make(key, 10, (3, 32, 32)).eval()
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    calls: List[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name)) for name, m in leaves]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert calls == [name for name, _ in leaves]
    last = leaves[-1][1]
    assert isinstance(last, nn.Linear) and last.out_features == 10


@pytest.mark.parametrize("key", list(SMALL))
def test_no_inplace_modules(key: str) -> None:
    model = make(key, 10, (1, 28, 28))
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_construction_does_not_touch_batchnorm_statistics() -> None:
    # The construction-time shape check runs in eval mode; running stats must stay at their initial values.
    for model in (ResNet(10, (3, 32, 32), depth=8), DenseNet(10, (3, 32, 32), depth=10, growth_rate=4)):
        assert model.training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert int(m.num_batches_tracked) == 0
                assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))


def test_bearpaw_initialisation() -> None:
    # bearpaw: conv weights ~ N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 / bias 0.
    torch.manual_seed(0)
    model = ResNet(10, (3, 32, 32), depth=20)
    conv = model.layer3[1].conv1  # 64 * 64 * 9 = 36,864 weights
    expected_std = math.sqrt(2.0 / (3 * 3 * conv.out_channels))
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.03
    assert torch.equal(model.layer3[1].bn1.weight, torch.ones(64))


# --------------------------------------------------------------------------- torch.func
def _params_and_buffers(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, buffers


def _warm_eval_model(key: str, shape):
    """The model in eval mode with non-trivial BatchNorm running statistics (so eval differs from batch stats)."""
    model = make(key, 10, shape)
    with torch.no_grad():
        model(torch.randn(4, *shape))
    model.eval()
    return (model, *_params_and_buffers(model))


@pytest.mark.parametrize("key", list(SMALL))
def test_functional_call_matches_module(key: str) -> None:
    torch.manual_seed(0)
    model, params, buffers = _warm_eval_model(key, (3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(model, (params, buffers), (x,)), model(x))


@pytest.mark.parametrize("key", list(SMALL))
def test_per_sample_gradients_with_vmap_match_loop(key: str) -> None:
    torch.manual_seed(0)
    model, params, buffers = _warm_eval_model(key, (1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 3, 9])

    def loss_fn(p: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- registry and validation
def test_registry_names() -> None:
    for name in ("lenet", "alexnet", "resnet", "densenet", "resnet20", "resnet110", "densenet_bc_100"):
        assert name in MODELS


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KeyError, match="Known models: .*alexnet.*densenet.*lenet.*resnet"):
        build_model("vgg16", 10, (3, 32, 32))


def test_spec_mapping() -> None:
    model = build_model({"name": "resnet", "depth": 8}, 7, [1, 28, 28])
    assert isinstance(model, ResNet) and model.depth == 8 and model.fc.out_features == 7
    assert model.conv1.in_channels == 1


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("resnet", {"depth": 21}, r"6n\+2"),
        ("resnet", {"depth": 2}, r"6n\+2"),
        ("resnet", {"depth": 26, "block_name": "bottleneck"}, r"9n\+2"),  # 6n+2 but not 9n+2
        ("resnet", {"depth": 8, "block_name": "wide"}, "block_name must be one of"),
        ("densenet", {"depth": 20}, r"6n\+4"),  # (20-4) % 6 != 0
        ("densenet", {"depth": 8, "bottleneck": False}, r"3n\+4"),
        ("densenet", {"depth": 10, "growth_rate": 0}, "growth_rate"),
        ("densenet", {"depth": 10, "reduction": 1.5}, "reduction"),
        ("densenet", {"depth": 10, "drop_rate": 1.0}, "drop_rate"),
        ("lenet", {"padding": -1}, "padding"),
        ("lenet", {"depth": 3}, "Unknown option"),
        ("resnet20", {"depth": 32}, "fixes depth=20"),
        ("resnet20", {"growth_rate": 12}, "Unknown option"),
    ],
)
def test_bad_options_raise_value_error(name: str, options: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, (3, 32, 32), **options)


def test_alias_accepts_its_own_value() -> None:
    assert build_model("resnet20", 10, (3, 32, 32), depth=20).depth == 20
    assert build_model("resnet", 10, (3, 32, 32), depth=8, block_name="BasicBlock").block_name == "basic"


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_num_classes(num_classes: Any) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet", num_classes, (1, 28, 28))


@pytest.mark.parametrize("shape", [(28, 28), (1, 0, 28), (1, 28.0, 28), None])
def test_bad_input_shape(shape: Any) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet", 10, shape)


@pytest.mark.parametrize("name,shape", [("lenet", (1, 1, 1)), ("densenet_bc_40", (3, 2, 2))])
def test_input_too_small(name: str, shape: Tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        build_model(name, 10, shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", list(SMALL))
def test_cuda_forward(key: str) -> None:
    model = make(key, 10, (3, 32, 32)).cuda()
    assert model(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 10)


@pytest.mark.parametrize("module", ["registry", "lenet", "alexnet", "resnet", "densenet", "__init__"])
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module("lightning_mia.models" + ("" if module == "__init__" else f".{module}"))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
