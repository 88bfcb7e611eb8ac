"""The installed `lightning-mia` command with any LightningModule / LightningDataModule, on both Lightning packages."""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_mia import compat
from lightning_mia.cli import detect_namespace
from lightning_mia.report.history import read_history

ROOT = Path(__file__).resolve().parents[1]
COMMAND = str(Path(sys.executable).parent / "lightning-mia")
needs_lightning = pytest.mark.skipif("lightning.pytorch" not in compat.available_namespaces(),
                                     reason="lightning is not installed")
SMALL = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--mia.n_members", "40",
         "--mia.n_nonmembers", "40", "--mia.verbose", "false", "--mia.report_at_end", "false"]

MODULE = '''
import {ns} as pl, torch, torch.nn.functional as F


class MyModel(pl.LightningModule):
    """Any LightningModule: forward(x) -> logits is all the monitor needs."""

    def __init__(self, hidden: int = 32, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class MyData(pl.LightningDataModule):
    """Any LightningDataModule with member_dataset() / nonmember_dataset() of (x, y, index) items."""

    def __init__(self, n: int = 120):
        super().__init__()
        from lightning_mia.data import DigitsDataModule
        self.inner = DigitsDataModule(train_subset=n, batch_size=32)

    def setup(self, stage=None):
        self.inner.setup(stage)

    def train_dataloader(self):
        return self.inner.train_dataloader()

    def val_dataloader(self):
        return self.inner.val_dataloader()

    def member_dataset(self):
        return self.inner.member_dataset()

    def nonmember_dataset(self):
        return self.inner.nonmember_dataset()
'''


def _run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([COMMAND, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("ns", [pytest.param("pytorch_lightning"), pytest.param("lightning.pytorch",
                                                                                 marks=needs_lightning)])
def test_fit_any_lightning_module_and_datamodule(tmp_path, ns):
    (tmp_path / "mymod.py").write_text(MODULE.replace("{ns}", ns))
    out = _run(["fit", "--model", "mymod.MyModel", "--model.hidden", "16", "--data", "mymod.MyData",
                "--trainer.logger", f"{ns}.loggers.CSVLogger", "--trainer.logger.save_dir", "logs", *SMALL], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "logs").glob("*/version_0"))
    assert {r["epoch"] for r in read_history(str(run / "mia" / "history.csv"))} == {0}
    assert (run / "metrics.csv").exists() and (run / "mia" / "early_stopping.json").exists()


@needs_lightning
def test_lightning_pytorch_logger_picks_the_lightning_flavour(tmp_path):
    out = _run(["fit", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
                "--data.train_subset", "100", *SMALL], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "logs").glob("*/version_0"))
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r.get("val_loss") for r in rows)
    assert (run / "mia" / "history.csv").exists()
    cfg = (run / "config.yaml").read_text()
    assert "lightning_mia.lightning.ImageClassifier" in cfg and "pytorch_lightning" not in cfg


@needs_lightning
def test_mixing_the_two_packages_is_one_clear_error(tmp_path):
    out = _run(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger",
                "lightning.pytorch.loggers.CSVLogger"], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "name classes of both Lightning packages" in out.stderr
    assert "lightning_mia.lightning.ImageClassifier" in out.stderr and "Traceback" not in out.stderr


@needs_lightning
def test_detect_namespace(tmp_path):
    (tmp_path / "cfg.yaml").write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n")
    assert detect_namespace(["fit"]) == compat.default_namespace()
    assert detect_namespace(["fit", "--config", str(tmp_path / "cfg.yaml")]) == "lightning.pytorch"
    assert detect_namespace(["fit", "--model=lightning_mia.lightning.ImageClassifier"]) == "lightning.pytorch"
    assert detect_namespace(["fit", "--data", "lightning_mia.data.DigitsDataModule"]) == compat.default_namespace()
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / "mymod_l.py").write_text(MODULE.replace("{ns}", "lightning.pytorch"))
        assert detect_namespace(["fit", "--model", "mymod_l.MyModel"]) == "lightning.pytorch"
    finally:
        sys.path.remove(str(tmp_path))


@needs_lightning
def test_readme_own_cli_example(tmp_path):
    # the README's "your own LightningCLI with the monitor" example
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- own-cli-example -->")
    code = readme[readme.index("```python", start) + len("```python"):readme.index("```", readme.index("```python",
                                                                                                     start) + 9)]
    (tmp_path / "my_cli.py").write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "my_cli.py", "fit", "--trainer.max_epochs", "1",
                          "--trainer.enable_progress_bar", "false", "--data.train_subset", "100",
                          "--mia.n_members", "40", "--mia.n_nonmembers", "40", "--mia.verbose", "false",
                          "--mia.report_at_end", "false", "--trainer.default_root_dir", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.glob("**/mia/history.csv"))
