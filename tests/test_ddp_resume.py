"""Scale-out and interruption: DDP gives the single-process numbers; a SIGKILLed run resumes without gaps."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_mia.report.history import read_history

SCRIPT = Path(__file__).parent / "scripts" / "train_run.py"
METRICS = ("balanced_accuracy", "far", "auc", "accuracy", "tpr_at_1pct_fpr", "train_acc", "test_acc", "train_loss")


def _train(out, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return read_history(str(Path(out) / "run" / "version_0" / "mia" / "history.csv"))


def _key(r):
    return (r["epoch"], r["feature"], r["attack"], r["slice"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_gives_single_process_numbers(tmp_path, strategy):
    # lr ~ 0: DDP and one process then hold the same weights, so any difference would be the monitor's
    single = _train(tmp_path / "single", "--lr", "1e-12", "--epochs", "2")
    ddp = _train(tmp_path / strategy, "--lr", "1e-12", "--epochs", "2", "--strategy", strategy, "--devices", "2")
    assert len(single) == len(ddp) > 0
    a, b = {_key(r): r for r in single}, {_key(r): r for r in ddp}
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k]["n_members"], a[k]["n_nonmembers"]) == (b[k]["n_members"], b[k]["n_nonmembers"])
        for m in METRICS:
            x, y = a[k][m], b[k][m]
            assert (np.isnan(x) and np.isnan(y)) or abs(x - y) < 1e-6, (k, m, x, y)
    pa = np.load(tmp_path / "single" / "run" / "version_0" / "mia" / "predictions" / "epoch_0001.npz")
    pb = np.load(tmp_path / strategy / "run" / "version_0" / "mia" / "predictions" / "epoch_0001.npz")
    assert np.array_equal(pa["index"], pb["index"]) and np.array_equal(pa["is_member"], pb["is_member"])
    assert len(np.unique(np.c_[pa["index"], pa["is_member"]], axis=0)) == len(pa["index"])  # no duplicates
    np.testing.assert_allclose(pa["score__loss__threshold"], pb["score__loss__threshold"], atol=1e-6)


@pytest.mark.slow
def test_sigkill_then_resume_continues_history(tmp_path):
    out = tmp_path / "killed"
    hist = out / "run" / "version_0" / "mia" / "history.csv"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--epochs", "8", "--sleep", "0.7"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once a few epochs are written, at an arbitrary moment of the next
            if hist.exists() and len({r["epoch"] for r in read_history(str(hist))}) >= 3:
                time.sleep(0.3)
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("the training run did not reach epoch 3 in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_history(str(hist))  # readable after SIGKILL: atomic writes
    assert before and len({r["epoch"] for r in before}) >= 3
    rows = _train(out, "--epochs", "8", "--resume")
    epochs = sorted({r["epoch"] for r in rows})
    assert epochs == list(range(8))
    per_epoch = {e: sum(1 for r in rows if r["epoch"] == e) for e in epochs}
    assert len(set(per_epoch.values())) == 1, per_epoch  # no duplicated or missing rows
    assert not list(hist.parent.glob(".tmp-*"))
