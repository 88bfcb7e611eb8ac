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
    for opt in ("--mia.every_n_epochs", "--mia.features", "--mia.attacks", "--mia.protocol"):
        assert opt in out.stdout
    assert "StandardProtocol" in out.stdout and "PaperProtocol" in out.stdout


def test_protocol_help_lists_fields_and_choices(tmp_path):
    out = _run(["fit", "--mia.protocol.help", "StandardProtocol"], tmp_path)
    assert out.returncode == 0, out.stderr
    for opt in ("--mia.protocol.repeats", "--mia.protocol.eval_fraction", "--mia.protocol.fit_per_slice"):
        assert opt in out.stdout
    assert "undersample" in out.stdout and "class_weight" in out.stdout  # the Literal choices of balance


def test_bad_protocol_choice_is_rejected_at_parse_time(tmp_path):
    out = _run(["fit", "--mia.protocol", "StandardProtocol", "--mia.protocol.balance", "smote",
                "--trainer.max_epochs", "1"], tmp_path)
    assert out.returncode != 0
    assert "smote" in out.stderr and "undersample" in out.stderr


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
    out = _run(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "mia" / "history.csv").exists()
    assert (run / "mia" / "audit.json").exists()
    assert "tensorboard --logdir runs" in out.stdout + out.stderr
    assert "history.csv" in out.stdout + out.stderr
    # with the progress bar on (as in `make demo`), the fit-end summary still reaches the terminal
    assert "Early-stopping comparison" in out.stdout and "Report: runs/quickstart/version_0/mia/report.md" in out.stdout


@pytest.mark.slow
def test_every_feature_from_yaml_with_options(tmp_path):
    cfg = tmp_path / "all.yaml"
    cfg.write_text("""
trainer: {max_epochs: 1, enable_progress_bar: false, logger: {class_path: pytorch_lightning.loggers.TensorBoardLogger,
          init_args: {save_dir: runs, name: all}}}
data: {class_path: lightning_mia.data.DigitsDataModule, init_args: {train_subset: 120, batch_size: 32}}
mia:
  n_members: 40
  n_nonmembers: 40
  protocol: {class_path: StandardProtocol, init_args: {repeats: 1, eval_ratios: [5, 1, 0.2]}}
  attacks: [threshold, logistic_regression]
  features:
    - confidence
    - loss
    - {name: confidence, tag: top3, top_k: 3}
    - {name: intermediate, layers: [-1]}
    - gradient_norms
    - {name: boundary_distance, max_steps: 200}
es: {patience: [1]}
""")
    out = _run(["fit", "--config", str(cfg)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    from lightning_mia.report.history import read_history
    from tests.helpers import scalars

    run = tmp_path / "runs" / "all" / "version_0"
    rows = read_history(str(run / "mia" / "history.csv"))
    feats = {r["feature"] for r in rows}
    assert feats == {"confidence", "loss", "top3", "intermediate", "gradient_norms", "boundary_distance"}
    tags = scalars(run)
    for f in feats:
        assert f"mia/{f}/logistic_regression/all/balanced_accuracy" in tags, f
    assert "mia/loss/threshold/all/precision_at_ratio_0.2" in tags
    assert "mia/boundary_distance/threshold/all/auc" in tags  # 1-D feature: the threshold attack runs too
