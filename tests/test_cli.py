"""The LightningCLI: help shows the monitor, YAML options are validated, a tiny fit writes a run."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_shows_monitor_options(tmp_path):
    out = _run(["fit", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for opt in ("--mia.every_n_epochs", "--mia.features", "--mia.attacks", "--mia.eval_fraction", "--mia.repeats"):
        assert opt in out.stdout


def test_unknown_yaml_option_is_rejected(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mia:\n  every_n_epoch: 2\n")  # typo: every_n_epochs
    out = _run(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"], tmp_path)
    assert out.returncode != 0
    assert "every_n_epoch" in out.stderr


def test_bad_monitor_value_is_rejected(tmp_path):
    out = _run(["fit", "--mia.every_n_epochs", "0", "--trainer.max_epochs", "1"], tmp_path)
    assert out.returncode != 0
    assert "every_n_epochs must be an integer >= 1" in out.stderr


@pytest.mark.slow
def test_quickstart_config_short_run(tmp_path):
    out = _run(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "2",
                "--trainer.enable_progress_bar", "false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "mia" / "history.csv").exists()
    assert (run / "mia" / "audit.json").exists()
    assert "tensorboard --logdir runs" in out.stdout + out.stderr
    assert "history.csv" in out.stdout + out.stderr
