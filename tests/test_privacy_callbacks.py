"""Privacy metrics that Lightning's own callbacks act on, and the last epoch audited however training ends.

References: the run's history.csv (what the monitor measured), and lightning_mia.stopping.would_stop (tested
equal to Lightning's EarlyStopping) replayed on the values the callbacks saw."""
import numpy as np
import pytorch_lightning as pl
import pytest
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import SyntheticDataModule
from lightning_mia.module import ImageClassifier
from lightning_mia.protocols import StandardProtocol
from lightning_mia.report.history import read_history
from lightning_mia.stopping import would_stop
from tests.helpers import tiny_trainer


def _dm():
    return SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=96, n_heldout=64, signal=1.0,
                               batch_size=32, seed=0)


def _monitor(**kw):
    return MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1),
                                      ratio=1.0, verbose=False, report_at_end=False, **kw)


class _Seen(pl.Callback):
    """Records what a callback listed after the monitor finds in callback_metrics at on_validation_end."""

    def __init__(self, key):
        self.key, self.values = key, {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values[trainer.current_epoch] = float(trainer.callback_metrics[self.key])


def _auc_by_epoch(run):
    return {int(r["epoch"]): r["auc"] for r in read_history(str(run / "mia" / "history.csv"))
            if (r["feature"], r["attack"], r["slice"]) == ("loss", "threshold", "all")}


@pytest.mark.parametrize("every", [1, 2])
def test_model_checkpoint_keeps_the_least_leaky_epoch_in_the_same_epoch(tmp_path, every):
    key = "mia/loss/threshold/all/auc"
    seen = _Seen(key)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor=key, mode="min", save_top_k=1,
                           filename="{epoch}")
    monitor = _monitor(every_n_epochs=every)
    tiny_trainer(tmp_path, [ckpt, monitor, seen], max_epochs=4, enable_checkpointing=True).fit(
        ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    auc = _auc_by_epoch(tmp_path / "run" / "version_0")
    assert sorted(auc) == sorted({0, *range(every - 1, 4, every)})  # the first epoch is always audited
    # every epoch finds the metric: the audit's value, or the last audit's on epochs without one
    held = {e: auc[max(a for a in auc if a <= e)] for e in range(4) if any(a <= e for a in auc)}
    assert seen.values == pytest.approx(held)
    best_epoch = min(auc, key=lambda e: (auc[e], e))
    assert ckpt.best_model_score.item() == pytest.approx(auc[best_epoch])
    assert ckpt.best_model_path.endswith(f"epoch={best_epoch}.ckpt")


def test_early_stopping_on_a_privacy_metric_acts_like_on_a_logged_metric(tmp_path):
    key = "mia/max/balanced_accuracy"
    seen = _Seen(key)
    es = EarlyStopping(monitor=key, mode="min", patience=1)
    monitor = _monitor(every_n_epochs=1)
    trainer = tiny_trainer(tmp_path, [monitor, seen, es], max_epochs=8)
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    replay = would_stop([seen.values[e] for e in sorted(seen.values)], patience=1, mode="min")
    stop = replay["stop_epoch"]
    assert es.stopped_epoch == (0 if stop is None else stop)  # Lightning's stopped_epoch is 0 when it never stops
    if stop is not None:
        assert trainer.current_epoch == stop + 1 and monitor.last_epoch == stop  # the stop epoch was audited


def test_training_cut_by_max_steps_still_audits_its_last_epoch(tmp_path):
    monitor = _monitor(every_n_epochs=5)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=-1, max_steps=7)  # 3 batches an epoch: epochs 0-2
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    assert trainer.global_step == 7 and monitor.last_epoch == 2  # epoch 2 was cut after one step, then audited
    assert sorted(_auc_by_epoch(tmp_path / "run" / "version_0")) == [0, 2]


def _constrained_run(path, bound):
    from lightning_mia.callbacks import PrivacyConstraint

    pl.seed_everything(0)
    seen_acc, seen_leak = _Seen("val_acc"), _Seen("mia/max/auc")
    constraint = PrivacyConstraint(metric="val_acc", leak="mia/max/auc", bound=bound)
    ckpt = ModelCheckpoint(dirpath=str(path / "ckpt"), monitor=constraint.name, mode="max", save_top_k=1,
                           filename="{epoch}")
    tiny_trainer(path, [ckpt, _monitor(every_n_epochs=1), constraint, seen_acc, seen_leak], max_epochs=6,
                 enable_checkpointing=True).fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    return ckpt, constraint, seen_acc.values, seen_leak.values


def test_privacy_constraint_keeps_the_best_accuracy_under_the_leak_bound(tmp_path):
    _, _, _, first = _constrained_run(tmp_path / "a", bound=1.0)
    bound = float(np.median(list(first.values())))  # a bound that splits this (deterministic) run's epochs
    ckpt, constraint, acc, leak = _constrained_run(tmp_path / "b", bound)
    assert leak == first  # same seed, same run
    ok = [e for e in sorted(leak) if leak[e] <= bound]
    assert 0 < len(ok) < len(leak)
    best = max(ok, key=lambda e: (acc[e], -e))
    assert ckpt.best_model_path.endswith(f"epoch={best}.ckpt")
    assert ckpt.best_model_score.item() == pytest.approx(acc[best])
    assert constraint.value(0.9, bound + 0.1) == float("-inf") and constraint.value(0.9, bound - 0.1) == 0.9
    assert constraint.value(0.9, None) == float("-inf")
