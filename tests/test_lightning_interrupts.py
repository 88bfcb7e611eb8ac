"""Interruptions: a SIGTERM during a long audit stops the run within a batch, the completed audits intact, and
says how to write the report; a skipped monitor (fast_dev_run) says so once."""
import importlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_mia import compat
from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.protocols import StandardProtocol
from lightning_mia.report.history import read_history
from tests.test_lightning_namespaces import NAMESPACES, _dm, flavour

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, time, warnings
warnings.filterwarnings("ignore")
import {ns} as pl
from lightning_mia.callbacks.paths import interrupt_hint
from lightning_mia.data import SyntheticDataModule
from lightning_mia.features import FEATURES, Feature
from lightning_mia.protocols import StandardProtocol
from tests.test_lightning_namespaces import flavour

MARK = sys.argv[1]


@FEATURES.register("slow_loss")
class SlowLoss(Feature):
    # one second per batch from the second audit on: an audit of 32 batches takes half a minute
    name = "slow_loss"

    def extract(self, model, x, y, logits=None):
        if model.current_epoch >= 1:
            open(MARK, "a").close()
            time.sleep(1.0)
        return logits[:, :1].float()


_, ImageClassifier, Monitor = flavour("{ns}")


class HintingMonitor(Monitor):
    # the on_exception edit proposed to the lead (a no-op once the monitor prints it itself)
    def on_exception(self, trainer, pl_module, exception):
        parent = getattr(super(), "on_exception", None)
        if parent is not None:
            parent(trainer, pl_module, exception)
        if trainer.global_rank == 0 and self._writer is not None and not getattr(self, "_hinted", False):
            print("\\n".join(interrupt_hint(self._writer.layout.run_dir, self.last_epoch, exception)), flush=True)


dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=64, n_heldout=64, batch_size=16, seed=0)
monitor = HintingMonitor(features=["loss", "slow_loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1),
                         ratio=1.0, batch_size=4, verbose=False, report_at_end=False, exposed_top_k=0)
logger = pl.loggers.CSVLogger(os.getcwd(), name="run", version=0)
trainer = pl.Trainer(max_epochs=5, accelerator="cpu", logger=logger, callbacks=[monitor],
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0)
trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=dm)
print("FIT RETURNED", flush=True)
"""


@pytest.mark.parametrize("ns", NAMESPACES)
def test_sigterm_during_a_slow_audit_stops_within_seconds(tmp_path, ns):
    mark = tmp_path / "slow_audit_started"
    (tmp_path / "run.py").write_text(textwrap.dedent(SCRIPT).replace("{ns}", ns))
    proc = subprocess.Popen([sys.executable, "run.py", str(mark)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the slow audit never started"
            time.sleep(0.1)
        time.sleep(1.5)  # well inside the 32-second audit
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert elapsed < 10, f"still running {elapsed:.0f} s after SIGTERM"
    assert "FIT RETURNED" not in out  # stopped, not finished
    run = tmp_path / "run" / "version_0"
    rows = read_history(str(run / "mia" / "history.csv"))
    assert {r["epoch"] for r in rows} == {0}  # the first audit intact, nothing of the interrupted one
    assert len(rows) == 2 * 3  # loss and slow_loss x threshold x 3 slices
    assert f"Write the report from them: lightning-mia report {run}" in out, out[-2000:]
    assert "audits up to epoch 0" in out


@pytest.mark.parametrize("ns", NAMESPACES)
def test_fast_dev_run_says_once_that_the_monitor_is_skipped(tmp_path, ns, caplog):
    pkg, ImageClassifier, Monitor = flavour(ns)

    class Saying(Monitor):  # the _skip_run edit proposed to the lead (a no-op once it is in)
        said = False

        def _skip_run(self, trainer):
            skip = super()._skip_run(trainer)
            if trainer.fast_dev_run and not self.said and not getattr(self, "_said_skipped", False):
                self.said = True
                compat.rank_zero_info(SKIP_MESSAGE, trainer)
            return skip

    monitor = Saying(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                     verbose=False)
    with caplog.at_level(logging.INFO):
        pkg.Trainer(fast_dev_run=2, accelerator="cpu", callbacks=[monitor], enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path)).fit(
            ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    said = [r for r in caplog.records if "fast_dev_run" in r.getMessage() and "MembershipInferenceMonitor" in
            r.getMessage()]
    assert len(said) == 1 and monitor.last_result is None
    assert not (tmp_path / "mia_runs").exists()


SKIP_MESSAGE = ("MembershipInferenceMonitor: skipped under fast_dev_run (a smoke test of a few batches: no audit, no "
                "files); run without fast_dev_run to audit")
