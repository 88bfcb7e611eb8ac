"""Both Lightning packages: the module, the datamodules and the callbacks fit under `pytorch_lightning` and under
`lightning.pytorch` (`import lightning as L`), with whichever is installed."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_mia import compat
from lightning_mia.callbacks import EarlyStoppingComparison, PrivacyConstraint
from lightning_mia.data import DigitsDataModule, MIADataModule, SyntheticDataModule
from lightning_mia.protocols import StandardProtocol
from lightning_mia.report.history import read_history

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = [pytest.param(ns, marks=pytest.mark.skipif(ns not in compat.available_namespaces(),
                                                        reason=f"{ns} is not installed"))
              for ns in compat.NAMESPACES]


def flavour(ns):
    """(Lightning package, ImageClassifier, MembershipInferenceMonitor) of the namespace ``ns``."""
    pkg = importlib.import_module(ns)
    if ns == "lightning.pytorch":
        import lightning_mia.lightning as mia

        return pkg, mia.ImageClassifier, mia.MembershipInferenceMonitor
    from lightning_mia.callbacks import MembershipInferenceMonitor
    from lightning_mia.module import ImageClassifier

    return pkg, ImageClassifier, MembershipInferenceMonitor


def _dm():
    return SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=64, n_heldout=32, batch_size=16, seed=0)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_fit_with_monitor_module_datamodule_and_callbacks(tmp_path, ns):
    pkg, ImageClassifier, Monitor = flavour(ns)
    monitor = Monitor(features=["confidence", "loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1),
                      ratio=1.0, verbose=False, report_at_end=False, exposed_top_k=0)
    es = EarlyStoppingComparison(monitor="val_loss", patience=[1])
    guard = PrivacyConstraint(metric="val_acc", leak="mia/max/auc", bound=1.0)
    logger = pkg.loggers.CSVLogger(str(tmp_path), name="run", version=0)
    trainer = pkg.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor, es, guard],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0)
    model = ImageClassifier("lenet", optimizer="adam", lr=1e-2)
    assert isinstance(model, pkg.LightningModule)
    trainer.fit(model, datamodule=_dm())
    run = tmp_path / "run" / "version_0"
    rows = read_history(str(run / "mia" / "history.csv"))
    assert sorted({r["epoch"] for r in rows}) == [0, 1]
    assert (run / "mia" / "early_stopping.json").exists()  # the comparison found the same run directory
    assert guard.name in trainer.callback_metrics
    assert monitor.last_result is not None and model.hparams.num_classes == 3


@pytest.mark.parametrize("ns", NAMESPACES)
def test_every_datamodule_and_callback_is_of_every_installed_package(ns):
    pkg = importlib.import_module(ns)
    for cls in (MIADataModule, SyntheticDataModule, DigitsDataModule):
        assert issubclass(cls, pkg.LightningDataModule), cls
    for cls in (EarlyStoppingComparison, PrivacyConstraint):
        assert issubclass(cls, pkg.Callback), cls
    assert issubclass(flavour(ns)[2], pkg.Callback)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_lightning_sees_only_the_hooks_we_implement(ns):
    # Lightning decides what to call with is_overridden (the hook's code differs from its base class's): a class
    # built on both packages must not look as if it overrode the hooks it inherits.
    pkg = importlib.import_module(ns)
    is_overridden = importlib.import_module(ns + ".utilities.model_helpers").is_overridden
    dm = _dm()
    for hook in ("prepare_data", "transfer_batch_to_device", "on_before_batch_transfer", "on_after_batch_transfer",
                 "state_dict", "load_state_dict", "teardown", "on_exception"):
        assert not is_overridden(hook, dm, pkg.LightningDataModule), hook
    for hook in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader", "setup"):
        assert is_overridden(hook, dm, pkg.LightningDataModule), hook
    guard = PrivacyConstraint()
    assert not is_overridden("state_dict", guard, pkg.Callback)  # not stateful: nothing in the checkpoint
    assert is_overridden("on_validation_end", guard, pkg.Callback)
    assert is_overridden("state_dict", EarlyStoppingComparison(), pkg.Callback)


@pytest.mark.skipif("lightning.pytorch" not in compat.available_namespaces(), reason="lightning is not installed")
def test_lightning_imagecls_checkpoint_round_trip(tmp_path):
    import lightning.pytorch as L

    from lightning_mia.lightning import ImageClassifier

    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2), datamodule=_dm())
    loaded = ImageClassifier.load_from_checkpoint(str(tmp_path / "last.ckpt"), weights_only=True)
    assert type(loaded).__module__ == "lightning_mia.lightning" and loaded.hparams.num_classes == 3
    assert loaded(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_default_classes_keep_their_import_paths():
    import lightning_mia
    from lightning_mia.module import ImageClassifier, ImageClassifierMixin

    assert lightning_mia.ImageClassifier is ImageClassifier and issubclass(ImageClassifier, ImageClassifierMixin)
    assert compat.namespace_of(ImageClassifier) == compat.default_namespace()
    assert compat.namespace_of(SyntheticDataModule) is None  # both packages'


@pytest.mark.skipif("lightning.pytorch" not in compat.available_namespaces(), reason="lightning is not installed")
def test_only_lightning_installed(tmp_path):
    # pytorch_lightning hidden: the default classes are built on lightning.pytorch and fit with its Trainer (the
    # monitor's own module still imports pytorch_lightning: see the lead's edit in the report)
    script = textwrap.dedent("""
        import sys
        sys.modules["pytorch_lightning"] = None
        sys.modules["lightning_fabric"] = None
        import lightning.pytorch as L
        from lightning_mia.module import ImageClassifier
        from lightning_mia.data import SyntheticDataModule
        from lightning_mia.cli import detect_namespace
        assert issubclass(ImageClassifier, L.LightningModule)
        assert detect_namespace([]) == "lightning.pytorch"
        dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=32, n_heldout=16, batch_size=16)
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(ImageClassifier("lenet"), datamodule=dm)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
