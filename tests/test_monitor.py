"""The monitor on tiny synthetic runs: contracted files, tags, options, errors."""
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import SyntheticDataModule
from lightning_mia.module import ImageClassifier
from lightning_mia.report.history import HISTORY_COLUMNS, read_history
from lightning_mia.protocols import StandardProtocol
from tests.helpers import scalars, tiny_trainer


def _dm(**kw):
    args = dict(input_shape=(1, 8, 8), num_classes=3, n_train=96, n_heldout=64, signal=1.0, batch_size=32, seed=0)
    args.update(kw)
    return SyntheticDataModule(**args)


def _model():
    return ImageClassifier("lenet", optimizer="adam", lr=1e-2)


def test_tiny_run_writes_contracted_files_and_tags(tmp_path):
    monitor = MembershipInferenceMonitor(features=["confidence", "loss"], attacks=["threshold", "logistic_regression"],
                                         protocol=StandardProtocol(repeats=1), ratio=1.0, save_predictions=True, verbose=False,
                                         report_at_end=False)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=2)
    trainer.fit(_model(), datamodule=_dm())
    run = tmp_path / "run" / "version_0"
    mia = run / "mia"
    assert (mia / "audit.json").exists()
    rows = read_history(str(mia / "history.csv"))
    assert set(HISTORY_COLUMNS) <= set(rows[0])
    combos = {(r["feature"], r["attack"]) for r in rows}
    # threshold needs a 1-D input: it runs on the loss, not on the 3-D confidence vector
    assert combos == {("confidence", "logistic_regression"), ("loss", "threshold"), ("loss", "logistic_regression")}
    assert sorted({r["epoch"] for r in rows}) == [0, 1]
    assert len(rows) == 2 * 3 * 3
    for r in rows:
        if r["slice"] == "all":
            assert (r["n_members"], r["n_nonmembers"]) == (64, 64)

    tags = scalars(run)
    for f, a in combos:
        for s in ("all", "correct", "misclassified"):
            key = f"mia/{f}/{a}/{s}/n_members"
            assert [step for step, _ in tags[key]] == [0, 1], key
    assert [step for step, _ in tags["target/train_acc"]] == [0, 1]
    assert [step for step, _ in tags["mia/loss/threshold/all/balanced_accuracy"]] == [0, 1]

    # predictions recompute the history with scikit-learn (protocol=StandardProtocol(repeats=1): the saved split is the only one)
    pred = np.load(mia / "predictions" / "epoch_0001.npz")
    for key in ("index", "is_member", "correct", "fold", "score__loss__threshold"):
        assert key in pred.files
    last = {(r["feature"], r["attack"], r["slice"]): r for r in rows if r["epoch"] == 1}
    for f, a in combos:
        s = pred[f"score__{f}__{a}"]
        ev = pred[f"fold__{f}__{a}"] == 1
        assert np.isnan(s[~ev]).all() and np.isfinite(s[ev]).all()
        auc = roc_auc_score(pred["is_member"][ev], s[ev])
        assert last[(f, a, "all")]["auc"] == pytest.approx(auc, abs=1e-9)
        corr = ev & pred["correct"]
        if len(set(pred["is_member"][corr])) == 2:
            assert last[(f, a, "correct")]["auc"] == pytest.approx(
                roc_auc_score(pred["is_member"][corr], s[corr]), abs=1e-9)
    # train / test accuracy columns are the target model's accuracy on the audit pool
    assert last[("loss", "threshold", "all")]["train_acc"] == pytest.approx(
        pred["correct"][pred["is_member"]].mean())
    assert last[("loss", "threshold", "all")]["test_acc"] == pytest.approx(
        pred["correct"][~pred["is_member"]].mean())


def test_every_n_epochs_and_last_epoch(tmp_path):
    monitor = MembershipInferenceMonitor(every_n_epochs=2, features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1),
                                         verbose=False, report_at_end=False)
    tiny_trainer(tmp_path, [monitor], max_epochs=5).fit(_model(), datamodule=_dm())
    rows = read_history(str(tmp_path / "run" / "version_0" / "mia" / "history.csv"))
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 3, 4]  # the first, every 2nd and the last


def test_fast_dev_run_is_skipped(tmp_path):
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], verbose=False)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=2, fast_dev_run=True)
    trainer.fit(_model(), datamodule=_dm())
    assert monitor.last_epoch == -1 and monitor.last_result is None


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(every_n_epochs=0), ValueError, "every_n_epochs must be an integer >= 1"),
    (dict(features=["confidence", "nope"]), KeyError, "Unknown feature 'nope'. Known features: .*confidence"),
    (dict(attacks=["svm"]), KeyError, "Unknown attack 'svm'. Known attacks: .*logistic_regression"),
    (dict(features=["loss", {"name": "loss"}]), ValueError, "share the tag 'loss'"),
    (dict(features=[{"name": "loss", "tag": "../x"}]), ValueError, "tag '../x' is not allowed"),
    (dict(protocol="shokri"), ValueError, "protocol must be one of .*paper.*standard"),
])
def test_bad_options_are_clear_errors(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        MembershipInferenceMonitor(**kwargs)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(eval_fraction=1.0), r"eval_fraction must be a number in \(0, 1\)"),
    (dict(eval_fraction=0), r"eval_fraction must be a number in \(0, 1\)"),
    (dict(slices=["all", "wrong"]), "slices must be a non-empty list of distinct names from"),
    (dict(slices=[]), "slices must be a non-empty list"),
    (dict(balance="smote"), r"balance must be one of \['undersample', 'oversample', 'class_weight', 'none'\]"),
    (dict(repeats=0), "repeats must be an integer >= 1"),
    (dict(repeats=2.5), "repeats must be an integer >= 1"),
    (dict(fit_per_slice="yes"), "fit_per_slice must be True or False"),
    (dict(eval_ratios=[0.0]), "eval_ratios must be positive finite"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_protocol_options_fail_at_construction(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        StandardProtocol(**kwargs)


def test_protocols_are_frozen_and_named():
    from lightning_mia.protocols import PaperProtocol, build_protocol

    proto = StandardProtocol(repeats=2)
    with pytest.raises(AttributeError, match="frozen"):
        proto.repeats = 5
    assert build_protocol("paper") == PaperProtocol() and build_protocol("standard") == StandardProtocol()
    assert StandardProtocol(seed=None).with_seed(7).seed == 7 and StandardProtocol(seed=3).with_seed(7).seed == 3
    with pytest.raises(ValueError, match=r"attacker_knowledge must be in \[0.1, 0.9\]"):
        PaperProtocol(attacker_knowledge=0.95)
    with pytest.raises(ValueError, match="sampling must be one of"):
        PaperProtocol(sampling="smote")


def test_audit_larger_than_data_is_a_clear_error(tmp_path):
    monitor = MembershipInferenceMonitor(n_members=10_000, features=["loss"], attacks=["threshold"])
    with pytest.raises(ValueError, match="n_members=10000 is outside 1..96"):
        tiny_trainer(tmp_path, [monitor]).fit(_model(), datamodule=_dm())


def test_datasets_without_index_get_a_helpful_error(tmp_path):
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    plain = TensorDataset(x, y)
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], member_dataset=plain,
                                         nonmember_dataset=plain, verbose=False, report_at_end=False)
    with pytest.raises(TypeError, match=r"\(x, y, index\).*IndexedDataset"):
        tiny_trainer(tmp_path, [monitor]).fit(_model(), datamodule=_dm())


def test_user_datasets_and_empty_misclassified_slice(tmp_path):
    """Members the model fits perfectly: the misclassified slice has no members -> NaN metrics and counts."""
    torch.manual_seed(0)
    dm = _dm(signal=4.0)  # easy task: 100% train accuracy quickly
    dm.setup("fit")
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                                         member_dataset=dm.member_dataset(), nonmember_dataset=dm.nonmember_dataset(),
                                         verbose=False, report_at_end=False)
    tiny_trainer(tmp_path, [monitor], max_epochs=8).fit(_model(), datamodule=dm)
    last = {r["slice"]: r for r in monitor.last_result.rows}
    mis = last["misclassified"]
    assert last["all"]["train_acc"] == 1.0
    assert mis["n_members"] == 0
    assert math.isnan(mis["balanced_accuracy"]) and math.isnan(mis["far"])


class _NaNForSome(ImageClassifier):
    """Outputs NaN logits for inputs whose first pixel is large: a partly diverged model."""

    def forward(self, x):
        out = super().forward(x)
        bad = (x[:, 0, 0, 0] > 1.0)[:, None]
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def test_nan_outputs_are_counted_excluded_and_warned(tmp_path):
    dm = _dm()
    dm.setup("fit")
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                                         verbose=False, report_at_end=False)
    with pytest.warns(RuntimeWarning, match=r"(\d+) of 128 audit samples have non-finite 'loss' values") as rec:
        tiny_trainer(tmp_path, [monitor], max_epochs=1).fit(_NaNForSome("lenet", optimizer="sgd", lr=1e-12),
                                                            datamodule=dm)
    # independent count: audit samples whose first pixel exceeds 1
    pos_m, pos_n = monitor.pool.member_positions, monitor.pool.nonmember_positions
    expected = sum(float(dm.member_dataset()[int(p)][0][0, 0, 0]) > 1.0 for p in pos_m) + sum(
        float(dm.nonmember_dataset()[int(p)][0][0, 0, 0]) > 1.0 for p in pos_n)
    assert expected > 0
    msg = [str(w.message) for w in rec if "non-finite" in str(w.message)][0]
    assert msg.startswith(f"{expected} of 128")
    row = monitor.last_result.rows[0]
    assert row["n_dropped"] == expected and row["n_members"] + row["n_nonmembers"] == 128 - expected


def test_overlapping_nonmembers_are_refused(tmp_path):
    dm = _dm()
    dm.setup("fit")
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], member_dataset=dm.member_dataset(),
                                         nonmember_dataset=dm.member_dataset(), verbose=False)
    with pytest.raises(ValueError, match="audit non-members are identical to samples of the training data"):
        tiny_trainer(tmp_path, [monitor]).fit(_model(), datamodule=dm)


def test_audit_file_reuses_pool_and_bad_files_are_refused(tmp_path):
    from lightning_mia.audit import AuditPool

    first = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), seed=5, verbose=False,
                                       report_at_end=False)
    tiny_trainer(tmp_path / "a", [first], max_epochs=1).fit(_model(), datamodule=_dm())
    saved = tmp_path / "a" / "run" / "version_0" / "mia" / "audit.json"
    again = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), seed=0,
                                       audit_file=str(saved), verbose=False, report_at_end=False)
    tiny_trainer(tmp_path / "b", [again], max_epochs=1).fit(_model(), datamodule=_dm())
    assert np.array_equal(again.pool.member_positions, first.pool.member_positions)

    bad = AuditPool(np.array([0, 1, 500]), np.array([0, 1]), seed=0)
    bad.save(str(tmp_path / "bad.json"))
    mon = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], audit_file=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="1 member audit indices are outside the dataset of 96 samples"):
        tiny_trainer(tmp_path / "c", [mon]).fit(_model(), datamodule=_dm())
    with pytest.raises(ValueError, match="does not exist"):
        MembershipInferenceMonitor(audit_file=str(tmp_path / "missing.json"))


def test_same_seed_same_numbers(tmp_path):
    def run(sub):
        mon = MembershipInferenceMonitor(features=["confidence", "loss"], attacks=["logistic_regression"], protocol=StandardProtocol(repeats=2),
                                         verbose=False, report_at_end=False)
        torch.manual_seed(0)
        tiny_trainer(tmp_path / sub, [mon], max_epochs=2).fit(_model(), datamodule=_dm())
        return read_history(str(tmp_path / sub / "run" / "version_0" / "mia" / "history.csv"))

    a, b = run("a"), run("b")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            assert (isinstance(v, float) and math.isnan(v) and math.isnan(rb[k])) or v == rb[k], k


def test_parallel_attack_fitting_gives_the_same_numbers():
    from lightning_mia.auditor import audit_arrays
    from lightning_mia.protocols import StandardProtocol

    rng = np.random.default_rng(0)
    member = np.r_[np.ones(150, bool), np.zeros(150, bool)]
    feats = {"a": rng.normal(size=(300, 3)) + 0.5 * member[:, None], "b": rng.normal(size=(300, 1)) - member[:, None]}
    correct, labels = rng.random(300) < 0.8, rng.integers(0, 3, 300)
    args = (feats, member, correct, labels, ["threshold", "logistic_regression", {"name": "random_forest",
                                                                               "n_estimators": 20}])
    one = audit_arrays(*args, StandardProtocol(repeats=2), n_jobs=1)
    two = audit_arrays(*args, StandardProtocol(repeats=2), n_jobs=2)
    assert [(r["feature"], r["attack"], r["slice"]) for r in one.rows] == [
        (r["feature"], r["attack"], r["slice"]) for r in two.rows]
    for ra, rb in zip(one.rows, two.rows):
        for k, v in ra.items():
            if isinstance(v, float):
                assert (math.isnan(v) and math.isnan(rb[k])) or v == rb[k], k


def test_paper_protocol_matches_evaluate_paper(tmp_path):
    """protocol: paper runs the authors' per-class protocol (reference: evaluate_paper on the same arrays)."""
    from lightning_mia.attacks.paper import evaluate_paper
    from lightning_mia.auditor import audit_arrays
    from lightning_mia.protocols import PaperProtocol

    rng = np.random.default_rng(0)
    member = np.r_[np.ones(120, bool), np.zeros(120, bool)]
    labels = np.tile(np.arange(3), 80)
    X = rng.normal(size=(240, 3)) + 0.7 * member[:, None]
    correct = rng.random(240) < 0.8
    res = audit_arrays({"c": X}, member, correct, labels, ["threshold", "logistic_regression"],
                       PaperProtocol(seed=3), feature_kinds={"c": "gradient_norms"})
    ref = evaluate_paper(X, member, correct, labels, preset="gradient", attack="logistic_regression", seed=3)
    assert [r["slice"] for r in res.rows] == [r["slice"] for r in ref.rows]
    for got, want in zip(res.rows, ref.rows):
        for k, v in want.items():
            if isinstance(v, float):
                assert (math.isnan(v) and math.isnan(got[k])) or got[k] == v, k
    assert res.skipped and res.skipped[0][1] == "threshold"

    monitor = MembershipInferenceMonitor(features=["confidence"], attacks=["threshold", "logistic_regression"],
                                         protocol="paper", ratio=1.0, verbose=False, report_at_end=False)
    tiny_trainer(tmp_path, [monitor], max_epochs=1).fit(_model(), datamodule=_dm(n_train=200, n_heldout=200))
    rows = monitor.last_result.rows
    assert {r["attack"] for r in rows} == {"logistic_regression"}
    assert all(r["repeats"] == 1 and r["n_classes"] >= 1 for r in rows)
    with pytest.raises(ValueError, match="protocol must be one of"):
        MembershipInferenceMonitor(protocol="shokri")


def test_checkpoint_without_monitor_resumes_with_monitor(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    tiny_trainer(tmp_path / "a", [ckpt], max_epochs=1, enable_checkpointing=True).fit(_model(), datamodule=_dm())
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), verbose=False,
                                         report_at_end=False)
    tiny_trainer(tmp_path / "b", [monitor], max_epochs=3).fit(_model(), datamodule=_dm(),
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    rows = read_history(str(tmp_path / "b" / "run" / "version_0" / "mia" / "history.csv"))
    assert sorted({r["epoch"] for r in rows}) == [1, 2]


def test_fit_end_writes_report_and_tensorboard_extras(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_mia.callbacks import EarlyStoppingComparison

    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                                         save_predictions=True, verbose=False)
    es = EarlyStoppingComparison(monitor="val_loss", patience=[1])
    tiny_trainer(tmp_path, [monitor, es], max_epochs=3).fit(_model(), datamodule=_dm())
    run = tmp_path / "run" / "version_0"
    assert (run / "mia" / "report.md").exists() and (run / "mia" / "early_stopping.csv").exists()
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "mia/loss/threshold/scores/member" in tags["histograms"]
    assert len(acc.Histograms("mia/loss/threshold/scores/member")) == 3  # one per audited epoch
    assert any(t.startswith("mia_figures/progress__loss__threshold") for t in tags["images"])
    assert any("early_stopping" in t for t in tags["tensors"])  # text summaries are stored as tensors
    assert acc.summary_metadata  # custom-scalars layout and hparams plugin data are present
    plugins = {m.plugin_data.plugin_name for m in acc.summary_metadata.values()}
    assert {"text", "hparams", "custom_scalars"} <= plugins, plugins


def test_calibrated_feature_is_difference_to_reference_epoch(tmp_path):
    import pytorch_lightning as pl

    class Grab(pl.Callback):  # runs after the monitor: copies what it attacked at each epoch
        def __init__(self, monitor):
            self.monitor, self.seen = monitor, {}

        def on_train_epoch_end(self, trainer, pl_module):
            self.seen[trainer.current_epoch] = {k: v.copy() for k, v in self.monitor.last_features.items()}

    monitor = MembershipInferenceMonitor(features=["loss", "logit_scaled_confidence"], attacks=["threshold"],
                                         calibrate=["logit_scaled_confidence"], reference_epoch=1, protocol=StandardProtocol(repeats=1),
                                         verbose=False, report_at_end=False)
    grab = Grab(monitor)
    tiny_trainer(tmp_path, [monitor, grab], max_epochs=4).fit(_model(), datamodule=_dm())
    assert "logit_scaled_confidence_calibrated" not in grab.seen[1]  # the reference epoch itself
    for e in (2, 3):
        np.testing.assert_allclose(grab.seen[e]["logit_scaled_confidence_calibrated"],
                                   grab.seen[e]["logit_scaled_confidence"] - grab.seen[1]["logit_scaled_confidence"])
    rows = read_history(str(tmp_path / "run" / "version_0" / "mia" / "history.csv"))
    cal = sorted({r["epoch"] for r in rows if r["feature"] == "logit_scaled_confidence_calibrated"})
    assert cal == [2, 3]
    assert monitor.state_dict()["reference"]["epoch"] == 1
    with pytest.raises(ValueError, match="calibrate names features that are not monitored"):
        MembershipInferenceMonitor(features=["loss"], calibrate=["entropy"])


class _FrozenBatchNormNet(pl.LightningModule):
    """The fine-tuning recipe: a BatchNorm frozen with .eval() at train start must stay frozen while the monitor
    audits (an audit that calls model.train() afterwards would unfreeze it)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)
        self.checked_steps = 0

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))

    def on_train_start(self):
        self.bn.eval()
        for p in self.bn.parameters():
            p.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        assert not self.bn.training, f"BatchNorm unfrozen at epoch {self.current_epoch}"
        assert self.training and self.drop.training and self.conv.training
        self.checked_steps += 1
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_frozen_batchnorm_stays_frozen_through_audits(tmp_path):
    net = _FrozenBatchNormNet()
    running_mean = net.bn.running_mean.clone()
    monitor = MembershipInferenceMonitor(features=["loss", "gradient_norms"], attacks=["logistic_regression"],
                                         protocol=StandardProtocol(repeats=1), every_n_epochs=1, verbose=False,
                                         report_at_end=False)
    tiny_trainer(tmp_path, [monitor], max_epochs=3).fit(net, datamodule=_dm())
    assert monitor.last_epoch == 2 and len(monitor.timings) == 3  # audited every epoch
    assert net.checked_steps == 3 * 3  # every training step of epochs 1 and 2 ran after an audit
    torch.testing.assert_close(net.bn.running_mean, running_mean)  # frozen statistics never updated


def test_the_monitor_leaves_training_unchanged(tmp_path):
    # the audit runs the model in eval mode on its own RNG streams: the weights after training with the monitor
    # equal those of the same fit without it (reference), bit for bit
    def train(callbacks, name):
        torch.manual_seed(0)
        dm = SyntheticDataModule(input_shape=(1, 12, 12), num_classes=3, n_train=160, n_heldout=96, signal=1.0,
                                 batch_size=32, seed=0)
        # dropout would show a draw from the global RNG, BatchNorm a running statistic the audit moved
        model = ImageClassifier("densenet", optimizer="adam", lr=1e-3,
                                model_kwargs={"depth": 10, "growth_rate": 4, "drop_rate": 0.2})
        tiny_trainer(tmp_path / name, callbacks, max_epochs=3).fit(model, datamodule=dm)
        return model.state_dict()

    plain = train([], "plain")
    monitor = MembershipInferenceMonitor(features=["confidence", "loss", "gradient_norms"],
                                         attacks=["threshold", "logistic_regression"], every_n_epochs=1,
                                         protocol=StandardProtocol(repeats=2), verbose=False, report_at_end=False)
    audited = train([monitor], "audited")
    assert monitor.last_epoch == 2 and len(monitor.timings) == 3
    assert plain.keys() == audited.keys()
    for k in plain:
        assert torch.equal(plain[k], audited[k]), k
