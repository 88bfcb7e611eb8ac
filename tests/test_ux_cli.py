"""The ``lightning-mia`` command as users run it: the installed console script, in a subprocess, with exit codes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("lightning-mia")
README = ROOT / "README.md"


def run(args, cwd, env=None, timeout=300):
    assert SCRIPT.exists(), SCRIPT
    full_env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MIA_DEBUG"}
    full_env.update({"PYTHONWARNINGS": "ignore", **(env or {})})
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def error_lines(stderr):
    """stderr without Lightning's and Python's chatter (seed, tips, warnings)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("lightning-mia:")]


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_top_level_help_lists_every_command_and_the_known_names(tmp_path, args):
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("fit", "validate", "test", "predict", "report", "compare", "study"):
        assert re.search(rf"^  {command} ", out.stdout, re.M), command
    for name in ("confidence", "gradient_norms", "boundary_distance", "logistic_regression", "xgboost", "paper",
                 "gaussian", "lenet", "DigitsDataModule"):
        assert name in out.stdout, name
    assert "--debug" in out.stdout and "LIGHTNING_MIA_DEBUG" in out.stdout


def test_unknown_command(tmp_path):
    out = run(["fot"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert error_lines(out.stderr)[0].startswith("lightning-mia: error: unknown command 'fot'")


def test_an_unknown_feature_prints_the_message_alone(tmp_path):
    out = run(["fit", "--mia.features", "[foo]", "--trainer.max_epochs", "1"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = error_lines(out.stderr)
    assert lines[0].startswith("lightning-mia: error: Unknown feature 'foo'. Known features: ")
    assert "confidence" in lines[0] and "--debug" in lines[1] and len(lines) == 2
    assert len(out.stderr.strip().splitlines()) <= 6  # (plus "Seed set to 0" and Lightning's tips)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = ["fit", "--mia.features", "[foo]"] + (["--debug"] if how == "flag" else [])
    out = run(args, tmp_path, env={"LIGHTNING_MIA_DEBUG": "1"} if how == "env" else None)
    assert out.returncode != 0 and "Traceback" in out.stderr and "Unknown feature 'foo'" in out.stderr


def test_a_config_typo_prints_the_error_not_the_usage(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mia:\n  every_n_epoch: 2\n")
    out = run(["fit", "--config", str(cfg)], tmp_path)
    assert out.returncode == 2
    assert "usage:" not in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr
    assert error_lines(out.stderr) == [
        "lightning-mia: error: Subcommand 'fit' does not accept option 'mia.every_n_epoch'",
        "lightning-mia: 'lightning-mia fit --help' lists the options; --debug shows the traceback"]


def test_bad_value_and_missing_data_are_user_errors(tmp_path):
    out = run(["fit", "--mia.every_n_epochs", "0"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert error_lines(out.stderr)[0] == "lightning-mia: error: every_n_epochs must be an integer >= 1, got 0"
    out = run(["fit", "--data", "lightning_mia.data.CIFARDataModule", "--data.data_dir", str(tmp_path / "none"),
               "--trainer.max_epochs", "1", "--trainer.logger", "false"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert error_lines(out.stderr)[0].startswith("lightning-mia: error: CIFAR10 not found")


def test_report_compare_and_study_help_and_defaults(tmp_path):
    from lightning_mia.report.history import write_history
    from tests.test_report import hand_history

    def help_of(command):
        out = run([command, "--help"], tmp_path)
        assert out.returncode == 0, out.stderr
        return " ".join(out.stdout.split())  # argparse wraps to the terminal width

    text = help_of("study")
    assert "(default: docs/results.md)" in text and "(default: runs/study)" in text
    assert "(default: the config's)" in text and "(default: None)" not in text
    text = help_of("report")
    assert "(default: RUN_DIR/mia)" in text and "(default: 20)" in text
    assert "(default: mia_compare in the runs' common parent folder)" in help_of("compare")

    for name in ("a", "b"):
        write_history(str(tmp_path / "runs" / name / "version_0" / "mia" / "history.csv"), hand_history())
    out = run(["compare", "runs/a/version_0", "runs/b/version_0"], tmp_path)  # no --out needed
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join("runs", "mia_compare", "compare.md")
    assert (tmp_path / "runs" / "mia_compare" / "compare.md").is_file()
    out = run(["report", "runs/missing"], tmp_path)
    assert out.returncode == 2 and "history.csv" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_tiny_fit_exits_0_and_ends_as_the_readme_shows(tmp_path):
    out = run(["fit", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
               "--data.train_subset", "80", "--mia.n_members", "40", "--mia.n_nonmembers", "40",
               "--trainer.logger.init_args.name", "quickstart"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scored n=" in out.stdout and "±" in out.stdout  # evaluation counts and std in the audit lines
    # The README's end-of-run block lists the same lines in the same order as the real output.
    block = re.search(r"`make demo` runs .*?```\n(.*?)```", README.read_text(), re.S).group(1)
    heads = ("Early-stopping comparison", "Report:", "Membership-inference audit:", "TensorBoard:")
    order = lambda text: [h for ln in text.splitlines() for h in heads if ln.startswith(h)]  # noqa: E731
    assert order(block) == order(out.stdout) == list(heads)
    for ln in block.splitlines():
        if ln.startswith(heads[1:]):
            assert ln in out.stdout.replace(os.sep, "/"), ln


@pytest.mark.slow
def test_the_readme_example_shows_both_loss_attacks(tmp_path, monkeypatch):
    import contextlib
    import io

    monkeypatch.chdir(tmp_path)
    code = re.search(r"<!-- own-module-example -->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    printed = buf.getvalue()
    assert "('loss', 'threshold', 'all')" in printed and "('loss', 'logistic_regression', 'all')" in printed
