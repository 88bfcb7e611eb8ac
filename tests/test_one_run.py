"""One-run auditing with canaries in the monitor (Steinke, Nasr & Jagielski 2023), and epsilon lower bounds next to
the DP accountant. References: the canaries' own coins (from the datamodule), bounds.one_run_audit recomputed
from the saved canary scores' order, and the accountant's epsilon (which a valid bound may never exceed)."""
import math

import pytest

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import SyntheticDataModule
from lightning_mia.module import ImageClassifier
from lightning_mia.protocols import StandardProtocol
from lightning_mia.report.history import read_history
from tests.helpers import tiny_trainer


def _dm(signal=1.0, canaries=200):
    return SyntheticDataModule(input_shape=(1, 8, 8), num_classes=4, n_train=400, n_heldout=300, signal=signal,
                               batch_size=32, seed=0, canaries={"count": canaries, "seed": 1})


def _rows(tmp_path, model, dm, epochs, **kw):
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(
        repeats=1), ratio=1.0, verbose=False, report_at_end=False, **kw)
    tiny_trainer(tmp_path, [monitor], max_epochs=epochs).fit(model, datamodule=dm)
    return [r for r in read_history(str(tmp_path / "run" / "version_0" / "mia" / "history.csv"))
            if r["slice"] == "canaries"]


def test_canaries_are_audited_each_epoch_with_their_own_coins(tmp_path):
    dm = _dm()
    rows = _rows(tmp_path, ImageClassifier("lenet", optimizer="adam", lr=1e-2), dm, epochs=2, canary_guesses=20)
    dm.setup("fit")
    inc = dm.canary_inclusion()
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert (r["n_members"], r["n_nonmembers"]) == (int(inc.sum()), int((~inc).sum()))
        assert r["canary_guesses"] == 40 and 0 <= r["canary_correct"] <= 40
        assert r["epsilon_one_run"] >= 0


def test_a_model_that_never_trains_gives_a_one_run_bound_of_zero(tmp_path):
    model = ImageClassifier("lenet", optimizer="sgd", lr=1e-12, momentum=0.0)  # effectively never trains
    rows = _rows(tmp_path, model, _dm(canaries=300), epochs=2)
    assert all(r["epsilon_one_run"] == 0.0 for r in rows), [r["epsilon_one_run"] for r in rows]


@pytest.mark.slow
def test_memorised_canaries_give_a_positive_bound(tmp_path):
    """Pure-noise images with random labels can only be memorised: the included canaries' losses fall."""
    model = ImageClassifier("lenet", optimizer="adam", lr=3e-3)
    rows = _rows(tmp_path, model, _dm(signal=0.0, canaries=300), epochs=30, every_n_epochs=29)
    assert rows[-1]["epsilon_one_run"] > 0.5 and rows[-1]["canary_correct"] / rows[-1]["canary_guesses"] > 0.7


@pytest.mark.slow
def test_one_run_and_epsilon_bounds_never_exceed_the_dp_accountant(tmp_path):
    pytest.importorskip("opacus")
    from lightning_mia.dp import DPConfig

    model = ImageClassifier("lenet", optimizer="sgd", lr=0.5, momentum=0.0,
                            dp=DPConfig(noise_multiplier=0.8, max_grad_norm=1.0))
    monitor_rows = _rows(tmp_path, model, _dm(signal=0.0, canaries=300), epochs=3)
    history = read_history(str(tmp_path / "run" / "version_0" / "mia" / "history.csv"))
    for r in history:
        eps = r["dp_epsilon"]
        assert math.isfinite(eps) and eps > 0
        for key in ("epsilon_one_run", "epsilon_lb"):
            if key in r and math.isfinite(r[key]):
                assert r[key] <= eps, (key, r[key], eps)  # else the accountant or the bound is wrong
    assert monitor_rows
