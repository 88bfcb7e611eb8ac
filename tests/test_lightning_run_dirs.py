"""Run directories that cannot collide: runs without a logger directory get `mia_runs/version_N` each; a resume
reuses the directory its checkpoint recorded; under DDP every rank holds the same path."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_mia import compat
from lightning_mia.callbacks import EarlyStoppingComparison, MembershipInferenceMonitor
from lightning_mia.callbacks.paths import (RUNS_DIR, check_fresh_run_dir, interrupt_hint, resolve_run_dir,
                                           run_dir)
from lightning_mia.module import ImageClassifier
from lightning_mia.protocols import StandardProtocol
from lightning_mia.report.history import read_history
from tests.test_lightning_namespaces import _dm

ROOT = Path(__file__).resolve().parents[1]
pl = importlib.import_module(compat.default_namespace())


class RecordingMonitor(MembershipInferenceMonitor):
    """The monitor with the state_dict / on_train_start edit proposed to the lead (a no-op once it is in)."""

    _previous = None

    def state_dict(self):
        state = super().state_dict()
        if self._writer is not None:
            state.setdefault("run_dir", self._writer.layout.run_dir)
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._previous = state_dict.get("run_dir")

    def on_train_start(self, trainer, pl_module):
        if not self._skip_run(trainer):
            resolve_run_dir(trainer, self.dirpath, self._previous)
        super().on_train_start(trainer, pl_module)


def _fit(root, logger=False, epochs=2, ckpt_path=None, monitor_cls=MembershipInferenceMonitor, callbacks=()):
    monitor = monitor_cls(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                          verbose=False, report_at_end=False, exposed_top_k=0)
    es = EarlyStoppingComparison(monitor="val_loss", patience=[1])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[monitor, es, *callbacks],
                         enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm(), ckpt_path=ckpt_path)
    return trainer, monitor


def _epochs(path):
    return sorted({r["epoch"] for r in read_history(str(Path(path) / "mia" / "history.csv"))})


def test_runs_without_a_logger_never_share_a_directory(tmp_path):
    _fit(tmp_path, epochs=2)
    _fit(tmp_path, epochs=1)
    runs = tmp_path / RUNS_DIR
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"]
    assert _epochs(runs / "version_0") == [0, 1] and _epochs(runs / "version_1") == [0]  # nothing merged
    for v in ("version_0", "version_1"):  # the comparison wrote next to the monitor's history
        assert (runs / v / "mia" / "early_stopping.json").exists()
    assert not (tmp_path / "mia").exists()


def test_logger_without_log_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = pl.loggers.MLFlowLogger(experiment_name="mia", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    assert getattr(logger, "log_dir", None) is None
    _fit(tmp_path, logger=logger, epochs=1)
    _fit(tmp_path, logger=pl.loggers.MLFlowLogger(experiment_name="mia", tracking_uri=f"file:{tmp_path / 'mlruns'}"),
         epochs=1)
    assert sorted(os.listdir(tmp_path / RUNS_DIR)) == ["version_0", "version_1"]


def test_resume_reuses_the_recorded_directory(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(tmp_path, epochs=2, monitor_cls=RecordingMonitor, callbacks=[ckpt])
    _fit(tmp_path, epochs=1)  # another run meanwhile: version_1
    ckpt2 = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), save_last=True)
    trainer, monitor = _fit(tmp_path, epochs=3, monitor_cls=RecordingMonitor, callbacks=[ckpt2],
                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    runs = tmp_path / RUNS_DIR
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"]  # no version_2: the resume went home
    assert _epochs(runs / "version_0") == [0, 1, 2] and _epochs(runs / "version_1") == [0]
    es = [c for c in trainer.callbacks if isinstance(c, EarlyStoppingComparison)][0]
    assert es.state_dict()["run_dir"] == str(runs / "version_0")


class FakeStrategy:
    def __init__(self, sent):
        self.sent = sent

    def broadcast(self, obj, src=0):
        self.sent.append(obj)
        return self.sent[0]  # what rank zero sent


def _fake_trainer(root, rank, sent):
    return SimpleNamespace(loggers=[], default_root_dir=str(root), world_size=2, global_rank=rank,
                           strategy=FakeStrategy(sent))


def test_under_ddp_rank_zero_decides_and_broadcasts(tmp_path):
    sent = []
    t0, t1 = _fake_trainer(tmp_path, 0, sent), _fake_trainer(tmp_path, 1, sent)
    assert run_dir(t1) == str(tmp_path / RUNS_DIR)  # rank-zero-only code on rank 1: creates nothing, no collective
    assert not (tmp_path / RUNS_DIR).exists() and not sent
    p0 = resolve_run_dir(t0)
    p1 = resolve_run_dir(t1)
    assert p0 == p1 == str(tmp_path / RUNS_DIR / "version_0") and sent == [p0, None]
    assert os.listdir(tmp_path / RUNS_DIR) == ["version_0"]
    assert resolve_run_dir(t0) == p0 and run_dir(t1) == p0 and len(sent) == 2  # decided: no more collectives


@pytest.mark.slow
def test_ddp_spawn_two_ranks_one_directory(tmp_path):
    script = textwrap.dedent(f"""
        import warnings; warnings.filterwarnings("ignore")
        import {compat.default_namespace()} as pl
        from lightning_mia.callbacks import EarlyStoppingComparison, MembershipInferenceMonitor
        from lightning_mia.data import SyntheticDataModule
        from lightning_mia.module import ImageClassifier
        from lightning_mia.protocols import StandardProtocol
        if __name__ == "__main__":
            dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=64, n_heldout=32, batch_size=16)
            mon = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], ratio=1.0, verbose=False,
                                             protocol=StandardProtocol(repeats=1), report_at_end=False,
                                             exposed_top_k=0)
            es = EarlyStoppingComparison(monitor="val_loss", patience=[1])
            pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                       callbacks=[es, mon], enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0).fit(ImageClassifier("lenet"), datamodule=dm)
    """)
    (tmp_path / "run.py").write_text(script)
    out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.listdir(tmp_path / RUNS_DIR) == ["version_0"]
    assert _epochs(tmp_path / RUNS_DIR / "version_0") == [0]
    assert (tmp_path / RUNS_DIR / "version_0" / "mia" / "early_stopping.json").exists()


def test_fresh_run_into_a_used_directory_is_refused(tmp_path):
    mia = tmp_path / "mia"
    mia.mkdir()
    check_fresh_run_dir(str(tmp_path), resumed=False)  # no history yet: fine
    (mia / "history.csv").write_text("epoch\n0\n")
    check_fresh_run_dir(str(tmp_path), resumed=True)
    with pytest.raises(ValueError, match="already holds the audit history of an earlier run"):
        check_fresh_run_dir(str(tmp_path), resumed=False)


def test_interrupt_hint_says_how_to_write_the_report(tmp_path):
    lines = interrupt_hint(str(tmp_path), 4, KeyboardInterrupt())
    assert "up to epoch 4" in lines[0] and lines[-1] == f"Write the report from them: lightning-mia report {tmp_path}"
    assert "nothing to report" in interrupt_hint(str(tmp_path), -1, KeyboardInterrupt())[0]
