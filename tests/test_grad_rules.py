"""Per-sample gradient rules (lightning_mia/features/grad_rules.py) against the naive one-sample loop: for each
sample, ``zero_grad``, the loss of that sample alone, ``backward`` and ``.grad`` of every parameter; statistics
with numpy / scipy (the authors' ``return_norm_metrics``)."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from lightning_mia.features import GradientNorms, grad_rules, gradients


# ------------------------------------------------------------------------------------------- references
def _scipy_stats(g):
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    return [np.linalg.norm(g, 1), np.linalg.norm(g), np.abs(g).min(), np.abs(g).max(), np.mean(g),
            stats.skew(g), stats.kurtosis(g)]


def naive_grads(model, x, y):
    """{name: (n, *shape)} per-sample gradients, one sample at a time (unused parameters: zeros)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: [] for n, _ in named}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in named:
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            out[n].append(g.to_dense() if g.is_sparse else g.clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def naive_stats(model, x, y, per_layer=True):
    """Rows: 7 statistics of all weights, then (per_layer) of each parameter tensor."""
    grads = naive_grads(model, x, y)
    rows = []
    for i in range(len(x)):
        each = [grads[n][i].double().numpy().reshape(-1) for n in grads]
        row = _scipy_stats(np.concatenate(each))
        if per_layer:
            for g in each:
                row += _scipy_stats(g)
        rows.append(row)
    return np.array(rows), grads


def assert_stats_close(got, ref, tol=2e-5):
    """Each column within ``tol`` of its scale, plus 1e-6 of its block's largest ``|entry|`` (column "max") for
    the columns in gradient units: float32 batched vs. one-sample passes differ by rounding only, and a tiny
    min |g| or a mean that is zero in exact arithmetic (a linear weight's ``d (x) a`` with ``sum(d) = 0``) is
    rounding noise on both sides."""
    scale = np.abs(ref).max(axis=0) + 1e-12
    floor = np.zeros_like(scale)
    for k in (0, 1, 2, 3, 4):  # l1, l2, min, max, mean; not skew / kurtosis
        floor[k::7] = 1e-6 * np.abs(ref[:, 3::7]).max(axis=0)
    err = np.abs(got - ref) - tol * scale - floor
    bad = np.nonzero(np.nan_to_num(err, nan=0.0).max(axis=0) > 0)[0]
    assert len(bad) == 0, {f"block {j // 7} {j % 7}": (got[:, j], ref[:, j]) for j in bad}


def check_against_naive(model, x, y, kinds=None, per_layer=True, **kwargs):
    """GradientNorms(weights) == the naive loop; the plan's unit kinds are ``kinds`` (when given)."""
    model.eval()
    if kinds is not None:
        plan = grad_rules.make_plan(model, x[:1])
        assert {u.kind for u in plan.units} == set(kinds), [(u.path, u.kind) for u in plan.units]
    feat = GradientNorms(wrt="weights", per_layer=per_layer, **kwargs)
    got = feat.extract(model, x, y).double().numpy()
    ref, grads = naive_stats(model, x, y, per_layer=per_layer)
    assert_stats_close(got, ref)
    # The L2 norm of the whole per-sample gradient, tightly.
    l2 = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1).double().norm(dim=1).numpy()
    np.testing.assert_allclose(got[:, 1], l2, rtol=1e-5)
    return got


def _randomise_norms(model):
    # Non-trivial affine parameters and running statistics, so that no rule sees an identity.
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and isinstance(m, (nn.GroupNorm, nn.LayerNorm,
                                                                  nn.modules.instancenorm._InstanceNorm)):
                    p.uniform_(0.5, 1.5) if name == "weight" else p.uniform_(-0.3, 0.3)
    return model


# ------------------------------------------------------------------------------------------ layer rules
def _conv_models():
    return {
        "conv1d groups dilation same": lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2), nn.Tanh(),
            nn.Conv1d(6, 4, 4, stride=2, padding=1, bias=False), nn.Flatten(), nn.Linear(16, 3)),
        "conv1d even kernel same, reflect": lambda: nn.Sequential(
            nn.Conv1d(4, 4, 4, padding="same", groups=4), nn.Tanh(),
            nn.Conv1d(4, 3, 3, padding=2, padding_mode="reflect"), nn.Flatten(), nn.Linear(33, 3)),
        "conv1d valid circular": lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, padding="valid", bias=False), nn.Tanh(),
            nn.Conv1d(6, 3, 3, padding=1, padding_mode="circular", stride=3), nn.Flatten(), nn.Linear(9, 3)),
        "conv3d stride groups": lambda: nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1), groups=2), nn.Tanh(),
            nn.Conv3d(4, 2, 2, dilation=(1, 1, 2), bias=False), nn.Flatten(), nn.LazyLinear(3)),
        "conv3d same replicate": lambda: nn.Sequential(
            nn.Conv3d(2, 3, (3, 2, 3), padding="same", padding_mode="replicate"), nn.Tanh(), nn.Flatten(),
            nn.LazyLinear(3)),
        "conv2d same, strided reflect": lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding="same", dilation=2), nn.Tanh(),
            nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="reflect", groups=1, bias=False), nn.Flatten(),
            nn.LazyLinear(3)),
    }


_CONV_INPUTS = {"conv1d": (4, 9), "conv3d": (2, 4, 5, 4), "conv2d": (2, 6, 6)}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own forward
@pytest.mark.parametrize("name", list(_conv_models()))
def test_conv_rules_match_naive_loop(name):
    torch.manual_seed(0)
    model = _conv_models()[name]()
    x = torch.randn(5, *_CONV_INPUTS[name.split()[0]])
    model(x)  # materialise lazy layers
    check_against_naive(model, x, torch.randint(0, 3, (5,)), kinds={"conv", "linear"})


def _norm_models():
    # No bias right before a per-channel normalisation: its exact gradient is zero (rounding noise to compare).
    return {
        "groupnorm affine": (lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 3)),
            (2, 4, 4)),
        "groupnorm plain, 1d": (lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, bias=False), nn.GroupNorm(2, 4, affine=False), nn.GroupNorm(4, 4), nn.Flatten(),
            nn.Linear(16, 3)), (2, 6)),
        "instancenorm1d affine": (lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, bias=False), nn.InstanceNorm1d(4, affine=True), nn.Tanh(), nn.Flatten(),
            nn.Linear(16, 3)), (2, 6)),
        "instancenorm2d tracked": (lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True), nn.Tanh(),
            nn.InstanceNorm2d(3), nn.Flatten(), nn.Linear(48, 3)), (2, 4, 4)),
        "instancenorm3d": (lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2, bias=False), nn.InstanceNorm3d(3, affine=True), nn.Tanh(), nn.Flatten(),
            nn.Linear(3 * 27, 3)), (2, 4, 4, 4)),
        "layernorm tokens": (lambda: nn.Sequential(
            nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.LayerNorm(8, bias=False), nn.Flatten(),
            nn.Linear(32, 3)), (4, 5)),
        "layernorm 2-d shape, plain": (lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.LayerNorm([4, 4]),
            nn.LayerNorm([3, 4, 4], elementwise_affine=False), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)),
            (2, 4, 4)),
    }


@pytest.mark.parametrize("name", list(_norm_models()))
def test_norm_rules_match_naive_loop(name):
    torch.manual_seed(1)
    build, shape = _norm_models()[name]
    model = _randomise_norms(build())
    kinds = {"groupnorm": {"conv", "groupnorm", "linear"}, "instancenorm1d": {"conv", "instancenorm", "linear"},
             "instancenorm2d": {"conv", "instancenorm", "linear"}, "instancenorm3d": {"conv", "instancenorm", "linear"},
             "layernorm": {"linear", "layernorm"} if "tokens" in name else {"conv", "layernorm", "linear"}}
    check_against_naive(model, torch.randn(6, *shape), torch.randint(0, 3, (6,)), kinds=kinds[name.split()[0]])


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_rmsnorm_rule_matches_naive_loop():
    torch.manual_seed(2)
    model = _randomise_norms(nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Tanh(), nn.Flatten(),
                                           nn.Linear(32, 3)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    check_against_naive(model, torch.randn(5, 4, 5), torch.randint(0, 3, (5,)), kinds={"linear", "layernorm"})


class TokenBag(nn.Module):
    """Embedding on 2-d token grids (repeated tokens, padding), mean-pooled, then a linear head."""

    def __init__(self, **emb):
        super().__init__()
        self.embed = nn.Embedding(11, 4, **emb)
        self.head = nn.Linear(4, 3)

    def forward(self, t):
        return self.head(torch.tanh(self.embed(t)).flatten(1, -2).mean(dim=1))


@pytest.mark.parametrize("emb", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True, "padding_idx": 3},
                                 {"sparse": True}])
def test_embedding_rule_matches_naive_loop_and_stays_compact(emb):
    torch.manual_seed(3)
    model = TokenBag(**emb)
    t = torch.randint(0, 6, (6, 3, 5))  # few distinct tokens: repeats within a sample
    t[0] = 3  # one sample of a single repeated (padding, for one case) token
    got = check_against_naive(model, t, torch.randint(0, 3, (6,)), kinds={"embedding", "linear"})
    assert np.isfinite(got).all()
    # Only the sample's own tokens (at most 15 rows of 4) are formed; the other rows count as zeros.
    plan = grad_rules.make_plan(model.eval(), t[:1])
    assert plan.sizes["embed.weight"] == 11 * 4  # min(15 tokens, 11 rows) x dim
    _, grads = grad_rules.batched_pass(model, plan, t, lambda o: F.cross_entropy(o, torch.zeros(6).long(),
                                                                                 reduction="sum"))
    g = grads.pop("embed.weight")
    assert isinstance(g, grad_rules.Compact) and g.values.shape == (6, 11 * 4) and g.zeros == 0


def test_embedding_with_long_vocabulary_forms_only_token_rows():
    torch.manual_seed(4)
    model = TokenBag()
    model.embed = nn.Embedding(5000, 4)
    t = torch.randint(0, 5000, (4, 2, 3))
    check_against_naive(model, t, torch.randint(0, 3, (4,)), kinds={"embedding", "linear"})
    plan = grad_rules.make_plan(model.eval(), t[:1])
    assert plan.sizes["embed.weight"] == 6 * 4  # 6 tokens per sample, not 5000 rows


class Attention(nn.Module):
    """A MultiheadAttention layer on token features with masks and keyword arguments."""

    def __init__(self, masks, **mha):
        super().__init__()
        self.masks = masks
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **mha)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        kw = {}
        if "key_padding" in self.masks:
            kw["key_padding_mask"] = x[..., 0] > 1.0  # data-dependent, per sample
        if "causal" in self.masks:
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            kw["is_causal"] = True
        if "bool" in self.masks:
            kw["attn_mask"] = torch.eye(x.shape[1], dtype=torch.bool)
        if "kv" in self.masks:  # cross-attention on other features (kdim / vdim)
            out, _ = self.attn(h, x[..., :2] * 2, x, **kw)
        elif "weights" in self.masks:  # the attention weights reach the loss too: the rule defers to the replay
            out, w = self.attn(h, h, h, **kw)
            return self.head(out.mean(dim=1)) + w.amax(dim=2)[:, :3]
        else:
            out = self.attn(h, h, h, **kw)[0]  # need_weights=True by default: the weights output is unused
        return self.head(out.mean(dim=1))


@pytest.mark.parametrize("masks,mha", [("", {}), ("key_padding", {"bias": False}), ("causal", {}),
                                       ("bool", {"add_zero_attn": True}), ("kv", {"kdim": 2, "vdim": 3}),
                                       ("weights", {})])
def test_multihead_attention_rule_matches_naive_loop(masks, mha, replay_log):
    torch.manual_seed(5)
    model = Attention(masks, **mha)
    x = torch.randn(5, 4, 3)
    x[:, 0, 0] = 0.0  # no row fully masked
    check_against_naive(model, x, torch.randint(0, 3, (5,)), kinds={"linear", "mha"})
    assert [t for t, _ in replay_log] == (["MultiheadAttention"] if masks == "weights" else [])


# ------------------------------------------------------------------------- per-layer fallback (replay)
class Scale(nn.Module):
    """A parameterised layer no rule knows."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, c))

    def forward(self, x):
        return torch.tanh(x * self.gain.view(1, -1, 1, 1)) + self.shift.view(1, -1, 1, 1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(1, 4)
        self.scale = Scale(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = self.scale(self.gn(self.conv(x)))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


@pytest.fixture
def replay_log(monkeypatch):
    seen = []
    original = grad_rules.replay_grads

    def logged(mod, call, gouts, names, batched):
        seen.append((type(mod).__name__, tuple(names)))
        return original(mod, call, gouts, names, batched)

    monkeypatch.setattr(grad_rules, "replay_grads", logged)
    return seen


def test_unknown_layer_is_replayed_alone_and_the_rest_keeps_its_rules(replay_log):
    torch.manual_seed(6)
    model = _randomise_norms(Mixed())
    x, y = torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    plan = grad_rules.make_plan(model.eval(), x[:1])
    assert {n: u.kind for n, u in plan.owner.items()} == {
        "conv.weight": "conv", "conv.bias": "conv", "gn.weight": "groupnorm", "gn.bias": "groupnorm",
        "scale.gain": "replay", "scale.shift": "replay", "conv2.weight": "conv", "conv2.bias": "conv",
        "fc.weight": "linear", "fc.bias": "linear"}
    check_against_naive(model, x, y, chunk_size=3)  # chunks of 3, 3, 1
    # vmap saw only the unknown layer's two parameters, once per chunk.
    assert replay_log == [("Scale", ("gain", "shift"))] * 3


class Tied(nn.Module):
    """Weight tying (the head reads the embedding table), a layer run twice and an unused layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.shared = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.unused = nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.zeros(9))

    def forward(self, t):
        h = self.norm(self.shared(torch.tanh(self.shared(self.embed(t))))).mean(dim=1)
        return F.linear(h, self.embed.weight, self.bias)  # logits over the 9 "tokens"


def test_tied_shared_and_unused_parameters_are_exact(replay_log):
    torch.manual_seed(7)
    model = _randomise_norms(Tied())
    t = torch.randint(0, 9, (6, 5))
    y = torch.randint(0, 9, (6,))
    plan = grad_rules.make_plan(model.eval(), t[:1])
    kinds = {n: u.kind for n, u in plan.owner.items()}
    # The tied table and the twice-run layer are used outside one call: the enclosing call is the model's.
    assert kinds == {"embed.weight": "replay", "shared.weight": "replay", "shared.bias": "replay",
                     "norm.weight": "layernorm", "norm.bias": "layernorm", "bias": "replay"}
    assert plan.unused == ["unused.weight", "unused.bias"]
    check_against_naive(model, t, y)
    assert replay_log == [("Tied", ("bias", "embed.weight", "shared.weight", "shared.bias"))]


def test_rule_layer_with_a_user_hook_is_replayed(replay_log):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    handle = model[0].register_forward_hook(lambda m, a, out: out * 2.0)  # changes the layer's output
    try:
        check_against_naive(model, torch.randn(5, 4), torch.randint(0, 3, (5,)))
        assert replay_log == [("Linear", ("weight", "bias"))]  # the hooked layer only
    finally:
        handle.remove()


# --------------------------------------------------------------------------------- transformer on tokens
class TextClassifier(nn.Module):
    """Embedding -> 2 TransformerEncoderLayers (MultiheadAttention, LayerNorm) -> mean-pool -> Linear."""

    def __init__(self, vocab=30, dim=16, heads=4, classes=3, pad_mask=False):
        super().__init__()
        self.pad_mask = pad_mask
        self.embed = nn.Embedding(vocab, dim, padding_idx=0 if pad_mask else None)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
                                     for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, t):
        h = self.embed(t)
        mask = (t == 0) if self.pad_mask else None
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=mask)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("pad_mask", [False, True])
def test_transformer_text_classifier_on_token_ids(pad_mask, replay_log):
    torch.manual_seed(9)
    model = _randomise_norms(TextClassifier(pad_mask=pad_mask))
    t = torch.randint(1, 30, (6, 7))
    t[:, -2:] = 0 if pad_mask else t[:, -2:]  # padded tail
    y = torch.randint(0, 3, (6,))
    check_against_naive(model, t, y, kinds={"embedding", "mha", "linear", "layernorm"}, chunk_size=4)
    assert replay_log == []  # every layer has its rule
    with pytest.raises(ValueError, match="floating-point tensor input"):
        GradientNorms().extract(model, t, y)  # dL/dx of token ids


def test_whole_model_vmap_fallback_takes_token_inputs(monkeypatch):
    torch.manual_seed(10)
    model = TextClassifier(dim=8, heads=2)
    t, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    fast = GradientNorms(wrt="weights", per_layer=True).extract(model, t, y).double().numpy()
    monkeypatch.setattr(gradients, "_hook_plan", lambda *args: None)
    slow = GradientNorms(wrt="weights", per_layer=True).extract(model, t, y).double().numpy()
    assert_stats_close(fast, slow, tol=5e-5)


def test_input_statistics_on_float_inputs_need_no_change():
    # wrt=["weights", "input"] on a float input keeps both blocks, in wrt order.
    torch.manual_seed(11)
    model = _randomise_norms(Mixed()).eval()
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    both = GradientNorms(wrt=["input", "weights"]).extract(model, x, y).double().numpy()
    xi = x.clone().requires_grad_(True)
    gx = torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), xi)[0]
    ref = np.array([_scipy_stats(g) for g in gx.double().numpy()])
    assert_stats_close(both[:, :7], ref)
    w_only = GradientNorms(wrt="weights").extract(model, x, y).double().numpy()
    np.testing.assert_allclose(both[:, 7:], w_only, rtol=1e-6, atol=1e-9)


def test_sample_mixing_batchnorm_goes_to_the_whole_model_fallback():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False),
                          nn.Flatten(), nn.Linear(27, 3)).eval()
    params = {n: p for n, p in model.named_parameters()}
    assert gradients._hook_plan(model, params) is None
    x, y = torch.randn(5, 2, 3, 3), torch.randint(0, 3, (5,))
    got = GradientNorms(wrt="weights").extract(model, x, y).double().numpy()
    # Per-sample loss of each sample alone (its BatchNorm normalises over that one sample) ...
    ref = np.array([_scipy_stats(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()), allow_unused=True)
        if g is not None]).double().numpy()) for i in range(5)])
    assert_stats_close(got, ref, tol=1e-4)


def test_docstring_examples():
    result = doctest.testmod(grad_rules)
    assert result.failed == 0 and result.attempted > 0
