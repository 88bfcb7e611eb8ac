"""ReferenceEnsemble: the vectorised and looped paths against K plain PyTorch training loops, path selection, the
IN mask, checkpoints, logits and schedules."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_mia.data import IndexedTensorDataset
from lightning_mia.module import ImageClassifier
from lightning_mia.reference import ReferenceEnsemble, default_in_mask

N, C, B, K = 48, 3, 8, 3
# the three ways of training: stacked parameters + one optimizer (forward by vmap, or by K functional_calls on
# slices of the stacked tensors), and K ordinary modules with K optimizers
PATHS = {"vmap": dict(vectorize="always", stacked_forward="vmap"),
         "sequential": dict(vectorize="always", stacked_forward="sequential"),
         "looped": dict(vectorize="never")}


def population(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % C
    x[:, 0, 0, :3] += 2.0 * F.one_hot(y, C).float()  # some signal, so training moves the weights
    return TensorDataset(x, y, torch.arange(n))


class MLP(pl.LightningModule):
    """A small LightningModule with the target's interface: hyper-parameters, configure_optimizers."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, dropout: float = 0.0, batchnorm: bool = False,
                 scheduler: str = "none") -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Flatten(), nn.Linear(64, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, C)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = make_optimizer(self.hparams.optimizer, self.parameters(), self.hparams.lr)
        if self.hparams.scheduler == "step":
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"}}
        if self.hparams.scheduler == "per_step":
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), "interval": "step"}}
        return opt


def make_optimizer(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-3, nesterov=True)
    if name == "sgd_plain":
        return torch.optim.SGD(params, lr=lr, momentum=0.5, weight_decay=1e-2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.99), weight_decay=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1, amsgrad=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.5, centered=True, weight_decay=1e-3)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    raise ValueError(name)


def plain_loops(ens: ReferenceEnsemble, initial: dict, make_model, make_opt, pop: TensorDataset, epochs: int):
    """K independent, ordinary training loops: each reference's initial weights, its batches (epoch_order), its
    own optimizer written here; returns the final state dicts by k."""
    x_all, y_all = pop.tensors[0], pop.tensors[1]
    out = {}
    for entry in initial["references"]:
        k = entry["k"]
        model = make_model()
        model.load_state_dict(entry["model"])
        model.train()
        opt = make_opt(model.parameters())
        for epoch in range(epochs):
            order = ens.epoch_order(k, epoch)
            for s in range(math.ceil(len(order) / ens.batch_size)):
                idx = torch.as_tensor(order[s * ens.batch_size:(s + 1) * ens.batch_size])
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out[k] = model.state_dict()
    return out


def weights(ens: ReferenceEnsemble) -> dict:
    return {r["k"]: r["model"] for r in ens.state_dict()["references"]}


def assert_weights_close(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        for name in a[k]:
            torch.testing.assert_close(a[k][name], b[k][name], atol=atol, rtol=rtol, msg=f"reference {k}, {name}")


ELEMENTWISE = ["sgd", "sgd_plain", "adam", "adamw", "rmsprop", "adamax", "nadam", "radam", "adadelta"]


@pytest.mark.parametrize("optimizer,forward", [(o, "vmap") for o in ELEMENTWISE]
                         + [(o, "sequential") for o in ("sgd", "adam", "rmsprop")])
def test_vectorised_equals_separate_plain_loops_mlp(optimizer, forward):
    pop = population()
    lr = 0.05 if optimizer.startswith("sgd") else (1.0 if optimizer == "adadelta" else 0.01)
    template = MLP(optimizer=optimizer, lr=lr)
    ens = ReferenceEnsemble(template, count=K, seed=3, vectorize="always", batch_size=B, stacked_forward=forward)
    ens.setup(pop)
    assert ens.vectorized and ens.fallback_reason == "" and ens.stacked_forward == forward
    initial = ens.state_dict()
    for epoch in range(2):
        ens.train_epoch(epoch)
    expected = plain_loops(ens, initial, lambda: MLP(optimizer=optimizer, lr=lr),
                           lambda params: make_optimizer(optimizer, params, lr), pop, 2)
    assert_weights_close(weights(ens), expected)
    # it trained: weights moved away from the initial ones
    first = initial["references"][0]["model"]["net.1.weight"]
    assert (weights(ens)[0]["net.1.weight"] - first).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("vectorize,forward", [("always", "vmap"), ("always", "sequential"), ("never", "auto")])
def test_both_paths_equal_plain_loops_lenet(optimizer, vectorize, forward):
    pop = population()
    lr = 0.05 if optimizer == "sgd" else 1e-2
    kwargs = dict(num_classes=C, input_shape=(1, 8, 8), optimizer=optimizer, lr=lr, momentum=0.9,
                  weight_decay=5e-3 if optimizer == "sgd" else 1e-3, nesterov=optimizer == "sgd", betas=(0.5, 0.99))
    template = ImageClassifier("lenet", **kwargs)
    ens = ReferenceEnsemble(template, count=K, seed=1, vectorize=vectorize, batch_size=B, stacked_forward=forward)
    ens.setup(pop)
    assert ens.vectorized == (vectorize == "always")
    initial = ens.state_dict()
    for epoch in range(2):
        ens.train_epoch(epoch)

    def plain_opt(params):  # the ImageClassifier recipe, written out
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-3, nesterov=True)
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.99), weight_decay=1e-3)

    expected = plain_loops(ens, initial, lambda: ImageClassifier("lenet", **kwargs), plain_opt, pop, 2)
    assert_weights_close(weights(ens), expected)


@pytest.mark.parametrize("forward", ["vmap", "sequential"])
def test_vectorised_is_exact_in_float64(forward):
    """In float64 the rounding that float32 training amplifies vanishes: the stacked optimizer IS K optimizers."""
    pop = population()
    pop = TensorDataset(pop.tensors[0].double(), pop.tensors[1], pop.tensors[2])
    kwargs = dict(num_classes=C, input_shape=(1, 8, 8), optimizer="adam", lr=1e-2, betas=(0.5, 0.99))
    template = ImageClassifier("lenet", **kwargs).double()
    ens = ReferenceEnsemble(template, count=K, seed=4, vectorize="always", stacked_forward=forward, batch_size=B)
    ens.setup(pop)
    initial = ens.state_dict()
    assert initial["references"][0]["model"]["net.fc1.weight"].dtype == torch.float64  # the template's dtype
    for epoch in range(3):
        ens.train_epoch(epoch)
    expected = plain_loops(ens, initial, lambda: ImageClassifier("lenet", **kwargs).double(),
                           lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.99)), pop, 3)
    assert_weights_close(weights(ens), expected, atol=1e-12, rtol=1e-10)


def test_unequal_in_sets_cycle_and_both_paths_agree():
    pop = population()
    rng = np.random.default_rng(0)
    mask = np.zeros((K, N), dtype=bool)
    for k, size in enumerate((10, 30, 17)):
        mask[k, rng.choice(N, size, replace=False)] = True
    results = {}
    for vectorize, forward in (("always", "vmap"), ("always", "sequential"), ("never", "auto")):
        ens = ReferenceEnsemble(MLP(optimizer="adam", lr=0.01), count=K, seed=0, vectorize=vectorize, batch_size=B,
                                stacked_forward=forward)
        ens.setup(pop, in_mask=mask)
        order = ens.epoch_order(0, 0)
        assert len(order) == 30 and set(order) == set(np.flatnonzero(mask[0]))  # cycled to the largest set
        assert set(ens.epoch_order(1, 0)) == set(np.flatnonzero(mask[1])) and len(set(ens.epoch_order(1, 0))) == 30
        stats = ens.train_epoch(0)
        assert stats["steps"] == math.ceil(30 / B)
        results[forward] = weights(ens)
    assert_weights_close(results["vmap"], results["auto"])
    assert_weights_close(results["sequential"], results["auto"])


def test_batchnorm_model_falls_back_to_the_loop_and_trains():
    pop = population()
    template = MLP(optimizer="sgd", lr=0.1, batchnorm=True)
    ens = ReferenceEnsemble(template, count=2, batch_size=B)
    ens.setup(pop)
    assert not ens.vectorized
    assert "running statistics" in ens.fallback_reason and "net.2" in ens.fallback_reason
    before = weights(ens)
    losses = [ens.train_epoch(e)["train_loss"] for e in range(4)]
    after = weights(ens)
    assert losses[-1] < losses[0]
    assert not torch.equal(before[0]["net.2.running_mean"], after[0]["net.2.running_mean"])  # BN stats updated
    assert (after[0]["net.1.weight"] - before[0]["net.1.weight"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vectorize='always' is impossible.*running statistics"):
        ReferenceEnsemble(template, count=2, vectorize="always").setup(pop)


def test_resnet_and_non_elementwise_optimizer_take_the_loop():
    pop = population()
    resnet = ImageClassifier("resnet", model_kwargs={"depth": 8}, num_classes=C, input_shape=(1, 8, 8))
    ens = ReferenceEnsemble(resnet, count=2, batch_size=B)
    ens.setup(pop)
    assert not ens.vectorized and "running statistics" in ens.fallback_reason
    adagrad = MLP(optimizer="adagrad")
    ens = ReferenceEnsemble(adagrad, count=2, batch_size=B)
    ens.setup(pop)
    assert not ens.vectorized and "Adagrad is not known to be element-wise" in ens.fallback_reason
    with pytest.raises(ValueError, match="Adagrad"):
        ReferenceEnsemble(adagrad, count=2, vectorize="always").setup(pop)
    never = ReferenceEnsemble(MLP(), count=2, vectorize="never")
    never.setup(pop)
    assert not never.vectorized and never.fallback_reason == "vectorize='never'"


def test_default_in_mask_is_a_seeded_random_half_per_reference():
    count, n = 16, 4000
    mask = default_in_mask(count, n, seed=7)
    assert mask.dtype == bool and mask.shape == (count, n)
    assert (mask.sum(axis=1) == n // 2).all()  # each reference: a random half
    ins = mask.sum(axis=0)  # per item: Binomial(16, 1/2) -> mean 8, variance 4
    assert abs(ins.mean() - count / 2) < 0.01
    assert 3.5 < ins.var() < 4.5
    expected = np.array([math.comb(count, c) for c in range(count + 1)]) / 2**count
    observed = np.bincount(ins, minlength=count + 1) / n
    assert np.abs(observed - expected).max() < 0.02
    # reproducible, seed-dependent, and independent of which references an instance holds
    assert np.array_equal(default_in_mask(count, n, seed=7), mask)
    assert not np.array_equal(default_in_mask(count, n, seed=8), mask)
    pop = population()
    full = ReferenceEnsemble(MLP(), count=4, seed=7)
    full.setup(pop)
    shard = ReferenceEnsemble(MLP(), count=4, seed=7, indices=[1, 3])
    shard.setup(pop)
    assert np.array_equal(full.in_mask, default_in_mask(4, N, seed=7))
    assert np.array_equal(shard.in_mask, full.in_mask)


def test_shards_train_exactly_their_share_of_the_full_ensemble():
    pop = population()
    full = ReferenceEnsemble(MLP(optimizer="adam", lr=0.01), count=4, seed=2, batch_size=B)
    full.setup(pop)
    shard = ReferenceEnsemble(MLP(optimizer="adam", lr=0.01), count=4, seed=2, batch_size=B, indices=[3, 1])
    shard.setup(pop)
    for e in range(2):
        full.train_epoch(e)
        shard.train_epoch(e)
    w_full, w_shard = weights(full), weights(shard)
    assert_weights_close({k: w_full[k] for k in (1, 3)}, w_shard)
    logits_full, logits_shard = full.logits(pop, range(10)), shard.logits(pop, range(10))
    assert logits_shard.shape == (2, 10, C)
    torch.testing.assert_close(logits_shard, logits_full[[3, 1]], atol=1e-5, rtol=1e-4)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("save_path,load_path", [("vmap", "vmap"), ("sequential", "sequential"), ("looped", "looped"),
                                                 ("vmap", "looped"), ("looped", "sequential")])
def test_state_dict_roundtrip_resumes_exactly(save_path, load_path):
    pop = population()
    template = MLP(optimizer="adam", lr=0.01, scheduler="step")
    straight = ReferenceEnsemble(template, count=K, seed=5, batch_size=B, **PATHS[save_path])
    straight.setup(pop)
    for e in range(3):
        straight.train_epoch(e)

    first = ReferenceEnsemble(template, count=K, seed=5, batch_size=B, **PATHS[save_path])
    first.setup(pop)
    first.train_epoch(0)
    first.train_epoch(1)
    state = roundtrip(first.state_dict())
    assert state["in_mask"].dtype == torch.bool and state["epochs_trained"] == 2
    # resume into a fresh ensemble: state loaded before setup (as Lightning restores callbacks) ...
    resumed = ReferenceEnsemble(template, count=K, seed=999, batch_size=B, **PATHS[load_path])
    resumed.load_state_dict(state)
    resumed.setup(pop)
    assert resumed.seed == 5 and resumed.epochs_trained == 2 and np.array_equal(resumed.in_mask, first.in_mask)
    resumed.train_epoch()  # epoch 2
    assert_weights_close(weights(resumed), weights(straight))
    # ... or after setup
    late = ReferenceEnsemble(template, count=K, seed=5, batch_size=B, **PATHS[load_path])
    late.setup(pop)
    late.load_state_dict(state)
    late.train_epoch(2)
    assert_weights_close(weights(late), weights(straight))
    lrs = [g["lr"] for r in late.state_dict()["references"] for g in r["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([0.01 * 0.5**3] * K)


def test_state_rejects_a_foreign_or_incomplete_state():
    pop = population()
    ens = ReferenceEnsemble(MLP(), count=4, indices=[0, 1])
    ens.setup(pop)
    state = ens.state_dict()
    with pytest.raises(ValueError, match="lacks references \\[2\\]"):
        ReferenceEnsemble(MLP(), count=4, indices=[2]).load_state_dict(state)
    with pytest.raises(ValueError, match="count"):
        ReferenceEnsemble(MLP(), count=3).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        ReferenceEnsemble(MLP(), count=4).load_state_dict({"count": 4})


@pytest.mark.parametrize("path", sorted(PATHS))
def test_logits_shape_eval_mode_and_no_grad(path):
    pop = population()
    template = MLP(optimizer="adam", lr=0.01, dropout=0.5)
    ens = ReferenceEnsemble(template, count=K, seed=0, batch_size=B, **PATHS[path])
    ens.setup(pop)  # dropout is no obstacle to the vectorised path (vmap randomness="different")
    ens.train_epoch(0)
    out = ens.logits(pop, list(range(0, 20, 2)), batch_size=4)
    assert out.shape == (K, 10, C) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(ens.logits(pop, list(range(0, 20, 2))), out)  # dropout off: deterministic
    for k, sd in weights(ens).items():  # equal to the eval-mode forward of each reference on its own
        model = MLP(dropout=0.5)
        model.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(pop.tensors[0][0:20:2]), out[k], atol=1e-5, rtol=1e-4)
    assert ens.logits(pop, []).shape == (K, 0, C)
    # training mode is restored: the next epoch still uses dropout (loss differs from an eval-mode pass)
    if ens.vectorized:
        assert ens._base.training
    else:
        assert all(m.training for m in ens._models)


class AugmentedDataset(Dataset):
    """Items through __getitem__ with a random flip: the per-item path of the ensemble's data source."""

    def __init__(self, base: TensorDataset) -> None:
        self.base, self.calls = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.calls += 1
        x, y, idx = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y, idx


def test_generic_dataset_goes_through_getitem_and_global_rng_is_untouched():
    pop = AugmentedDataset(population())
    ens = ReferenceEnsemble(MLP(optimizer="adam", lr=0.01), count=2, batch_size=B)
    state = torch.get_rng_state()
    ens.setup(pop)
    ens.train_epoch(0)
    assert pop.calls >= 2 * (N // 2)
    assert torch.equal(torch.get_rng_state(), state)  # references train beside the target without moving its RNG
    # IndexedTensorDataset without a transform: indexed as tensors, same batches
    x, y, idx = population().tensors
    indexed = IndexedTensorDataset(x, y)
    a = ReferenceEnsemble(MLP(), count=2, batch_size=B)
    a.setup(indexed)
    b = ReferenceEnsemble(MLP(), count=2, batch_size=B)
    b.setup(population())
    a.train_epoch(0)
    b.train_epoch(0)
    assert_weights_close(weights(a), weights(b))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_epoch_and_step_schedulers_step(path):
    pop = population()
    ens = ReferenceEnsemble(MLP(optimizer="sgd", lr=0.1, scheduler="step"), count=2, batch_size=B, **PATHS[path])
    ens.setup(pop)
    for e in range(3):
        ens.train_epoch(e)
    for r in ens.state_dict()["references"]:
        assert r["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**3)
        assert r["scheduler"]["last_epoch"] == 3
    per_step = ReferenceEnsemble(MLP(optimizer="sgd", lr=0.1, scheduler="per_step"), count=2, batch_size=B,
                                 **PATHS[path])
    per_step.setup(pop)
    per_step.train_epoch(0)  # (N // 2) / B = 3 optimizer steps
    assert per_step.state_dict()["references"][0]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.9**3)


def test_image_classifier_cosine_schedule_sees_max_epochs():
    pop = population()
    template = ImageClassifier("lenet", num_classes=C, input_shape=(1, 8, 8), optimizer="sgd", lr=0.1,
                               scheduler="cosine")
    ens = ReferenceEnsemble(template, count=2, batch_size=B)
    ens.setup(pop, max_epochs=4)
    assert ens.vectorized
    lrs = []
    for e in range(4):
        ens.train_epoch(e)
        lrs.append(ens.state_dict()["references"][0]["optimizer"]["param_groups"][0]["lr"])
    assert ens.state_dict()["references"][0]["scheduler"]["T_max"] == 4
    expected = [0.1 * (1 + math.cos(math.pi * (e + 1) / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert template._trainer is None  # the stand-in trainer does not stay attached


def test_references_are_fresh_instances_seeded_per_reference():
    pop = population()
    template = ImageClassifier("lenet", num_classes=C, input_shape=(1, 8, 8), optimizer="adam", lr=1e-3)
    target_before = {n: p.detach().clone() for n, p in template.named_parameters()}
    a = ReferenceEnsemble(template, count=3, seed=0)
    a.setup(pop)
    b = ReferenceEnsemble(template, count=3, seed=0, vectorize="never")
    b.setup(pop)
    wa, wb = weights(a), weights(b)
    assert_weights_close(wa, wb, atol=0)  # same (seed, k): same initialisation in either path
    assert not torch.equal(wa[0]["net.fc1.weight"], wa[1]["net.fc1.weight"])
    assert not torch.equal(wa[0]["net.fc1.weight"], target_before["net.fc1.weight"])
    assert all(torch.equal(p, target_before[n]) for n, p in template.named_parameters())
    # a plain nn.Module: deep copy + reset_parameters, optimizer from the factory
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    ens = ReferenceEnsemble(plain, count=2, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    ens.setup(pop)
    w = weights(ens)
    assert not torch.equal(w[0]["1.weight"], w[1]["1.weight"])
    assert not torch.equal(w[0]["1.weight"], plain[1].weight)
    ens.train_epoch(0)
    with pytest.raises(ValueError, match="configure_optimizers"):
        ReferenceEnsemble(plain, count=2).setup(pop)


def test_hparams_bookkeeping_keys_are_not_passed_to_the_constructor():
    template = MLP(optimizer="adam", lr=0.01)
    template.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"  # as LightningCLI adds
    template.hparams["_class_path"] = "tests.MLP"
    ens = ReferenceEnsemble(template, count=2)
    ens.setup(population())
    assert ens.logits(population(), [0]).shape == (2, 1, C)


def test_lazily_built_template_needs_its_shapes():
    pop = population()
    lazy = ImageClassifier("lenet", optimizer="adam", lr=1e-3)
    with pytest.raises(ValueError, match="lazily"):
        ReferenceEnsemble(lazy, count=2).setup(pop)
    lazy.build_network(C, (1, 8, 8))  # what Lightning's setup does from the datamodule
    ens = ReferenceEnsemble(lazy, count=2)
    ens.setup(pop)
    assert ens.logits(pop, [0, 1]).shape == (2, 2, C)


def test_argument_checks():
    ens = ReferenceEnsemble(MLP(), count=2)
    ens.setup(population())
    assert ens.vectorized and ens.stacked_forward == "sequential"  # auto on a CPU
    with pytest.raises(ValueError, match="stacked_forward"):
        ReferenceEnsemble(MLP(), stacked_forward="parallel")
    with pytest.raises(ValueError, match="vectorize"):
        ReferenceEnsemble(MLP(), vectorize="sometimes")
    with pytest.raises(ValueError, match="count"):
        ReferenceEnsemble(MLP(), count=0)
    with pytest.raises(ValueError, match="indices"):
        ReferenceEnsemble(MLP(), count=2, indices=[0, 2])
    ens = ReferenceEnsemble(MLP(), count=2)
    with pytest.raises(RuntimeError, match="setup"):
        ens.train_epoch(0)
    with pytest.raises(ValueError, match="shape"):
        ens.setup(population(), in_mask=np.ones((3, N), bool))
