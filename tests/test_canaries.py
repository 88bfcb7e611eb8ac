"""Canaries for one-run auditing: seeded candidates and coins, who is trained on, what checkpoints carry."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from scipy.stats import binomtest

from lightning_mia.data import SyntheticDataModule
from lightning_mia.data.canaries import CanaryConfig, draw_canaries
from lightning_mia.module import ImageClassifier


def _dm(canaries, n_train=200, **kw):
    return SyntheticDataModule(input_shape=(1, 4, 4), num_classes=2, n_train=n_train, n_heldout=20, batch_size=32,
                               seed=5, canaries=canaries, **kw)


def _indices(ds):
    return set(int(i) for i in ds.indices)


@pytest.mark.parametrize("value,match", [
    ({"count": 0}, "canaries.count must be an integer >= 1"),
    ({"count": 2.5}, "canaries.count must be an integer >= 1"),
    ({"count": 5, "seed": -1}, "canaries.seed must be an integer >= 0 or None"),
    ({"count": 5, "seeds": 1}, r"unknown canaries option\(s\) \['seeds'\]"),
    ("5", "canaries must be None, a CanaryConfig or a mapping"),
])
def test_bad_options_are_rejected(value, match):
    with pytest.raises(ValueError, match=match):
        _dm(value)


def test_count_must_leave_ordinary_samples():
    with pytest.raises(ValueError, match="canaries.count=200 must be below the 200 samples"):
        _dm({"count": 200}).setup()


def test_same_seed_same_canaries_and_coins():
    a, b = _dm({"count": 50, "seed": 3}), _dm({"count": 50, "seed": 3})
    assert np.array_equal(a.canary_inclusion(), b.canary_inclusion())
    assert np.array_equal(a.canary_dataset().indices, b.canary_dataset().indices)
    other = _dm({"count": 50, "seed": 4})
    assert not np.array_equal(a.canary_inclusion(), other.canary_inclusion())
    # seed left None: the datamodule's seed
    assert np.array_equal(_dm({"count": 50}).canary_inclusion(), _dm({"count": 50, "seed": 5}).canary_inclusion())


def test_coins_are_fair_and_independent():
    _, inc = draw_canaries(100_000, CanaryConfig(count=20_000, seed=0), default_seed=0)
    assert binomtest(int(inc.sum()), inc.size, 0.5).pvalue > 1e-3
    # neighbouring coins agree about half the time (no serial dependence)
    assert binomtest(int((inc[1:] == inc[:-1]).sum()), inc.size - 1, 0.5).pvalue > 1e-3
    # one coin per seed, over many seeds: fair too
    firsts = [draw_canaries(50, CanaryConfig(count=1, seed=s), 0)[1][0] for s in range(2000)]
    assert binomtest(int(np.sum(firsts)), len(firsts), 0.5).pvalue > 1e-3


def test_excluded_canaries_are_not_trained_on():
    dm = _dm({"count": 60, "seed": 1}, augment=True)
    canaries, inc = dm.canary_dataset(), dm.canary_inclusion()
    assert len(canaries) == len(inc) == 60 and inc.dtype == bool and 0 < inc.sum() < 60
    idx = np.asarray(canaries.indices)
    included, excluded = set(idx[inc].tolist()), set(idx[~inc].tolist())
    train, members = _indices(dm.train_dataset()), _indices(dm.member_dataset())
    assert included <= train and not excluded & train
    assert not (included | excluded) & members  # canaries stay out of the member/non-member audit pool
    assert train == members | included and len(members) == 200 - 60
    seen = set()
    for _, _, i in dm.train_dataloader():  # what one training epoch actually visits
        seen |= set(i.tolist())
    assert seen == train
    # the canaries are the stored images (no augmentation), with their index in the full split
    x, _, i = canaries[0]
    torch.testing.assert_close(x, dm._load_splits()[0][int(i)][0])
    torch.testing.assert_close(canaries[0][0], canaries[0][0])


def test_canaries_are_drawn_inside_train_subset():
    dm = _dm({"count": 20}, train_subset=100)
    subset = _indices(dm._apply_subset(dm._load_splits()[0], 100, "train_subset", "train", 1))
    assert _indices(dm.canary_dataset()) <= subset
    assert _indices(dm.train_dataset()) | _indices(dm.canary_dataset()) == subset


def test_without_canaries_nothing_changes():
    dm = _dm(None)
    assert _indices(dm.train_dataset()) == _indices(dm.member_dataset()) == set(range(200))
    assert dm.hparams["canaries"] is None
    with pytest.raises(ValueError, match=r"no canaries: pass canaries=\{'count': m\}"):
        dm.canary_inclusion()


def test_checkpoint_carries_the_option_as_plain_types(tmp_path):
    dm = _dm(CanaryConfig(count=10, seed=2))
    assert dm.canaries == CanaryConfig(count=10, seed=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[ModelCheckpoint(dirpath=str(tmp_path), save_last=True)])
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-3), datamodule=dm)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["canaries"] == {"count": 10, "seed": 2}
    rebuilt = SyntheticDataModule(**ckpt["datamodule_hyper_parameters"])
    assert np.array_equal(rebuilt.canary_inclusion(), dm.canary_inclusion())


@pytest.mark.parametrize("module", ["lightning_mia.data.canaries", "lightning_mia.data.base"])
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
