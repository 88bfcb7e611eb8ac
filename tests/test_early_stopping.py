"""EarlyStoppingComparison / would_stop against Lightning's own EarlyStopping (the reference)."""
from __future__ import annotations

import json
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_mia.callbacks.early_stopping import (
    EarlyStoppingComparison,
    early_stopping_results,
    would_stop,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


# ---- reference: Lightning's EarlyStopping driven through its own check ----------------------------------------
def lightning_stop_epoch(values, patience, min_delta=0.0, mode="min", check_finite=True, dtype=torch.float32):
    """Epoch at which a real ``EarlyStopping`` sets ``trainer.should_stop`` on this sequence (None if never).

    ``_run_early_stopping_check`` is called on a minimal stand-in trainer holding the metric exactly as
    ``trainer.callback_metrics`` would (a 0-d tensor of ``dtype``)."""
    es = EarlyStopping(monitor="m", patience=patience, min_delta=min_delta, mode=mode, check_finite=check_finite)
    strategy = types.SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    for epoch, value in values:
        trainer = types.SimpleNamespace(callback_metrics={"m": torch.tensor(value, dtype=dtype)}, fast_dev_run=False,
                                        strategy=strategy, should_stop=False, current_epoch=epoch)
        es._run_early_stopping_check(trainer)
        if trainer.should_stop:
            return epoch
    return None


def _random_sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, 25))
        # Values on a 0.05 grid make ties and exact min_delta boundaries frequent.
        vals = np.round(rng.choice(np.arange(0.0, 1.0, 0.05), size=length) + rng.normal(0, 0.02, length) * (i % 2), 4)
        if i % 7 == 3:
            vals[rng.integers(0, length)] = np.nan
        if i % 11 == 5:
            vals[rng.integers(0, length)] = np.inf
        epochs = np.cumsum(rng.integers(1, 3, size=length)) if i % 3 == 0 else np.arange(length)
        out.append([(int(e), float(v)) for e, v in zip(epochs, vals)])
    return out


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("min_delta", [0.0, 0.05, 0.1])
@pytest.mark.parametrize("check_finite", [True, False])
def test_would_stop_matches_lightning_on_random_sequences(mode, min_delta, check_finite):
    for seq in _random_sequences(60, seed=int(min_delta * 100) + (mode == "max")):
        for patience in (0, 1, 2, 3, 5):
            expected = lightning_stop_epoch(seq, patience, min_delta, mode, check_finite)
            got = would_stop(seq, patience, min_delta=min_delta, mode=mode, check_finite=check_finite)
            assert got["stop_epoch"] == expected, (seq, patience)


def test_would_stop_compares_in_the_logged_dtype_like_lightning():
    # At an exact min_delta boundary, 0.13 + 0.1 < 0.23 holds in float32 but not in float64: a Python-float
    # replay would disagree with Lightning on a float32 metric (what ``self.log`` of a float gives).
    seq = [(0, 0.23), (1, 0.13)]
    results = {}
    for dtype in (torch.float32, torch.float64):
        results[dtype] = would_stop(seq, 1, min_delta=0.1, dtype=dtype)["stop_epoch"]
        assert results[dtype] == lightning_stop_epoch(seq, 1, min_delta=0.1, dtype=dtype)
    assert results[torch.float32] is None and results[torch.float64] == 1


def test_would_stop_hand_computed():
    # min mode, patience 2: best 0.8 at epoch 1; epochs 2 and 3 do not improve -> stop at 3.
    r = would_stop([1.0, 0.8, 0.9, 0.85, 0.1], patience=2)
    assert (r["stop_epoch"], r["best_epoch"], r["reason"]) == (3, 1, "patience")
    assert r["best_value"] == pytest.approx(0.8)
    # Pairs with gaps: validation every 5 epochs.
    assert would_stop([(4, 1.0), (9, 0.9), (14, 0.95)], patience=1)["stop_epoch"] == 14
    # Mapping input, max mode; NaN stops immediately with check_finite.
    assert would_stop({0: 0.1, 1: 0.2, 2: float("nan")}, patience=5, mode="max")["stop_epoch"] == 2
    assert would_stop({0: 0.1, 1: 0.2, 2: float("nan")}, patience=5, mode="max", check_finite=False)["stop_epoch"] \
        is None
    assert would_stop([], patience=3) == {"stop_epoch": None, "best_epoch": None, "best_value": None,
                                          "reason": None, "wait_count": 0, "n_checks": 0}
    with pytest.raises(ValueError, match="min.*max"):
        would_stop([1.0], patience=1, mode="avg")
    with pytest.raises(ValueError, match="patience"):
        would_stop([1.0], patience=-1)


def test_results_best_epoch_and_rules():
    r = early_stopping_results([(0, 1.0), (2, 0.5), (4, 0.5), (6, float("nan")), (8, 0.7)], patiences=[1, 3],
                               check_finite=False)
    assert r["best_epoch"] == 2 and r["best_value"] == 0.5  # first of ties, NaN ignored
    assert [(x["name"], x["stop_epoch"]) for x in r["rules"]] == [("es_patience_1", 4), ("es_patience_3", 8)]
    assert r["values"][3]["value"] is None  # strict JSON: NaN stored as null
    json.dumps(r, allow_nan=False)


# ---- a real Trainer logging a scripted validation metric -------------------------------------------------------
class Scripted(pl.LightningModule):
    """Logs ``seq[current_epoch]`` as the validation metric (one validation batch per epoch)."""

    def __init__(self, seq, name="val_loss"):
        super().__init__()
        self.seq, self.name = list(seq), name
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum() * 0.0

    def validation_step(self, batch, batch_idx):
        self.log(self.name, float(self.seq[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def _trainer(tmp_path, callbacks, max_epochs, **kwargs):
    kwargs.setdefault("logger", False)
    return pl.Trainer(default_root_dir=str(tmp_path), max_epochs=max_epochs, callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)


SEQUENCES = [
    # (values, patience, min_delta, mode)
    ([1.0, 0.9, 0.8, 0.85, 0.82, 0.81, 0.79, 0.9, 0.95, 1.0, 1.1, 1.2], 3, 0.0, "min"),
    ([1.0, 0.9, 0.85, 0.84, 0.83, 0.6, 0.59, 0.58, 0.7, 0.8], 2, 0.05, "min"),
    ([0.5, 0.6, 0.62, 0.7, 0.7, 0.71, 0.69, 0.72, 0.6], 2, 0.0, "max"),
    ([1.0, 0.9, float("nan"), 0.5, 0.4, 0.3], 5, 0.0, "min"),
]


@pytest.mark.parametrize("values,patience,min_delta,mode", SEQUENCES)
def test_callback_matches_real_early_stopping_in_a_trainer(tmp_path, values, patience, min_delta, mode):
    es = EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta, mode=mode)
    cmp = EarlyStoppingComparison(monitor="val_loss", patience=[patience, patience + 4], min_delta=min_delta,
                                  mode=mode, dirpath=str(tmp_path / "mia"))
    trainer = _trainer(tmp_path, [es, cmp], max_epochs=len(values))  # sanity check runs: must be skipped
    trainer.fit(Scripted(values))
    stopped = es.stopped_epoch if es.stopping_reason != EarlyStoppingReason.NOT_STOPPED else None
    res = cmp.results
    assert res["rules"][0]["stop_epoch"] == stopped
    assert would_stop(values, patience, min_delta=min_delta, mode=mode)["stop_epoch"] == stopped
    # One record per validation epoch, no sanity-check value, float32 values as logged.
    last = trainer.current_epoch if stopped is None else stopped
    assert [e for e, _ in cmp.values] == list(range(last + 1))[: len(cmp.values)]
    assert len(cmp.values) == (stopped + 1 if stopped is not None else len(values))
    got = np.array([v for _, v in cmp.values])
    want = np.array(values[: len(got)], dtype=np.float32).astype(float)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    on_disk = json.loads((tmp_path / "mia" / "early_stopping.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["rules"][0]["stop_epoch"] == stopped


def test_stop_training_behaves_like_early_stopping(tmp_path):
    values = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9, 0.5, 0.4]
    es = EarlyStopping(monitor="val_loss", patience=3)
    ref = _trainer(tmp_path / "ref", [es], max_epochs=len(values))
    ref.fit(Scripted(values))
    cmp = EarlyStoppingComparison(patience=[3, 10], stop_training=True, dirpath=str(tmp_path / "mia"))
    trainer = _trainer(tmp_path / "cmp", [cmp], max_epochs=len(values))
    trainer.fit(Scripted(values))
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert cmp.stopped_epoch == es.stopped_epoch == 5
    assert trainer.current_epoch == ref.current_epoch
    assert cmp.results["stopped_epoch"] == 5


def test_validation_every_n_epochs(tmp_path):
    values = [1.0, 0.9, 0.8, 0.7, 0.75, 0.74, 0.73, 0.72, 0.71, 0.7, 0.9, 0.95, 1.0, 1.0, 1.0, 1.0]
    es = EarlyStopping(monitor="val_loss", patience=2)
    cmp = EarlyStoppingComparison(patience=2, dirpath=str(tmp_path / "mia"))
    trainer = _trainer(tmp_path, [es, cmp], max_epochs=len(values), check_val_every_n_epoch=3)
    trainer.fit(Scripted(values))
    # Validation at epochs 2, 5, 8, 11, 14: 0.8, 0.74, 0.71 improve; 0.95, 1.0 do not -> patience 2 hit at 14.
    assert [e for e, _ in cmp.values] == [2, 5, 8, 11, 14]
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED and es.stopped_epoch == 14
    assert cmp.results["rules"][0]["stop_epoch"] == es.stopped_epoch


def test_default_location_is_logger_run_dir(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    cmp = EarlyStoppingComparison()
    trainer = _trainer(tmp_path, [cmp], max_epochs=3, logger=logger)
    trainer.fit(Scripted([1.0, 0.9, 0.95]))
    path = os.path.join(trainer.log_dir, "mia", "early_stopping.json")
    data = json.load(open(path))
    assert data["monitor"] == "val_loss" and data["patience"] == [3, 5, 10] and data["last_epoch"] == 2
    assert [r["value"] for r in data["values"]] == pytest.approx([1.0, 0.9, 0.95])


def test_state_dict_round_trip_and_checkpoint_resume(tmp_path):
    values = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.7]
    full = EarlyStoppingComparison(patience=[1, 2], dirpath=str(tmp_path / "full"))
    _trainer(tmp_path / "a", [full], max_epochs=len(values)).fit(Scripted(values))

    copy = EarlyStoppingComparison(patience=[1, 2])
    copy.load_state_dict(full.state_dict())
    assert copy.results == full.results
    assert copy.state_key == full.state_key != EarlyStoppingComparison(patience=[1, 3]).state_key

    # Interrupted after epoch 3, resumed from the checkpoint with a fresh callback: same records as unbroken.
    first = EarlyStoppingComparison(patience=[1, 2], dirpath=str(tmp_path / "resumed"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path / "b", [first, ckpt], max_epochs=4, enable_checkpointing=True).fit(Scripted(values))
    second = EarlyStoppingComparison(patience=[1, 2], dirpath=str(tmp_path / "resumed"))
    _trainer(tmp_path / "b", [second], max_epochs=len(values)).fit(
        Scripted(values), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.values == full.values
    assert second.results["rules"] == full.results["rules"]


def test_missing_monitor(tmp_path):
    strict = EarlyStoppingComparison(monitor="nope", dirpath=str(tmp_path))
    with pytest.raises(RuntimeError, match="nope.*val_loss"):
        _trainer(tmp_path, [strict], max_epochs=1).fit(Scripted([1.0]))
    lenient = EarlyStoppingComparison(monitor="nope", strict=False, dirpath=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="nope"):
        _trainer(tmp_path, [lenient], max_epochs=2).fit(Scripted([1.0, 2.0]))
    assert lenient.values == []


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "avg"}, "mode.*min.*max"),
    ({"patience": -1}, "patience"),
    ({"patience": []}, "patience"),
    ({"patience": [3, "5"]}, "patience"),
    ({"patience": [3, 3]}, "distinct"),
    ({"min_delta": -0.1}, "min_delta"),
    ({"min_delta": math.inf}, "min_delta"),
    ({"stop_training": "yes"}, "stop_training.*True or False"),
    ({"monitor": ""}, "monitor"),
])
def test_arguments_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStoppingComparison(**kwargs)
