"""DP-SGD training of ImageClassifier with Opacus: options, clipping, accounting, resume, configs.

The epsilon checks recompute the budget independently: with Opacus's own accountants fed the (noise multiplier,
sample rate, steps) history the run should have had, and, for full-batch training (sample rate 1), with the
closed-form Renyi DP of the Gaussian mechanism, alpha / (2 sigma^2) per step (Mironov, "Renyi Differential
Privacy", CSF 2017, Proposition 7) converted to (epsilon, delta) as Balle et al. 2020 (arXiv:1905.09982,
Theorem 21) do.
"""
from __future__ import annotations

import copy
import doctest
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_mia.data import SyntheticDataModule
from lightning_mia.dp import DPConfig
from lightning_mia.module import ImageClassifier
from tests.helpers import scalars, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
OPACUS_REASON = "DP-SGD needs Opacus: pip install opacus (the dp extra)"


@pytest.fixture
def opacus():
    return pytest.importorskip("opacus", reason=OPACUS_REASON)


def _dm(n_train=64, batch_size=16, **kw):
    return SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=n_train, n_heldout=32,
                               batch_size=batch_size, seed=0, **kw)


def _model(lr=0.05, **dp):
    cfg = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    cfg.update(dp)
    return ImageClassifier("lenet", num_classes=3, input_shape=(1, 8, 8), optimizer="sgd", lr=lr, momentum=0.0,
                           dp=cfg)


def _trainer(max_epochs=2, **kw):
    args = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def _rdp_epsilon(history, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta=delta)


# --- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=-0.1), "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=math.inf), "noise_multiplier must be a finite number"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
    (dict(accountant="gdp"), r"accountant must be one of \['rdp', 'prv'\]"),
    (dict(delta=1.0), r"delta must be a number in \(0, 1\)"),
    (dict(poisson_sampling=1), "poisson_sampling must be True or False"),
    (dict(fix_modules="yes"), "fix_modules must be True or False"),
])
def test_dp_config_rejects_bad_values(kwargs, match):
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DPConfig(**args)


def test_dp_config_round_trips_through_plain_dicts():
    cfg = DPConfig(noise_multiplier=0.7, max_grad_norm=2, accountant="prv", delta=1e-6)
    assert DPConfig.coerce(cfg.to_dict()) == cfg and DPConfig.coerce(None) is None
    assert cfg.max_grad_norm == 2.0 and isinstance(cfg.max_grad_norm, float)
    assert DPConfig(noise_multiplier=1, max_grad_norm=1).resolve_delta(10_000) == pytest.approx(1e-5)
    assert cfg.resolve_delta(10) == 1e-6
    with pytest.raises(ValueError, match=r"unknown DP option\(s\) \['sigma'\]"):
        DPConfig.coerce({"sigma": 1.0, "max_grad_norm": 1.0})
    m = ImageClassifier("lenet", dp=cfg)
    assert m.dp == cfg and m.hparams.dp == cfg.to_dict()  # hyper-parameters hold plain types


def test_without_dp_nothing_changes():
    m = ImageClassifier("lenet", num_classes=3, input_shape=(1, 8, 8))
    loader = DataLoader(list(range(4)))
    assert m.dp is None and m.hparams.dp is None and m.dp_engine is None
    assert m.prepare_train_dataloader(loader) is loader and math.isnan(m.get_epsilon())


def test_missing_opacus_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    m = ImageClassifier("lenet", num_classes=3, input_shape=(1, 8, 8), dp=dp)  # building (or loading) needs none
    assert m(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="BatchNorm"):  # refused without Opacus too
        ImageClassifier("resnet", model_kwargs={"depth": 8}, num_classes=3, input_shape=(3, 8, 8), dp=dp)
    with pytest.raises(ImportError, match=r"pip install opacus .*lightning-mia\[dp\]"):
        _trainer(max_epochs=1).fit(m, datamodule=_dm())
    with pytest.raises(ImportError, match=r"pip install opacus"):
        ImageClassifier("resnet", model_kwargs={"depth": 8}, num_classes=3, input_shape=(3, 8, 8),
                        dp={**dp, "fix_modules": True})


def test_batchnorm_model_is_refused_with_the_fix(opacus):
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(ValueError, match=r"BatchNorm.*model: lenet.*fix_modules: true.*GroupNorm"):
        ImageClassifier("resnet", model_kwargs={"depth": 8}, num_classes=3, input_shape=(3, 8, 8), dp=dp)
    m = ImageClassifier("resnet", model_kwargs={"depth": 8}, num_classes=3, input_shape=(3, 8, 8),
                        dp={**dp, "fix_modules": True})
    kinds = {type(mod).__name__ for mod in m.net.modules()}
    assert "GroupNorm" in kinds and not any(k.startswith("BatchNorm") for k in kinds)
    assert m(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


# --- training ----------------------------------------------------------------------------------------------
def test_dp_training_logs_finite_increasing_epsilon(opacus, tmp_path):
    from opacus.data_loader import DPDataLoader

    from lightning_mia.callbacks import MembershipInferenceMonitor

    # the monitor's torch.func gradient features run on the same network between private steps
    monitor = MembershipInferenceMonitor(features=["loss", "gradient_norms"], attacks=["threshold"], verbose=False,
                                         report_at_end=False)
    dm, model = _dm(), _model()
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=2)
    trainer.fit(model, datamodule=dm)

    assert isinstance(trainer.train_dataloader, DPDataLoader)  # Poisson sampling, asked of the datamodule
    eps = model.epsilon_history
    assert len(eps) == 2 and all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(set(eps))
    logged = scalars(tmp_path / "run" / "version_0")["privacy/epsilon"]
    assert [v for _, v in logged] == pytest.approx(eps, rel=1e-6)
    assert float(trainer.callback_metrics["privacy/epsilon"]) == pytest.approx(eps[-1], rel=1e-6)
    assert (tmp_path / "run" / "version_0" / "mia" / "history.csv").exists()
    # between steps the network is a plain module: no Opacus hooks left, state_dict keys unchanged
    assert all(not mod._forward_hooks and not mod._backward_hooks for mod in model.net.modules())
    assert not any("_module" in k for k in model.state_dict())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_accountant_recomputed_from_the_run(opacus, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    dm, model = _dm(n_train=80, batch_size=16), _model(accountant=accountant, noise_multiplier=1.3)
    trainer = _trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    n = len(dm.train_dataset())
    steps_per_epoch = math.ceil(n / 16)  # Poisson batches: as many as the plain loader has
    q = 1.0 / steps_per_epoch
    delta = 1.0 / (10 * n)
    assert model.dp_engine.history == [[1.3, pytest.approx(q), 2 * steps_per_epoch]]
    for epoch, eps in enumerate(model.epsilon_history, start=1):
        acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        acc.history = [(1.3, q, epoch * steps_per_epoch)]
        assert eps == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-6)


def test_full_batch_epsilon_equals_closed_form_gaussian_rdp(opacus):
    from opacus.accountants import RDPAccountant

    sigma, epochs, n = 1.5, 3, 16
    dm = _dm(n_train=n, batch_size=n)
    model = _model(noise_multiplier=sigma, poisson_sampling=False, delta=1e-5)
    _trainer(max_epochs=epochs, limit_val_batches=0).fit(model, datamodule=dm)
    alphas = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    for t, eps in enumerate(model.epsilon_history, start=1):
        rdp = t * alphas / (2 * sigma**2)  # sample rate 1: t compositions of the Gaussian mechanism
        expected = np.min(rdp - (np.log(1e-5) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas))
        assert eps == pytest.approx(expected, rel=1e-9)


class _RecordStep(pl.Callback):
    """The first step's batch, the parameters before it, the gradient it applied and the update it made."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = [t.clone() for t in batch]
        self.before = copy.deepcopy(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # DPOptimizer leaves the privatised gradient in p.grad (the next zero_grad clears it)
        self.grad = torch.cat([p.grad.flatten() for p in pl_module.net.parameters()])
        self.update = torch.cat([(a.detach() - b).flatten() for a, b in zip(pl_module.net.parameters(),
                                                                             self.before.parameters())])


def _one_private_step(max_grad_norm, lr=0.1):
    rec = _RecordStep()
    model = _model(lr=lr, noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False)
    _trainer(max_steps=1, limit_val_batches=0, callbacks=[rec]).fit(model, datamodule=_dm(n_train=16, batch_size=16))
    x, y = rec.batch[0], rec.batch[1]
    assert x.shape[0] == 16  # the whole split: expected batch size = batch size
    per_sample = []
    for i in range(x.shape[0]):
        net = copy.deepcopy(rec.before)
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(rec.update, -lr * rec.grad, rtol=1e-3, atol=1e-7)  # plain SGD on that gradient
    return rec.grad, rec.update, torch.stack(per_sample)


def test_huge_clip_norm_and_no_noise_is_plain_sgd(opacus):
    grad, _, g = _one_private_step(max_grad_norm=1e6)
    torch.testing.assert_close(grad, g.mean(0), rtol=1e-4, atol=1e-7)


def test_small_clip_norm_clips_every_sample(opacus):
    c = 1e-3
    grad, update, g = _one_private_step(max_grad_norm=c)
    norms = g.norm(dim=1, keepdim=True)
    assert (norms > c).all()  # every sample is clipped: the test means something
    clipped = g * torch.clamp(c / (norms + 1e-6), max=1.0)  # Opacus's flat clipping factor (optimizer.py)
    torch.testing.assert_close(grad, clipped.mean(0), rtol=1e-4, atol=1e-10)
    assert grad.norm() <= c * (1 + 1e-5) < g.mean(0).norm()
    assert update.norm() < 0.1 * g.mean(0).norm() / 10  # the step shrank accordingly


def test_resume_with_weights_only_continues_epsilon(opacus, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = _model()
    dm = _dm(canaries={"count": 8})
    _trainer(max_epochs=1, limit_val_batches=0, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)]).fit(first, datamodule=dm)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)  # plain types and tensors only
    steps = math.ceil(len(dm.train_dataset()) / 16)
    assert len(first.epsilon_history) == 1
    assert ckpt["privacy"]["epsilon_history"] == pytest.approx(first.epsilon_history)
    assert ckpt["privacy"]["history"] == [[1.0, pytest.approx(1 / steps), steps]]
    assert ckpt["hyper_parameters"]["dp"]["noise_multiplier"] == 1.0
    assert ckpt["datamodule_hyper_parameters"]["canaries"] == {"count": 8, "seed": None}

    resumed = _model()
    trainer = _trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, datamodule=_dm(canaries={"count": 8}), ckpt_path=str(ckpt_dir / "last.ckpt"),
                weights_only=True)
    # fresh Poisson draws after the resume (the datamodule's generator alone would replay epoch 0's batches)
    assert trainer.train_dataloader.generator.initial_seed() != 0
    assert len(resumed.epsilon_history) == 2
    assert resumed.epsilon_history[:1] == pytest.approx(first.epsilon_history)
    assert resumed.dp_engine.steps == 2 * steps
    delta = 1 / (10 * len(dm.train_dataset()))
    assert resumed.epsilon_history[-1] == pytest.approx(_rdp_epsilon([(1.0, 1 / steps, 2 * steps)], delta), rel=1e-6)
    reloaded = ImageClassifier.load_from_checkpoint(str(ckpt_dir / "last.ckpt"), weights_only=True)
    assert reloaded.dp == first.dp and reloaded.epsilon_history == pytest.approx(first.epsilon_history)
    assert reloaded.get_epsilon() == pytest.approx(first.epsilon_history[-1])  # the saved delta and history


class _PlainDataModule(pl.LightningDataModule):
    """A datamodule that knows nothing of DP."""

    def __init__(self):
        super().__init__()
        self.inner = _dm()

    def train_dataloader(self):
        self.inner.setup()
        return DataLoader(self.inner.train_dataset(), batch_size=16, shuffle=True)


def test_poisson_sampling_needs_a_cooperating_loader(opacus):
    with pytest.raises(ValueError, match="prepare_train_dataloader"):
        _trainer(max_epochs=1).fit(_model(), datamodule=_PlainDataModule())
    model = _model(poisson_sampling=False)  # shuffled fixed-size batches, accounted as Opacus does
    _trainer(max_epochs=1).fit(model, datamodule=_PlainDataModule())
    assert len(model.epsilon_history) == 1 and model.dp_engine.sample_rate == pytest.approx(1 / 4)


def test_gradient_accumulation_is_refused(opacus):
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        _trainer(max_epochs=1, accumulate_grad_batches=2).fit(_model(), datamodule=_dm())


def test_dp_docstring_examples(opacus):
    import lightning_mia.dp as dp_module

    result = doctest.testmod(dp_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_module_docstring_examples():
    import lightning_mia.module as module

    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


# --- configs -----------------------------------------------------------------------------------------------
def test_dp_config_and_its_non_private_twin_differ_only_in_dp():
    private = yaml.safe_load((ROOT / "configs/dp/lenet_fashion_mnist_dpsgd.yaml").read_text())
    public = yaml.safe_load((ROOT / "configs/dp/lenet_fashion_mnist.yaml").read_text())
    dp = private["model"]["init_args"].pop("dp")
    assert DPConfig.coerce(dp).noise_multiplier > 0
    names = private["trainer"]["logger"]["init_args"].pop("name"), public["trainer"]["logger"]["init_args"].pop("name")
    assert names[0] != names[1]
    assert private == public
    assert public["data"]["init_args"]["canaries"]["count"] == 1000 and public["model"]["init_args"]["model"] == "lenet"
