"""One step axis with every logger: the audit's scalars land at Lightning's own step (with `epoch` alongside) in
CSVLogger, W&B and MLflow, and by epoch in TensorBoard."""
import csv
import importlib
import os

import pytest

from lightning_mia import compat
from lightning_mia.logging_axis import log_audit_metrics
from lightning_mia.module import ImageClassifier
from tests.helpers import scalars
from tests.test_lightning_namespaces import _dm

TAG = "mia/loss/threshold/all/auc"
pl = importlib.import_module(compat.default_namespace())


class AuditLike(compat.Callback):
    """Logs like the monitor does after each audit (the epoch-end validation), through log_audit_metrics."""

    def __init__(self):
        self.steps = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        step = compat.lightning_step(trainer)
        self.steps.append(step)
        log_audit_metrics(trainer.loggers, {TAG: 0.5 + trainer.current_epoch / 10}, trainer.current_epoch, step)


def _fit(tmp_path, loggers, epochs=3):
    cb = AuditLike()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=loggers, callbacks=[cb], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())  # 4 steps per epoch: epoch-end metrics at steps 3, 7, 11
    return trainer, cb


def test_csv_and_tensorboard(tmp_path):
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0, default_hp_metric=False)
    trainer, cb = _fit(tmp_path, [csv_logger, tb])
    assert cb.steps == [3, 7, 11]  # the step Lightning logs the epoch's val/train metrics at
    with open(os.path.join(csv_logger.log_dir, "metrics.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)  # one axis: the rows are in step order (they interleaved with step = epoch)
    ours = [r for r in rows if r.get(TAG)]
    val = [r for r in rows if r.get("val_loss")]
    assert [int(r["step"]) for r in ours] == [int(r["step"]) for r in val] == [3, 7, 11]
    assert [int(float(r["epoch"])) for r in ours] == [0, 1, 2]  # epoch alongside, as Lightning logs it
    # TensorBoard keeps the epoch view (its custom-scalars layout, chance line and histograms share it)
    assert [s for s, _ in scalars(tb.log_dir)[TAG]] == [0, 1, 2]


def test_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = pl.loggers.MLFlowLogger(experiment_name="mia", tracking_uri=uri)
    _fit(tmp_path, [logger])
    client = MlflowClient(tracking_uri=uri)
    ours = client.get_metric_history(logger.run_id, TAG)
    val = client.get_metric_history(logger.run_id, "val_loss")
    assert [m.step for m in ours] == [m.step for m in val] == [3, 7, 11]
    assert [m.value for m in client.get_metric_history(logger.run_id, "epoch") if m.step in (3, 7, 11)][:1] == [0]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="mia")
    sent = []
    experiment = logger.experiment
    original = experiment.log

    def spy(data, *args, **kwargs):
        sent.append(dict(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(experiment, "log", spy)
    try:
        _fit(tmp_path, [logger])
    finally:
        experiment.finish()
    ours = [d for d in sent if TAG in d]
    # W&B's x-axis is trainer/global_step (Lightning's define_metric): the same as val_loss's, and increasing
    assert [d["trainer/global_step"] for d in ours] == [d["trainer/global_step"] for d in sent if "val_loss" in d]
    assert [d["trainer/global_step"] for d in ours] == [3, 7, 11] and [d["epoch"] for d in ours] == [0, 1, 2]
    all_steps = [d["trainer/global_step"] for d in sent]
    assert all_steps == sorted(all_steps)


def test_without_a_trainer_step_every_logger_is_by_epoch():
    got = []

    class L:
        def log_metrics(self, metrics, step):
            got.append((step, dict(metrics)))

    log_audit_metrics([L()], {TAG: 0.6}, epoch=3)
    assert got == [(3, {TAG: 0.6})]
