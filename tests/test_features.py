"""Features: every value is checked against an independent reference (numpy / scipy / mpmath, a naive
per-sample autograd loop, analytic boundary distances of linear classifiers, sklearn)."""
from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from lightning_mia.features import FEATURES, BoundaryDistance, Feature, GradientNorms, Intermediate, extract_features
from lightning_mia.features.gradients import STAT_NAMES, finalize_moments, merge_moments, moments

ALL_NAMES = ["confidence", "softmax", "true_class_prob", "loss", "entropy", "modified_entropy",
             "logit_scaled_confidence", "intermediate", "gradient_norms", "boundary_distance"]


# ----------------------------------------------------------------------------------------------- fixtures
def linear_model(w, b):
    model = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return model


class TinyCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(3 * 2 * 2, 6)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        x = self.flatten(self.pool(self.relu(self.bn(self.conv(x)))))
        return self.fc2(self.act(self.fc1(x)))


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN()
    # Non-trivial running statistics so eval-mode BatchNorm is not the identity.
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


# ------------------------------------------------------------------------------------------ registry / API
def test_registry_has_every_feature_and_builds_from_specs():
    assert set(ALL_NAMES) <= set(FEATURES)
    feat = FEATURES.build({"name": "confidence", "top_k": 3})
    assert isinstance(feat, Feature) and feat.top_k == 3
    with pytest.raises(KeyError, match="Known features"):
        FEATURES["nope"]


@pytest.mark.parametrize("name,kwargs,match", [
    ("confidence", {"top_k": 0}, "top_k"),
    ("intermediate", {"layers": [0]}, "negative"),
    ("intermediate", {"index_mode": "all"}, "paper"),
    ("intermediate", {"max_dims": -3}, "max_dims"),
    ("gradient_norms", {"wrt": ["weights", "bias"]}, "weights"),
    ("gradient_norms", {"chunk_size": 0}, "chunk_size"),
    ("boundary_distance", {"preset": "slow"}, "fast"),
    ("boundary_distance", {"norm": "l1"}, "linf"),
    ("boundary_distance", {"clamp": (1.0, 0.0)}, "min < max"),
    ("boundary_distance", {"growth": 0.5}, ">= 1"),
])
def test_invalid_options_raise_value_error_naming_the_choices(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FEATURES[name](**kwargs)


# ------------------------------------------------------------------------------------------- confidence
W = np.array([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0], [-0.7, 0.1, 2.0], [0.0, 0.5, 0.5]])
B = np.array([0.1, -0.3, 0.2, 0.0])
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, -3.0, 1.0]])
Y = np.array([2, 0, 1, 3, 0])


def _np_softmax():
    z = X @ W.T + B
    e = np.exp(z - z.max(1, keepdims=True))
    return z, e / e.sum(1, keepdims=True)


def _np_expected(name):
    z, p = _np_softmax()
    n = np.arange(len(Y))
    py = p[n, Y]
    if name == "confidence":
        return -np.sort(-p, axis=1)
    if name == "softmax":
        return p
    if name == "true_class_prob":
        return py[:, None]
    if name == "loss":
        return -np.log(py)[:, None]
    if name == "entropy":
        return -(p * np.log(p)).sum(1, keepdims=True)
    if name == "modified_entropy":  # Song & Mittal 2021, eq. (5)
        wrong = p * np.log(1 - p)
        wrong[n, Y] = 0
        return (-(1 - py) * np.log(py) - wrong.sum(1))[:, None]
    if name == "logit_scaled_confidence":
        return (np.log(py) - np.log(1 - py))[:, None]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["confidence", "softmax", "true_class_prob", "loss", "entropy",
                                  "modified_entropy", "logit_scaled_confidence"])
def test_confidence_variants_match_numpy(name):
    model = linear_model(W, B)
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
    feat = FEATURES[name]()
    with torch.no_grad():
        from_logits = feat.extract(model, x, y, model(x))
    recomputed = feat.extract(model, x, y)  # no logits given: the feature runs the model itself
    assert from_logits.dtype == torch.float32 and from_logits.shape[0] == len(X)
    np.testing.assert_allclose(from_logits.numpy(), _np_expected(name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recomputed.numpy(), from_logits.numpy(), rtol=1e-6)


def test_confidence_top_k_keeps_the_largest():
    model = linear_model(W, B)
    out = FEATURES["confidence"](top_k=2).extract(model, torch.tensor(X, dtype=torch.float32), None)
    np.testing.assert_allclose(out.numpy(), _np_expected("confidence")[:, :2], rtol=1e-5)


def _mp_reference(z, y):
    mpmath.mp.dps = 60
    z = [mpmath.mpf(float(v)) for v in z]
    ez = [mpmath.exp(v) for v in z]
    tot = mpmath.fsum(ez)
    p = [e / tot for e in ez]
    # 1 - p_j as the sum of the other probabilities: exact even where p_j = 1 - 1e-400.
    rest = [mpmath.fsum(p[k] for k in range(len(z)) if k != j) for j in range(len(z))]
    lsc = mpmath.log(p[y]) - mpmath.log(rest[y])
    mentr = -rest[y] * mpmath.log(p[y]) - mpmath.fsum(
        p[j] * mpmath.log(rest[j]) for j in range(len(z)) if j != y)
    ent = -mpmath.fsum(pj * mpmath.log(pj) for pj in p if pj > 0)
    return float(lsc), float(mentr), float(ent), float(-mpmath.log(p[y]))


@pytest.mark.parametrize("logits,label", [
    ([1000.0, 0.0, -1000.0], 0),    # saturated, correct
    ([1000.0, 0.0, -1000.0], 2),    # saturated, wrong: p_y underflows to 0 in float64
    ([40.0, 0.0, 1.0], 0),          # p_y = 1 in float64; log(1 - p_y) would be log(0)
    ([40.0, 0.0, 1.0], 1),
    ([-30.0, -30.0, -30.0001], 2),  # near tie
    ([88.0, -88.0, 87.9], 2),
])
def test_logit_scaled_and_entropies_are_stable_for_extreme_logits(logits, label):
    z = torch.tensor([logits], dtype=torch.float32)
    y = torch.tensor([label])
    lsc_ref, mentr_ref, ent_ref, loss_ref = _mp_reference(z[0].double().tolist(), label)
    got = {name: FEATURES[name]().extract(None, None, y, z).item()
           for name in ("logit_scaled_confidence", "modified_entropy", "entropy", "loss")}
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["logit_scaled_confidence"] == pytest.approx(lsc_ref, rel=1e-6, abs=1e-6)
    assert got["modified_entropy"] == pytest.approx(mentr_ref, rel=1e-5, abs=1e-30)
    assert got["entropy"] == pytest.approx(ent_ref, rel=1e-5, abs=1e-30)
    assert got["loss"] == pytest.approx(loss_ref, rel=1e-6, abs=1e-30)


# ----------------------------------------------------------------------------------------- intermediate
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8, 7)
        self.fc2 = nn.Linear(7, 5)
        self.classifier = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        x = self.flatten(x)
        h1 = torch.relu(self.fc1(x))  # functional activation: not a module
        h2 = torch.relu(self.fc2(h1))
        return self.classifier(h2)


def _manual_activations(model, x):
    x = model.flatten(x)
    fc1 = model.fc1(x)
    h1 = torch.relu(fc1)
    fc2 = model.fc2(h1)
    h2 = torch.relu(fc2)
    c0 = model.classifier[0](h2)
    h3 = torch.relu(c0)
    logits = model.classifier[2](h3)
    return dict(x=x, fc1=fc1, h1=h1, fc2=fc2, h2=h2, c0=c0, h3=h3, logits=logits)


def test_intermediate_matches_a_manual_forward():
    model = MLP()
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        ref = _manual_activations(model, x)
    paper = Intermediate(layers=[-1, -2, -3, -4]).extract(model, x, None)
    # "paper": -k = input of the k-th last nn.Linear (= the representation that layer reads).
    np.testing.assert_allclose(paper.numpy(), torch.cat([ref["h3"], ref["h2"], ref["h1"], ref["x"]], 1).numpy(),
                               rtol=1e-6)
    leaves = Intermediate(layers=[-1, -2, -4], index_mode="leaves").extract(model, x, None)
    # "leaves": -k = output of the k-th last leaf module with parameters (-1 = logits).
    np.testing.assert_allclose(leaves.numpy(), torch.cat([ref["logits"], ref["c0"], ref["fc1"]], 1).numpy(),
                               rtol=1e-6)
    by_path = Intermediate(layers=["classifier.1", "fc2"]).extract(model, x, None)
    np.testing.assert_allclose(by_path.numpy(), torch.cat([ref["h3"], ref["fc2"]], 1).numpy(), rtol=1e-6)


def test_intermediate_on_lenet_style_cnn_and_errors():
    model = tiny_cnn()
    model.eval()
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        flat = model.flatten(model.pool(model.relu(model.bn(model.conv(x)))))
        hidden = model.act(model.fc1(flat))
    out = Intermediate(layers=[-1, -2]).extract(model, x, None)
    np.testing.assert_allclose(out.numpy(), torch.cat([hidden, flat], 1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs at least 3"):
        Intermediate(layers=-3).extract(model, x, None)
    with pytest.raises(ValueError, match="no submodule"):
        Intermediate(layers="fc9").extract(model, x, None)
    # The BatchNorm is a leaf with parameters, the ReLU and pooling are not.
    bn = Intermediate(layers=-3, index_mode="leaves").extract(model, x, None)
    with torch.no_grad():
        np.testing.assert_allclose(bn.numpy(), model.bn(model.conv(x)).flatten(1).numpy(), rtol=1e-5, atol=1e-6)


def test_intermediate_pca_cap_keeps_the_top_principal_variances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    feat = Intermediate(max_dims=4, seed=3)
    Z = feat.fit_postprocess(X)(X)
    assert Z.shape == (60, 4) and Z.dtype == np.float32
    eig = np.sort(np.linalg.eigvalsh(np.cov(X.T)))[::-1][:4]
    np.testing.assert_allclose(np.var(Z, axis=0, ddof=1), eig, rtol=1e-4)
    assert feat.dim_names(4) == ["pc_0", "pc_1", "pc_2", "pc_3"]
    np.testing.assert_array_equal(Intermediate(max_dims=20).fit_postprocess(X)(X), X.astype(np.float32))


# ---------------------------------------------------------------------------------------- gradient norms
def _scipy_stats(g):
    g = np.asarray(g, dtype=np.float64).ravel()
    return [np.linalg.norm(g, 1), np.linalg.norm(g), np.abs(g).min(), np.abs(g).max(), np.mean(g),
            stats.skew(g), stats.kurtosis(g)]


def _naive_gradient_stats(model, x, y, per_layer=False):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i:i + 1])
        grads = torch.autograd.grad(loss, params + [xi])
        gw = np.concatenate([g.reshape(-1).double().numpy() for g in grads[:-1]])
        row = _scipy_stats(gw)
        if per_layer:
            for g in grads[:-1]:
                row += _scipy_stats(g.double().numpy())
        row += _scipy_stats(grads[-1].double().numpy())
        rows.append(row)
    return np.array(rows)


def _assert_stats_close(got, ref):
    # Relative to each column's scale: float32 per-sample gradients from a batched vs. a single-sample pass.
    scale = np.abs(ref).max(axis=0) + 1e-12
    assert np.all(np.abs(got - ref) <= 2e-4 * scale + 1e-7), np.abs(got - ref).max(axis=0) / scale


def test_gradient_norms_match_a_naive_per_sample_loop_with_scipy_stats():
    model = tiny_cnn()
    model.train()
    x, y = torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    feat = GradientNorms(per_layer=True, chunk_size=3)  # chunks of 3 samples: 3 + 3 + 1
    got = feat.extract(model, x, y).double().numpy()
    assert model.training and model.bn.training  # training mode restored
    model.eval()
    ref = _naive_gradient_stats(model, x, y, per_layer=True)
    _assert_stats_close(got, ref)
    names = feat.dim_names(got.shape[1])
    assert names[:7] == [f"w_{s}" for s in STAT_NAMES] and names[-7:] == [f"x_{s}" for s in STAT_NAMES]
    assert "w[bn.weight]_kurt" in names


def test_gradient_norms_wrt_subsets_frozen_params_and_state_restored():
    model = tiny_cnn(seed=2)
    model.conv.weight.requires_grad_(False)  # frozen: not part of "all trainable weights"
    for p in model.parameters():
        p.grad = None
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)  # must survive untouched
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    both = GradientNorms(wrt=["input", "weights"]).extract(model, x, y).double().numpy()
    only_x = GradientNorms(wrt="input").extract(model, x, y).double().numpy()
    only_w = GradientNorms(wrt="weights").extract(model, x, y).double().numpy()
    assert not model.conv.weight.requires_grad and all(
        p.requires_grad for n, p in model.named_parameters() if n != "conv.weight")
    assert torch.equal(model.fc2.weight.grad, torch.ones_like(model.fc2.weight)) and model.fc1.weight.grad is None
    assert opt.state_dict()["state"] == {}
    model.eval()
    ref = _naive_gradient_stats(model, x, y)
    _assert_stats_close(only_w, ref[:, :7])
    _assert_stats_close(only_x, ref[:, 7:])
    np.testing.assert_allclose(both[:, :7], only_x, rtol=1e-4, atol=1e-7)  # wrt order is column order
    np.testing.assert_allclose(both[:, 7:], only_w, rtol=1e-4, atol=1e-7)


def test_gradient_norms_chunking_and_auto_chunk_size():
    model = tiny_cnn(seed=3)
    x, y = torch.randn(9, 2, 4, 4), torch.randint(0, 3, (9,))
    ref = GradientNorms(chunk_size=9).extract(model, x, y)
    tiny_budget = GradientNorms(memory_budget_mb=1e-4)  # forces chunks of one sample
    assert tiny_budget.auto_chunk_size(sum(p.numel() for p in model.parameters())) == 1
    np.testing.assert_allclose(tiny_budget.extract(model, x, y).numpy(), ref.numpy(), rtol=1e-4, atol=1e-7)


class SharedAndSequenceLinear(nn.Module):
    """Linear layers whose per-sample gradient is not one outer product: applied twice (shared), and applied
    to a (tokens, features) sequence; plus a plain one that is factorised."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.token = nn.Linear(3, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (n, 4, 3)
        h = torch.tanh(self.token(x)).mean(dim=1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


def test_gradient_norms_of_a_bare_linear_model():
    model = linear_model(W, B)  # the model itself is the (factorised) nn.Linear
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
    _assert_stats_close(GradientNorms().extract(model, x, y).double().numpy(), _naive_gradient_stats(model, x, y))


def test_gradient_norms_factorised_linear_layers_equal_materialised_ones():
    from lightning_mia.features.gradients import _factorable_linears

    model = SharedAndSequenceLinear()
    x, y = torch.randn(6, 4, 3), torch.randint(0, 3, (6,))
    params = {n: p for n, p in model.named_parameters()}
    assert set(_factorable_linears(model, params, x[:1])) == {"head"}  # the others fall back
    fact = GradientNorms(per_layer=True).extract(model, x, y).double().numpy()
    full = GradientNorms(per_layer=True, factorize=False).extract(model, x, y).double().numpy()
    np.testing.assert_allclose(fact, full, rtol=1e-5, atol=1e-8)
    _assert_stats_close(fact[:, list(range(7)) + list(range(fact.shape[1] - 7, fact.shape[1]))],
                        _naive_gradient_stats(model, x, y))


class HookLayers(nn.Module):
    """Every layer kind of the one-backward (hook) path: strided, dilated and grouped convolutions, 2-d and
    1-d BatchNorm, a linear layer on a (tokens, features) input and a flat one; optionally an in-place ReLU
    that rewrites a kept output (the hook path must then fall back to vmap)."""

    def __init__(self, inplace=False):
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.relu = nn.ReLU(inplace=inplace)
        self.token = nn.Linear(4, 3)
        self.bn1 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn1):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):  # x: (n, 2, 4, 4)
        h = self.relu(self.conv2(torch.tanh(self.bn(self.conv1(x)))))  # (n, 4, 2, 2)
        h = torch.tanh(self.token(h.flatten(2).transpose(1, 2)))  # (n, 4 tokens, 3)
        return self.head(torch.tanh(self.bn1(h.flatten(1))))


@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_norms_one_backward_path_matches_naive_loop(inplace):
    from lightning_mia.features import gradients

    model = HookLayers(inplace=inplace)
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    params = {n: p for n, p in model.eval().named_parameters()}
    assert gradients._hook_plan(model, params) is not None  # every layer kind is supported
    feat = GradientNorms(per_layer=True, chunk_size=4)
    got = feat.extract(model, x, y).double().numpy()
    _assert_stats_close(got, _naive_gradient_stats(model, x, y, per_layer=True))
    if not inplace:  # the vmap path gives the same values
        vmap = GradientNorms(per_layer=True, chunk_size=4)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gradients, "_hook_plan", lambda *args: None)
            ref = vmap.extract(model, x, y).double().numpy()
        _assert_stats_close(got, ref)


def test_conv_weight_gradients_in_sample_chunks_match_naive_loop(monkeypatch):
    from lightning_mia.features import gradients

    monkeypatch.setattr(gradients, "_GROUPED_CHANNELS", 5)  # HookLayers' 4-channel convs: one sample per grouped conv
    model = HookLayers(inplace=False).eval()
    x, y = torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    got = GradientNorms(per_layer=True).extract(model, x, y).double().numpy()
    _assert_stats_close(got, _naive_gradient_stats(model, x, y, per_layer=True))


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_moment_merging_matches_scipy_on_the_concatenation(offset):
    rng = np.random.default_rng(0)
    parts = [rng.standard_t(3, size=(4, n)) * s + offset * s for n, s in [(5, 1.0), (300, 0.01), (1, 7.0),
                                                                          (40, 1e-4)]]
    merged = None
    for part in parts:
        m = moments(torch.tensor(part, dtype=torch.float64))
        merged = m if merged is None else merge_moments(merged, m)
    got = finalize_moments(merged).numpy()
    ref = np.array([_scipy_stats(row) for row in np.concatenate(parts, axis=1)])
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_pooled_small_tensors_match_scipy_on_the_concatenation(per_tensor):
    from lightning_mia.features.gradients import _Pooled

    rng = np.random.default_rng(1)
    widths = [3, 50, 2, 700, 20, 9]  # with small=64 x 4 rows: some pooled together, 700 reduced alone
    parts = [rng.standard_t(4, size=(4, n)) * (0.1 + i) for i, n in enumerate(widths)]
    pooled = _Pooled(per_tensor=per_tensor, small=256)
    for part in parts[:-1]:
        pooled.add(torch.tensor(part, dtype=torch.float64).reshape(4, -1, 1))  # any trailing shape
    pooled.add_moments(moments(torch.tensor(parts[-1], dtype=torch.float64)))
    total, each = pooled.result()
    ref = np.array([_scipy_stats(row) for row in np.concatenate(parts, axis=1)])
    np.testing.assert_allclose(total.numpy(), ref, rtol=1e-8, atol=1e-12)
    assert len(each) == (len(parts) if per_tensor else 0)
    for part, got in zip(parts, each):
        np.testing.assert_allclose(got.numpy(), np.array([_scipy_stats(row) for row in part]), rtol=1e-8)


def test_zero_variance_gradient_gives_zero_skew_and_kurtosis():
    m = moments(torch.zeros(2, 10))
    out = finalize_moments(m).numpy()
    np.testing.assert_array_equal(out, np.zeros((2, 7)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(stats.skew(np.zeros(10)))  # scipy's NaN, replaced by 0 (documented)


# ------------------------------------------------------------------------------------- boundary distance
def _two_class(seed=0, dim=5):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(2, dim)), rng.normal(size=2) * 0.1
    x = rng.normal(size=(12, dim)) * 0.3
    z = x @ w.T + b
    dw, db = w[1] - w[0], b[1] - b[0]
    dist = np.abs(x @ dw + db) / np.linalg.norm(dw)
    keep = (dist > 0.01) & (dist < 2.0)  # within the paper preset's reach (8000 steps of 0.001)
    return linear_model(w, b), torch.tensor(x[keep], dtype=torch.float32), dist[keep], z


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_boundary_distance_two_class_linear_equals_analytic(preset):
    model, x, analytic, _ = _two_class()
    feat = BoundaryDistance(preset=preset, clamp=None)
    got = feat.extract(model, x, None)
    assert got.shape == (len(x), 1) and got.dtype == torch.float32 and feat.last_failures == 0
    np.testing.assert_allclose(got[:, 0].numpy(), analytic, rtol=1e-3, atol=1e-3)


def test_boundary_distance_multiclass_linear():
    rng = np.random.default_rng(1)
    dim = 6
    w = rng.normal(size=(4, dim))
    # Classes 2 and 3 are out of play (bias -60: probability ~1e-26), so the gradient path is the straight
    # line to the 0/1 hyperplane and the analytic distance is |(w0 - w1) x + b0 - b1| / ||w0 - w1||.
    b = np.array([0.0, 0.1, -60.0, -60.0])
    x = rng.normal(size=(10, dim)) * 0.3
    dw = w[0] - w[1]
    analytic = np.abs(x @ dw + b[0] - b[1]) / np.linalg.norm(dw)
    model = linear_model(w, b)
    got = BoundaryDistance().extract(model, torch.tensor(x, dtype=torch.float32), None)[:, 0].numpy()
    np.testing.assert_allclose(got, analytic, rtol=1e-3, atol=1e-3)

    # General multi-class: the walk ends on a boundary of the predicted class's region, never closer than
    # the nearest one (min over classes of the analytic distances).
    w = rng.normal(size=(5, dim))
    b = rng.normal(size=5) * 0.2
    model = linear_model(w, b)
    xt = torch.tensor(rng.normal(size=(10, dim)), dtype=torch.float32)
    got = BoundaryDistance().extract(model, xt, None)[:, 0].numpy()
    z = xt.double().numpy() @ w.T + b
    c = z.argmax(1)
    nearest = np.array([min((z[i, c[i]] - z[i, j]) / np.linalg.norm(w[c[i]] - w[j])
                            for j in range(5) if j != c[i]) for i in range(len(z))])
    assert np.all(got >= nearest - 1e-3)
    assert np.all(np.isfinite(got))


def test_boundary_batched_equals_per_sample_loop_and_presets_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(24, 3) * 0.5
    fast = BoundaryDistance(clamp=None)
    batched = fast.extract(model, x, None)[:, 0]
    assert torch.isfinite(batched).all()
    loop = torch.cat([fast.extract(model, x[i:i + 1], None)[:, 0] for i in range(8)])
    np.testing.assert_allclose(batched[:8].numpy(), loop.numpy(), rtol=1e-4, atol=1e-5)
    # The paper preset walks 0.001 per step: compare on the samples closest to the boundary to stay fast.
    near = torch.argsort(batched)[:6]
    paper = BoundaryDistance(preset="paper", clamp=None).extract(model, x[near], None)[:, 0]
    assert torch.isfinite(paper).all()
    # Same gradient path at a coarser resolution: equal up to curvature over one coarse step.
    np.testing.assert_allclose(batched[near].numpy(), paper.numpy(), rtol=0.03, atol=2e-3)


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_boundary_refilled_working_set_equals_one_batch(preset):
    # max_rows=3 walks 3 samples at a time and refills slots as samples finish (walks of different lengths,
    # gradients refreshed at different steps per slot with the paper preset's grad_every=10).
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(40, 3) * 0.5
    one = BoundaryDistance(preset=preset, clamp=None, max_rows=64).extract(model, x, None)[:, 0]
    if preset == "paper":  # keep the 0.001-step walks short
        x = x[torch.argsort(one)[:10]]
        one = BoundaryDistance(preset=preset, clamp=None, max_rows=64).extract(model, x, None)[:, 0]
    assert torch.isfinite(one).all()
    refilled = BoundaryDistance(preset=preset, clamp=None, max_rows=3).extract(model, x, None)[:, 0]
    np.testing.assert_allclose(refilled.numpy(), one.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_rows"):
        BoundaryDistance(max_rows=0)


def test_boundary_saturated_softmax_and_linf_direction():
    # Logit margins of 30-50: the float32 softmax is exactly one-hot and the float32 gradient of the squared
    # loss vanishes; the direction must still be found (float64 softmax gradient, rescaled per sample).
    w = np.array([[30.0, 0.0], [-30.0, 0.0]])
    model = linear_model(w, [0.0, 0.0])
    x = torch.tensor([[0.8, 0.3], [-0.5, 0.1]])
    with torch.no_grad():
        assert torch.equal(torch.softmax(model(x), 1).max(1).values, torch.ones(2))
    got = BoundaryDistance(clamp=None).extract(model, x, None)[:, 0].numpy()
    np.testing.assert_allclose(got, [0.8, 0.5], atol=1e-3)
    # Sign steps (the authors' released code): the gradient has no x_1 component, sign(0) = 0, so the walk is
    # the same straight line here.
    got = BoundaryDistance(clamp=None, norm="linf").extract(model, x, None)[:, 0].numpy()
    np.testing.assert_allclose(got, [0.8, 0.5], atol=1e-3)
    # With both coordinates active, sign steps move diagonally: from (0.3, 0.1) to the line x_0 + x_1 = 0
    # along (-1, -1) takes 0.2 per coordinate, an L2 distance of sqrt(2) * 0.2.
    model = linear_model(np.array([[1.0, 1.0], [-1.0, -1.0]]), [0.0, 0.0])
    got = BoundaryDistance(clamp=None, norm="linf").extract(model, torch.tensor([[0.3, 0.1]]), None)
    assert got.item() == pytest.approx(math.sqrt(2) * 0.2, abs=2e-3)


def test_boundary_failures_are_nan_counted_and_warned():
    model = linear_model(np.array([[1.0, 0.0], [-1.0, 0.0]]), [0.0, 0.0])  # boundary at x_0 = 0
    x = torch.tensor([[0.5, 0.5], [0.002, 0.5]])
    feat = BoundaryDistance(preset="paper", clamp=None, max_steps=100)  # walks at most 0.1
    with pytest.warns(UserWarning, match="1 of 2 samples"):
        got = feat.extract(model, x, None)[:, 0].numpy()
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.002, abs=1e-3) and feat.last_failures == 1
    # Boundary at x_0 = 1.5, outside the clip range [0, 1]: the sample gets stuck against the range and fails
    # at once instead of walking max_steps.
    model2 = linear_model(np.array([[-1.0, 0.0], [1.0, 0.0]]), [1.5, -1.5])
    feat2 = BoundaryDistance(clamp=(0.0, 1.0))
    with pytest.warns(UserWarning, match="did not reach"):
        out = feat2.extract(model2, torch.tensor([[0.5, 0.5]]), None)
    assert torch.isnan(out).all() and feat2.last_failures == 1 and feat2.total_failures == 1
    # Inputs outside the clip range (e.g. normalised images with the paper's [0, 1]) are warned about; the
    # distance is still measured from the original input (boundary at x_0 = 0.5, first step clipped to 1).
    model3 = linear_model(np.array([[1.0, 0.0], [-1.0, 0.0]]), [-0.5, 0.5])
    with pytest.warns(UserWarning, match="outside clamp"):
        out = BoundaryDistance(preset="paper").extract(model3, torch.tensor([[2.0, 0.5]]), None)
    assert out.item() == pytest.approx(1.5, abs=2e-3)


def test_boundary_label_only_upper_bounds_and_approaches_analytic():
    model, x, analytic, _ = _two_class(seed=4, dim=2)
    feat = BoundaryDistance(label_only=True, n_directions=256, seed=0)
    assert not feat.requires_grad
    got = feat.extract(model, x, None)[:, 0].numpy()
    assert np.all(got >= analytic * (1 - 1e-4) - 1e-6)
    np.testing.assert_allclose(got, analytic, rtol=2e-3)  # 256 directions in 2-D: within ~0.7 degrees
    again = BoundaryDistance(label_only=True, n_directions=256, seed=0).extract(model, x[:3], None)[:, 0].numpy()
    np.testing.assert_allclose(again, got[:3], rtol=1e-6)  # seeded and independent of batching


def test_autograd_features_work_inside_inference_mode():
    # Lightning runs validation hooks under torch.inference_mode(); the gradient features must still work.
    model = tiny_cnn(seed=1).eval()
    linear, xl, analytic, _ = _two_class()
    with torch.no_grad():
        x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
        ref = GradientNorms().extract(model, x, y)
    with torch.inference_mode():
        xi, yi, xli = x.clone(), y.clone(), xl.clone()
        got = GradientNorms().extract(model, xi, yi, model(xi))
        dist = BoundaryDistance().extract(linear, xli, None)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6)
    np.testing.assert_allclose(dist[:, 0].numpy(), analytic, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ extract_features
def test_extract_features_over_datasets_restores_modes_and_flags():
    model = tiny_cnn()
    model.train()
    model.bn.eval()  # a deliberately frozen BatchNorm must stay in eval mode
    model.fc1.bias.requires_grad_(False)
    x, y = torch.randn(11, 2, 4, 4), torch.randint(0, 3, (11,))
    ds = TensorDataset(x, y, torch.arange(11))
    for spec in ["loss", {"name": "gradient_norms", "wrt": "input"}, {"name": "boundary_distance"},
                 {"name": "intermediate", "layers": [-1]}]:
        out = extract_features(model, spec, ds, batch_size=4)
        assert out.dtype == np.float32 and out.shape[0] == 11
        assert model.training and model.fc1.training and not model.bn.training
        assert not model.fc1.bias.requires_grad and model.fc1.weight.requires_grad
    # Same values from a (x, y) tensor pair, and eval-mode values (BatchNorm running statistics).
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y, reduction="none").numpy()
    model.train()
    np.testing.assert_allclose(extract_features(model, "loss", (x, y), batch_size=5)[:, 0], ref, rtol=1e-5)
    pool = extract_features(model, {"name": "intermediate", "layers": -2, "max_dims": 3}, (x, y),
                            postprocess=True)
    assert pool.shape == (11, 3)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, "loss", (x, y), batch_size=0)
