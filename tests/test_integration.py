"""LeNet overfits 150 digits: the audit must see the leak; a control with never-trained "members" must not."""
import numpy as np
import pytest
from torch.utils.data import Subset

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import DigitsDataModule
from lightning_mia.module import ImageClassifier
from lightning_mia.protocols import StandardProtocol
from tests.helpers import tiny_trainer


@pytest.mark.slow
def test_overfitting_lenet_leaks_and_control_does_not(tmp_path):
    dm = DigitsDataModule(train_subset=150, batch_size=32, seed=0)
    dm.setup("fit")
    heldout = dm.nonmember_dataset()
    half = len(heldout) // 2
    # control: "members" drawn from held-out data the model never trains on, non-members from the other half
    control = MembershipInferenceMonitor(features=["loss"], attacks=["threshold", "logistic_regression"],
                                         protocol=StandardProtocol(repeats=5), ratio=1.0, seed=1, every_n_epochs=80, verbose=False,
                                         report_at_end=False, dirpath=str(tmp_path / "control"),
                                         member_dataset=Subset(heldout, range(half)),
                                         nonmember_dataset=Subset(heldout, range(half, len(heldout))))
    monitor = MembershipInferenceMonitor(features=["loss", "confidence"], attacks=["threshold", "logistic_regression"],
                                         protocol=StandardProtocol(repeats=5), ratio=1.0, every_n_epochs=5, verbose=False, report_at_end=False)
    model = ImageClassifier("lenet", optimizer="adam", lr=5e-3, betas=(0.5, 0.99))
    tiny_trainer(tmp_path, [monitor, control], max_epochs=80).fit(model, datamodule=dm)

    rows = {(r["feature"], r["attack"], r["slice"]): r for r in monitor.last_result.rows}
    assert rows[("loss", "threshold", "all")]["train_acc"] > 0.99
    for key in (("loss", "threshold", "all"), ("confidence", "logistic_regression", "all")):
        # well above chance: 0.5 + more than 3 std of the mean over 5 repeats of 30 + 30 evaluation samples
        assert rows[key]["balanced_accuracy"] > 0.6, rows[key]
        assert rows[key]["auc"] > 0.6, rows[key]
    # early in training the leak is smaller than at the end
    first = [r for r in monitor_history(tmp_path) if r["epoch"] == 4 and r["slice"] == "all"
             and r["feature"] == "loss" and r["attack"] == "threshold"][0]
    assert first["balanced_accuracy"] < rows[("loss", "threshold", "all")]["balanced_accuracy"]

    n_eval = control.last_result.rows[0]["n_members"] * 0.2 * 2
    three_sigma = 3 * np.sqrt(0.25 / n_eval)
    for r in control.last_result.rows:
        if r["slice"] == "all":
            assert abs(r["balanced_accuracy"] - 0.5) < three_sigma + 0.03, r


def monitor_history(tmp_path):
    from lightning_mia.report.history import read_history

    return read_history(str(tmp_path / "run" / "version_0" / "mia" / "history.csv"))
