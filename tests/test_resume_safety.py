"""Nothing lost, nothing mixed, nothing trusted blindly: resuming through the CLI with ``weights_only`` loads, the
audit pool's index values, fingerprints refusing a changed audit, label checks, links at every written path,
TensorBoard steps after a kill, corrupt histories, strict audit files and CIFAR archives.

References are independent of the code under test: the datasets' own items (``ds[i][2]``), hand-written files,
``torch.load(weights_only=True)``, TensorBoard's ``EventAccumulator`` and ``os.lstat``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_mia.audit import (AuditPool, check_dataset_labels, check_labels, make_audit_pool, pool_indices,
                                 pool_labels)
from lightning_mia.data import CIFARDataModule, CorruptDataError, DigitsDataModule, SyntheticDataModule
from lightning_mia.fingerprint import (AuditResume, check_resume, differences, find_saved_fingerprint, fingerprint,
                                       read_fingerprint, resume_plan)
from lightning_mia.io import atomic_save_figure
from lightning_mia.report.history import (drop_tensorboard_steps, expected_audit_epochs, read_history,
                                          resume_history, validate_history, write_history)
from tests.helpers import scalars

ROOT = Path(__file__).resolve().parents[1]
KEY = ("epoch", "feature", "attack", "slice")


def _key(r):
    return tuple(r[k] for k in KEY)


# ==========================================================================================================
# the CLI: resume every stateful option with weights_only=True (items 1, 2, 3, 6)
# ==========================================================================================================
CLI_CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: resume, version: 0}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, every_n_epochs: 1, save_top_k: -1, enable_version_counter: false}
data:
  class_path: lightning_mia.data.DigitsDataModule
  init_args: {train_subset: 120, heldout_subset: 100, batch_size: 32}
mia:
  n_members: 60
  n_nonmembers: 60
  calibrate: [loss]
  save_predictions: true
  verbose: false
  report_at_end: false
  protocol: {class_path: StandardProtocol, init_args: {repeats: 1}}
es: {patience: [1]}
"""


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _monitor_state(ckpt):
    states = {k: v for k, v in ckpt["callbacks"].items() if str(k).startswith("MembershipInferenceMonitor")}
    assert len(states) == 1, list(ckpt["callbacks"])
    return next(iter(states.values()))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-epoch CLI run with a checkpoint: ``(directory, config path)``; tests resume copies of it."""
    d = tmp_path_factory.mktemp("base")
    (d / "cfg.yaml").write_text(CLI_CONFIG)
    out = _cli(["fit", "--config", "cfg.yaml"], d)
    assert out.returncode == 0, out.stderr[-4000:]
    return d


def _copy(base, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base, d, symlinks=True)
    return d


@pytest.mark.slow
def test_cli_resume_restores_every_stateful_option_with_weights_only(base_run, tmp_path):
    d = _copy(base_run, tmp_path)
    ckpt = torch.load(d / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")  # what LightningCLI does
    state = _monitor_state(ckpt)
    assert state["last_epoch"] == 1 and state["reference"]["epoch"] == 0 and state["pool"]["n_members"] == 60
    assert any("EarlyStoppingComparison" in str(k) for k in ckpt["callbacks"])

    out = _cli(["fit", "--config", "cfg.yaml", "--trainer.max_epochs", "4", "--ckpt_path", "ckpt/last.ckpt"], d)
    assert out.returncode == 0, out.stderr[-4000:]
    run = d / "runs" / "resume" / "version_0"
    rows = read_history(str(run / "mia" / "history.csv"))
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated history rows"
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2, 3]
    combos = {e: {k[1:] for k in keys if k[0] == e and not k[1].endswith("_calibrated")} for e in range(4)}
    assert all(combos[e] == combos[0] for e in range(4)), combos
    # the calibration reference survived: calibrated rows on every epoch after the reference epoch, after resume too
    assert all(any(k[0] == e and k[1] == "loss_calibrated" for k in keys) for e in (1, 2, 3))
    final = _monitor_state(torch.load(d / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu"))
    assert final["last_epoch"] == 3 and final["reference"]["epoch"] == 0
    es = json.loads((run / "mia" / "early_stopping.json").read_text())
    assert len(es["values"]) == 4 and es["last_epoch"] == 3
    assert sorted(p.name for p in (run / "mia" / "predictions").glob("*.npz")) == [
        f"epoch_{e:04d}.npz" for e in range(4)]
    tags = scalars(run)
    mia_tags = [t for t in tags if t.startswith("mia/loss/threshold/all/")]
    assert mia_tags
    for t in mia_tags + ["target/train_acc"]:
        assert [s for s, _ in tags[t]] == [0, 1, 2, 3], t


@pytest.mark.slow
def test_cli_audit_json_holds_the_samples_index_values(base_run):
    # train_subset / heldout_subset: positions in the subset differ from the samples' index in the full split
    mia = base_run / "runs" / "resume" / "version_0" / "mia"
    audit = json.loads((mia / "audit.json").read_text())
    pred = np.load(mia / "predictions" / "epoch_0001.npz")
    member = pred["is_member"].astype(bool)
    assert sorted(audit["member_indices"]) == sorted(pred["index"][member].tolist())
    assert sorted(audit["nonmember_indices"]) == sorted(pred["index"][~member].tolist())
    assert audit["member_indices"] != audit["member_positions"]
    assert audit["fingerprint"]["pool"]["n_members"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("args, what", [
    (["--mia.seed", "1"], "the monitor's seed changed: 0 -> 1"),
    (["--mia.features", "[loss]"], "the features changed"),
    (["--mia.every_n_epochs", "2"], "every_n_epochs (the audit cadence) changed: 1 -> 2"),
    (["--data.init_args.seed", "1"], "the data split changed"),
])
def test_cli_resume_with_a_changed_audit_is_refused(base_run, tmp_path, args, what):
    d = _copy(base_run, tmp_path)
    history = (d / "runs" / "resume" / "version_0" / "mia" / "history.csv").read_bytes()
    out = _cli(["fit", "--config", "cfg.yaml", "--trainer.max_epochs", "4", "--ckpt_path", "ckpt/last.ckpt", *args], d)
    assert out.returncode != 0
    assert what in out.stderr, out.stderr[-3000:]
    assert "new run directory" in out.stderr and "--trainer.logger.init_args.version" in out.stderr
    assert (d / "runs" / "resume" / "version_0" / "mia" / "history.csv").read_bytes() == history  # untouched


@pytest.mark.slow
def test_cli_changed_audit_in_a_new_logger_version_starts_afresh(base_run, tmp_path):
    d = _copy(base_run, tmp_path)
    out = _cli(["fit", "--config", "cfg.yaml", "--trainer.max_epochs", "4", "--ckpt_path", "ckpt/last.ckpt",
                "--mia.seed", "1", "--trainer.logger.init_args.version", "1"], d)
    assert out.returncode == 0, out.stderr[-4000:]
    new = d / "runs" / "resume" / "version_1" / "mia"
    assert sorted({r["epoch"] for r in read_history(str(new / "history.csv"))}) == [2, 3]
    assert json.loads((new / "audit.json").read_text())["seed"] == 1
    old = read_history(str(d / "runs" / "resume" / "version_0" / "mia" / "history.csv"))
    assert sorted({r["epoch"] for r in old}) == [0, 1]


@pytest.mark.slow
def test_cli_and_report_replace_links_at_every_path_they_write(base_run, tmp_path):
    first = base_run / "runs" / "resume" / "version_0" / "mia"
    out = _cli(["report", str(first)[: -len("/mia")]], base_run)
    assert out.returncode == 0, out.stderr[-3000:]
    written = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    for name in ("history.csv", "audit.json", "early_stopping.json", "early_stopping.csv", "report.md"):
        assert name in written
    assert any(w.startswith("figures/") for w in written) and any(w.startswith("predictions/") for w in written)

    d = tmp_path / "fresh"
    d.mkdir()
    (d / "cfg.yaml").write_text(CLI_CONFIG)
    mia = d / "runs" / "resume" / "version_0" / "mia"
    victims = tmp_path / "victims"
    victims.mkdir()
    for k, rel in enumerate(written):
        victim = victims / f"v{k}"
        victim.write_text("not yours\n")
        (mia / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(victim, mia / rel)
    out = _cli(["fit", "--config", "cfg.yaml"], d)
    assert out.returncode == 0, out.stderr[-4000:]
    out = _cli(["report", str(mia.parent)], d)
    assert out.returncode == 0, out.stderr[-3000:]
    for k, rel in enumerate(written):
        assert (victims / f"v{k}").read_text() == "not yours\n", rel
        assert not os.path.islink(mia / rel), f"{rel} is still a link"
    assert not os.path.islink(mia / "history.csv") and read_history(str(mia / "history.csv"))


# ==========================================================================================================
# item 2: the pool records the samples' own index values
# ==========================================================================================================
def _synthetic(**kw):
    args = dict(input_shape=(1, 4, 4), num_classes=3, n_train=60, n_heldout=40, signal=1.0, batch_size=16, seed=0)
    args.update(kw)
    dm = SyntheticDataModule(**args)
    dm.setup("fit")
    return dm


def test_pool_indices_are_the_items_index_not_positions(tmp_path):
    from lightning_mia.extraction import extract_pass
    from lightning_mia.features import FEATURES
    from lightning_mia.module import ImageClassifier

    dm = _synthetic(train_subset=30, heldout_subset=25)
    members, nonmembers = dm.member_dataset(), dm.nonmember_dataset()
    pool = make_audit_pool(len(members), len(nonmembers), n_members=20, n_nonmembers=15, seed=3)
    assert pool_indices(members, pool.member_positions).tolist() == [
        int(members[int(p)][2]) for p in pool.member_positions]
    path = tmp_path / "audit.json"
    pool.save(str(path), members, nonmembers)
    saved = json.loads(path.read_text())
    assert saved["member_positions"] == pool.member_positions.tolist()
    assert saved["member_indices"] != saved["member_positions"]
    # the reference: what the audit pass itself reports as each sample's index
    model = ImageClassifier("lenet", num_classes=3, input_shape=(1, 4, 4), optimizer="sgd", lr=0.1)
    feats = {"loss": FEATURES["loss"]()}
    for side, ds in (("member", members), ("nonmember", nonmembers)):
        got = extract_pass(model, ds, saved[f"{side}_positions"], feats, batch_size=8)
        assert saved[f"{side}_indices"] == got.index.tolist()
    back = AuditPool.load(str(path))
    assert back.member_indices.tolist() == saved["member_indices"]


def test_pool_without_datasets_does_not_claim_positions_are_indices(tmp_path):
    pool = make_audit_pool(50, 20, seed=0)
    pool.save(str(tmp_path / "a.json"))
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["member_indices"] is None and saved["member_positions"] == pool.member_positions.tolist()


def test_attach_indices_refuses_a_pool_of_another_split():
    a, b = _synthetic(train_subset=30, seed=0), _synthetic(train_subset=30, seed=1)
    pool = make_audit_pool(30, 40, n_members=10, n_nonmembers=10, seed=0).attach_indices(
        a.member_dataset(), a.nonmember_dataset())
    pool.attach_indices(a.member_dataset(), a.nonmember_dataset())  # the same data: fine
    with pytest.raises(ValueError, match=r"member audit pool does not match the member dataset: position \d+ was "
                                         r"the sample with index \d+ and now holds index \d+"):
        pool.attach_indices(b.member_dataset(), b.nonmember_dataset())


def test_pool_indices_of_a_plain_dataset_and_a_subset():
    from torch.utils.data import Subset, TensorDataset

    from lightning_mia.data import IndexedDataset

    ds = IndexedDataset(TensorDataset(torch.zeros(10, 1, 2, 2), torch.arange(10) % 2))
    assert pool_indices(ds, [3, 7]).tolist() == [3, 7]
    dm = _synthetic(train_subset=30)
    sub = Subset(dm.member_dataset(), [5, 6, 7])  # Subset.indices are positions in its parent, not item indices
    assert pool_indices(sub, [0, 2]).tolist() == [int(sub[0][2]), int(sub[2][2])]
    assert pool_labels(dm.member_dataset(), [0, 1]).tolist() == [int(dm.member_dataset()[i][1]) for i in (0, 1)]


# ==========================================================================================================
# item 3: fingerprints
# ==========================================================================================================
def _monitor(**kw):
    from lightning_mia.callbacks import MembershipInferenceMonitor

    args = dict(features=["loss"], attacks=["threshold"], verbose=False, report_at_end=False)
    args.update(kw)
    return MembershipInferenceMonitor(**args)


def _fp(monitor=None, dm=None, pool_seed=0):
    monitor = monitor or _monitor()
    dm = dm or _synthetic()
    m, n = dm.member_dataset(), dm.nonmember_dataset()
    pool = make_audit_pool(len(m), len(n), ratio=monitor.ratio, seed=pool_seed).attach_indices(m, n)
    return fingerprint(monitor, pool, m, n)


def test_fingerprint_is_deterministic_checkpoint_and_json_safe(tmp_path):
    a, b = _fp(), _fp()
    assert a == b and differences(a, b) == []
    torch.save({"fp": a}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["fp"] == a
    assert json.loads(json.dumps(a)) == a


@pytest.mark.parametrize("change, message", [
    (dict(monitor=dict(seed=1)), "the monitor's seed changed: 0 -> 1"),
    (dict(monitor=dict(features=["loss", "confidence"])), "the features changed: [loss] -> [loss, confidence]"),
    (dict(monitor=dict(every_n_epochs=3)), "every_n_epochs (the audit cadence) changed: 1 -> 3"),
    (dict(monitor=dict(calibrate=["loss"])), "calibrate changed"),
    (dict(data=dict(seed=1)), "the data split changed: the member (training) dataset holds other samples"),
    (dict(data=dict(train_subset=50)), "the member (training) dataset had 60 samples and now has 50"),
    (dict(data=dict(signal=2.0)), "the data split changed"),
])
def test_check_resume_names_what_changed(change, message):
    saved = _fp()
    current = _fp(_monitor(**change.get("monitor", {})), _synthetic(**change.get("data", {})))
    with pytest.raises(ValueError) as err:
        check_resume(saved, current, "runs/x/version_0")
    text = str(err.value)
    assert message in text, text
    assert "in runs/x/version_0" in text and "mix two audits" in text
    assert "new run directory" in text and "--trainer.logger.init_args.version" in text
    assert "cannot be audited again" in text


def test_fingerprint_sees_a_digits_split_with_another_seed():
    def fp(seed):
        dm = DigitsDataModule(seed=seed, train_subset=100, heldout_subset=80)
        dm.setup("fit")
        return _fp(dm=dm)

    assert differences(fp(0), fp(0)) == []
    assert any("data split changed" in d for d in differences(fp(0), fp(1)))


def test_fingerprint_ignores_settings_that_do_not_change_the_audit():
    assert differences(_fp(), _fp(_monitor(batch_size=7, n_jobs=2, verbose=True, save_predictions=True))) == []


def test_a_dataset_with_random_inputs_is_not_reported_as_changed():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return torch.rand(1, 2, 2), torch.tensor(i % 2), torch.tensor(i)

    m, n = Noisy(), Noisy()
    pool = make_audit_pool(30, 30, ratio=1.0, seed=0).attach_indices(m, n)
    assert differences(fingerprint(_monitor(), pool, m, n), fingerprint(_monitor(), pool, m, n)) == []


def test_resume_plan_continues_refuses_or_starts_afresh():
    same, other = _fp(), _fp(_monitor(seed=2))
    assert resume_plan(same, same, same) is True           # resume into the same run directory
    assert resume_plan(same, None, same) is True           # resume into a new directory, same audit
    assert resume_plan(other, None, same) is False         # new directory, changed audit: a fresh audit there
    assert resume_plan(None, None, same) is True           # a checkpoint without fingerprint: nothing to compare
    with pytest.raises(ValueError, match="seed changed"):
        resume_plan(other, other, same)                    # the run directory holds the other audit
    with pytest.raises(ValueError, match="seed changed"):
        resume_plan(None, other, same)                     # the state key changed: the directory still tells


def test_find_saved_fingerprint_also_under_a_changed_state_key(tmp_path):
    fp = _fp()
    states = {"MembershipInferenceMonitor{'every_n_epochs': 1, 'seed': 0}": {"fingerprint": fp},
              "EarlyStoppingComparison{...}": {}}
    assert find_saved_fingerprint(states, "MembershipInferenceMonitor{'every_n_epochs': 1, 'seed': 0}") == fp
    assert find_saved_fingerprint(states, "MembershipInferenceMonitor{'every_n_epochs': 2, 'seed': 0}") == fp
    assert find_saved_fingerprint({}, "x") is None and find_saved_fingerprint(None, "x") is None
    p = tmp_path / "audit.json"
    assert read_fingerprint(str(p)) is None
    p.write_text(json.dumps({"fingerprint": fp}))
    assert read_fingerprint(str(p)) == fp
    p.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="audit.json is unreadable"):
        read_fingerprint(str(p))


def _fit_with_checkpoint(root, monitor, epochs, ckpt_path=None, dm=None, **trainer_kw):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_mia.module import ImageClassifier

    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[monitor, ckpt],
                         logger=TensorBoardLogger(str(root), name="run", version=trainer_kw.pop("version", 0)),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True, **trainer_kw)
    trainer.fit(ImageClassifier("lenet", optimizer="sgd", lr=0.05), datamodule=dm or _synthetic(),
                ckpt_path=ckpt_path)
    return trainer


def test_monitor_state_holds_the_fingerprint_and_audit_json_too(tmp_path):
    monitor = _monitor(protocol="standard")
    _fit_with_checkpoint(tmp_path, monitor, 1)
    state = _monitor_state(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True))
    assert state["fingerprint"]["monitor"]["seed"] == 0
    saved = json.loads((tmp_path / "run" / "version_0" / "mia" / "audit.json").read_text())
    assert saved["fingerprint"] == state["fingerprint"]
    assert saved["member_indices"] == [int(i) for i in saved["member_indices"]] and saved["member_indices"]


def test_audit_resume_seal_checks_and_fingerprints():
    dm = _synthetic()
    m, n = dm.member_dataset(), dm.nonmember_dataset()
    guard = AuditResume()
    pool = guard.seal(_monitor(), make_audit_pool(len(m), len(n), ratio=1.0, seed=0), m, n)
    assert guard.current == pool.fingerprint and pool.member_indices is not None
    with pytest.raises(ValueError, match="audit non-members are identical to samples of the training data"):
        AuditResume().seal(_monitor(), make_audit_pool(len(m), len(m), ratio=1.0, seed=0), m, m)


# ==========================================================================================================
# items 4/5: labels
# ==========================================================================================================
def test_check_labels_names_the_first_bad_sample():
    check_labels(np.array([0, 1, 2]), 3, "member dataset")
    check_labels(np.array([], np.int64), 3, "member dataset")
    with pytest.raises(ValueError, match=r"member dataset holds a label outside 0\.\.2: sample with index 41 has "
                                         r"label -1 \(2 bad labels in all\)"):
        check_labels(np.array([0, -1, 1, 7]), 3, "member dataset", indices=[40, 41, 42, 43])
    with pytest.raises(ValueError, match="sample with index 2 has label 3 "):
        check_labels(np.array([0, 1, 3]), 3, "non-member dataset")
    with pytest.raises(ValueError, match="non-integer label: sample with index 1 has label 1.5"):
        check_labels(np.array([0.0, 1.5]), 3, "member dataset")
    with pytest.raises(ValueError, match="non-integer label: sample with index 0 has label nan"):
        check_labels(np.array([np.nan]), 3, "member dataset")
    check_labels(np.array([0.0, 2.0]), 3, "member dataset")  # integral floats are class numbers
    with pytest.raises(ValueError, match=r"outside 0\.\.: sample with index 0 has label -1"):
        check_labels([-1], None, "member dataset")


def test_check_dataset_labels_reads_the_items():
    from torch.utils.data import TensorDataset

    from lightning_mia.data import IndexedDataset

    ds = IndexedDataset(TensorDataset(torch.zeros(5, 1, 2, 2), torch.tensor([0, 1, -1, 1, 0])))
    check_dataset_labels(ds, [0, 1, 3], 2, "member dataset")
    with pytest.raises(ValueError, match="sample with index 2 has label -1"):
        check_dataset_labels(ds, [0, 2, 4], 2, "member dataset")


def test_monitor_refuses_negative_labels_in_the_audit_datasets(tmp_path):
    from torch.utils.data import TensorDataset

    from lightning_mia.data import IndexedDataset

    dm = _synthetic()
    x, y, _ = dm.member_dataset().tensors()
    y = y.clone()
    y[5] = -1
    members = IndexedDataset(TensorDataset(x, y))
    monitor = _monitor(member_dataset=members, nonmember_dataset=dm.nonmember_dataset(), n_members=60, ratio=1.5)
    with pytest.raises(ValueError, match="member dataset holds a label outside 0..2: sample with index 5 has label -1"):
        _fit_with_checkpoint(tmp_path, monitor, 1, dm=dm)


# ==========================================================================================================
# item 6: figures through the atomic writer
# ==========================================================================================================
def test_atomic_save_figure_replaces_a_link_and_leaves_its_target(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "figures" / "f.png"
    target.parent.mkdir()
    os.symlink(victim, target)
    fig = plt.figure()
    fig.gca().plot([0, 1], [1, 0])
    atomic_save_figure(fig, str(target), dpi=50)
    plt.close(fig)
    assert victim.read_text() == "keep me"
    assert not os.path.islink(target) and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp")]
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_figure_of_the_report_replaces_links(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_mia.report.plots import save_figure

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "f.png")
    fig = plt.figure()
    save_figure(fig, str(tmp_path / "f.png"))
    plt.close(fig)
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "f.png")


# ==========================================================================================================
# item 7: TensorBoard steps a killed run wrote after its last checkpoint
# ==========================================================================================================
def _events(d, values):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(d))
    for tag, step, value in values:
        w.add_scalar(tag, value, step)
    w.close()
    return w


def _pretend_dead(d):
    """Rename this process's event files as if another (killed) process had written them."""
    for p in Path(d).glob("events.out.tfevents.*"):
        parts = p.name.split(".")
        parts[3], parts[-2] = str(int(parts[3]) - 100), str(os.getpid() + 1)  # earlier, and another process
        p.rename(p.with_name(".".join(parts)))


def test_drop_tensorboard_steps_keeps_lightning_metrics_and_one_value_per_step(tmp_path):
    d = tmp_path / "version_0"
    _events(d, [v for e in range(4) for v in (("train_loss", 10 * e + 9, 1.0 / (e + 1)), ("mia/a/b/all/auc", e, e),
                                              ("target/test_acc", e, e / 10), ("mia_detail/x", e, e))])
    _pretend_dead(d)
    with open(next(d.glob("events.*")), "ab") as fh:
        fh.write(b"\x30\x00\x00\x00")  # the killed writer's torn last record
    changed = drop_tensorboard_steps(str(d), 2)
    assert len(changed) == 1
    _events(d, [(t, e, e + 0.5) for e in (2, 3, 4) for t in ("mia/a/b/all/auc", "target/test_acc")])
    tags = scalars(d)
    assert [s for s, _ in tags["train_loss"]] == [9, 19, 29, 39]  # Lightning's own metrics: all kept
    assert tags["mia/a/b/all/auc"] == [(0, 0.0), (1, 1.0), (2, 2.5), (3, 3.5), (4, 4.5)]
    assert [s for s, _ in tags["target/test_acc"]] == [0, 1, 2, 3, 4]
    assert [s for s, _ in tags["mia_detail/x"]] == [0, 1]


def test_drop_tensorboard_steps_leaves_live_and_corrupt_files(tmp_path):
    d = tmp_path / "v"
    _events(d, [("mia/x", e, e) for e in range(3)])  # this process's file: a live writer may hold it
    live = next(d.glob("events.*")).read_bytes()
    assert drop_tensorboard_steps(str(d), 0) == [] and next(d.glob("events.*")).read_bytes() == live
    _pretend_dead(d)
    p = next(d.glob("events.*"))
    raw = bytearray(p.read_bytes())
    raw[8] ^= 0xFF  # the first record's header checksum
    p.write_bytes(bytes(raw))
    assert drop_tensorboard_steps(str(d), 0) == [] and p.read_bytes() == bytes(raw)
    assert drop_tensorboard_steps(str(tmp_path / "missing"), 0) == []


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, warnings
    sys.path.insert(0, {root!r})
    import pytorch_lightning as pl, torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger
    from lightning_mia.callbacks import MembershipInferenceMonitor
    from lightning_mia.data import SyntheticDataModule
    from lightning_mia.module import ImageClassifier
    from lightning_mia.protocols import StandardProtocol

    out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0)

    class Kill(pl.Callback):  # after the monitor wrote epoch kill_at, before ModelCheckpoint saved it
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=90, n_heldout=60, batch_size=16, seed=0)
    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(repeats=1),
                                         ratio=1.5, verbose=False, report_at_end=False)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, callbacks=[monitor, Kill(), ckpt],
                         logger=TensorBoardLogger(out, name="run", version=0), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    model = ImageClassifier("lenet", optimizer="sgd", lr=0.05)
    trainer.fit(model, datamodule=dm, ckpt_path=os.path.join(out, "ckpt", "last.ckpt") if resume else None)
""")


@pytest.mark.slow
def test_kill_between_tensorboard_write_and_checkpoint_then_resume(tmp_path):
    script = tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.run([sys.executable, str(script), str(tmp_path), "2", "fresh"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run = tmp_path / "run" / "version_0"
    tag = next(t for t in scalars(run) if t.startswith("mia/loss/threshold/all/"))
    assert [s for s, _ in scalars(run)[tag]] == [0, 1, 2]  # epoch 2 reached TensorBoard, not the checkpoint
    second = subprocess.run([sys.executable, str(script), str(tmp_path), "-1", "resume"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    tags = scalars(run)
    rows = read_history(str(run / "mia" / "history.csv"))
    assert sorted(_key(r) for r in rows) == sorted({_key(r) for r in rows})
    metric = tag.rsplit("/", 1)[1]
    for t in (tag, "target/train_acc"):
        assert [s for s, _ in tags[t]] == [0, 1, 2, 3], t
    hist = {r["epoch"]: r[metric] for r in rows
            if (r["feature"], r["attack"], r["slice"]) == ("loss", "threshold", "all")}
    for step, value in tags[tag]:  # TensorBoard holds what the history holds: the resumed audit of epoch 2
        assert value == pytest.approx(hist[step], abs=1e-6), step


# ==========================================================================================================
# item 8: a corrupt history.csv on resume
# ==========================================================================================================
def _history(path, epochs=(0, 1, 2)):
    write_history(str(path), [{"epoch": e, "feature": "loss", "attack": "threshold", "slice": s,
                               "balanced_accuracy": 0.5 + e / 10} for e in epochs for s in ("all", "correct")])
    return path.read_bytes()


def test_validate_history_of_a_good_file(tmp_path):
    p = tmp_path / "history.csv"
    _history(p)
    rows, warnings = validate_history(str(p), [0, 1, 2])
    assert warnings == [] and [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert json.dumps(rows) == json.dumps(read_history(str(p)))  # NaN-safe equality


def test_validate_history_keeps_text_in_extra_columns(tmp_path):
    p = tmp_path / "history.csv"
    write_history(str(p), [{"epoch": 0, "feature": "loss", "attack": "threshold", "slice": "all", "note": "ok"}])
    rows, warnings = validate_history(str(p), [0])
    assert rows[0]["note"] == "ok" and warnings == []


def test_validate_history_drops_a_torn_last_row(tmp_path):
    p = tmp_path / "history.csv"
    raw = _history(p)
    p.write_bytes(raw[:-9])  # cut inside the last row
    rows, warnings = validate_history(str(p), [0, 1, 2])
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]
    assert len(warnings) == 1 and "line 7: dropped a torn last row" in warnings[0] and str(p) in warnings[0]


def test_validate_history_names_epochs_that_are_gone(tmp_path):
    p = tmp_path / "history.csv"
    raw = _history(p)
    p.write_bytes(b"\n".join(raw.split(b"\n")[:3]) + b"\n")  # header + the rows of epoch 0
    rows, warnings = validate_history(str(p), [0, 1, 2])
    assert {r["epoch"] for r in rows} == {0}
    assert "the audits of epochs 1, 2 are lost" in warnings[0]
    assert "re-auditing a past epoch is impossible" in warnings[0]


@pytest.mark.parametrize("content", [None, b"", b"\n\n"], ids=["deleted", "empty", "blank"])
def test_validate_history_of_a_missing_or_empty_file(tmp_path, content):
    p = tmp_path / "history.csv"
    if content is not None:
        p.write_bytes(content)
    rows, warnings = validate_history(str(p), [0, 1])
    assert rows == [] and len(warnings) == 1
    assert str(p) in warnings[0] and "epochs 0, 1 are lost" in warnings[0]
    assert validate_history(str(p)) == ([], [])


@pytest.mark.parametrize("garbage, message", [
    (lambda raw: os.urandom(64) + b"\xff\xfe" + raw, r"is not a history CSV: line \d+ is not UTF-8 text"),
    (lambda raw: raw.replace(b"0.6", b"0.\x006"), "line 4 holds NUL bytes"),
    (lambda raw: raw.replace(b"0.6", b"zero"), r"line 4: balanced_accuracy='zero' is not a number"),
    (lambda raw: raw.replace(b"\n1,", b"\none,", 1), r"line 4: epoch='one' is not a number"),
    (lambda raw: raw.replace(b"\n1,", b"\n1.5,", 1), r"line 4: epoch='1.5' is not a non-negative integer"),
    (lambda raw: raw.replace(b"\n1,loss,", b"\n1,", 1), r"line 4: \d+ cells, the header has \d+"),
    (lambda raw: b"PK\x03\x04 not,a,history\n1,2,3\n", "line 1: the header must start with epoch, feature, attack"),
], ids=["binary", "nul", "number", "epoch", "fraction", "cells", "header"])
def test_validate_history_refuses_garbage_naming_file_and_line(tmp_path, garbage, message):
    p = tmp_path / "history.csv"
    p.write_bytes(garbage(_history(p)))
    with pytest.raises(ValueError, match=message) as err:
        validate_history(str(p), [0, 1, 2])
    assert str(p) in str(err.value) and "Move the file away" in str(err.value)


def test_resume_history_truncates_repairs_and_replaces_a_link(tmp_path):
    p = tmp_path / "history.csv"
    raw = _history(p, epochs=(0, 1, 2, 3))
    assert resume_history(str(p), 2, [0, 1]) == []
    assert sorted({r["epoch"] for r in read_history(str(p))}) == [0, 1]
    p.write_bytes(raw[:-5])
    assert len(resume_history(str(p), 4, [0, 1, 2, 3])) == 1  # the torn row, reported
    assert [r["epoch"] for r in read_history(str(p))] == [0, 0, 1, 1, 2, 2, 3]
    victim = tmp_path / "victim.csv"
    victim.write_bytes(raw)
    p.unlink()
    os.symlink(victim, p)
    resume_history(str(p), 1, [0])
    assert victim.read_bytes() == raw and not os.path.islink(p)
    assert expected_audit_epochs(5, 2) == [0, 1, 3, 5] and expected_audit_epochs(4, 1, first=False) == [0, 1, 2, 3, 4]
    assert expected_audit_epochs(-1, 1) == []


def test_resumed_monitor_refuses_a_garbage_history_and_warns_about_a_deleted_one(tmp_path):
    _fit_with_checkpoint(tmp_path, _monitor(), 2)
    hist = tmp_path / "run" / "version_0" / "mia" / "history.csv"
    good = hist.read_bytes()
    hist.write_bytes(b"\x00\xff\xfe garbage" * 10)
    with pytest.raises(ValueError, match="history.csv is not a history CSV"):
        _fit_with_checkpoint(tmp_path, _monitor(), 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert hist.read_bytes() == b"\x00\xff\xfe garbage" * 10  # refused, not silently replaced
    hist.unlink()
    with pytest.warns(RuntimeWarning, match="the audits of epochs 0, 1 are lost"):
        _fit_with_checkpoint(tmp_path, _monitor(), 4, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt"))
    assert sorted({r["epoch"] for r in read_history(str(hist))}) == [2, 3]
    assert good  # the original had epochs 0 and 1


# ==========================================================================================================
# item 9: strict audit files and pool sizes
# ==========================================================================================================
def _audit(**over):
    d = {"seed": 0, "n_members": 3, "n_nonmembers": 2, "member_positions": [0, 4, 7], "nonmember_positions": [1, 2],
         "member_indices": [10, 14, 17], "nonmember_indices": [1, 2], "meta": {}}
    d.update(over)
    return d


@pytest.mark.parametrize("over, message", [
    (dict(member_positions=[0, 4.0, 7]), r"member_positions\[1\] must be an integer, got 4.0"),
    (dict(member_positions=[0, True, 7]), r"member_positions\[1\] must be an integer, got True"),
    (dict(member_positions=[0, None, 7]), r"member_positions\[1\] must be an integer, got null"),
    (dict(member_positions=[0, {"a": 1}, 7]), r"member_positions\[1\] must be an integer, got a JSON object"),
    (dict(member_positions=[0, [4], 7]), r"member_positions\[1\] must be an integer, got a list"),
    (dict(member_positions=[0, 2**64, 7]), r"member_positions\[1\] must be an integer in 0\.\.9223372036854775807"),
    (dict(member_positions=[0, -4, 7]), r"member_positions\[1\] must be an integer in 0\.\."),
    (dict(member_positions=[0, "4", 7]), r"member_positions\[1\] must be an integer, got '4'"),
    (dict(member_positions={"0": 1}), "member_positions must be a list of integers, got a JSON object"),
    (dict(member_positions=7), "member_positions must be a list of integers, got 7"),
    (dict(nonmember_indices=[1.5, 2]), r"nonmember_indices\[0\] must be an integer, got 1.5"),
    (dict(nonmember_indices=[1]), "nonmember_indices has 1 entries but nonmember_positions 2"),
    (dict(member_positions=None, member_indices=None), "member_positions is missing"),
    (dict(seed=1.0), "seed must be an integer, got 1.0"),
    (dict(seed=None), "seed must be an integer, got null"),
    (dict(seed=True), "seed must be an integer, got True"),
    (dict(seed=2**70), "seed must be an integer in 0..9223372036854775807"),
    (dict(n_members=3.0), "n_members must be an integer, got 3.0"),
    (dict(n_members=4), "n_members is 4 but member_positions has 3 entries"),
    (dict(meta=[1]), "meta must be a JSON object, got a list"),
    (dict(fingerprint="x"), "fingerprint must be a JSON object"),
])
def test_audit_pool_from_dict_refuses_non_integers_naming_the_field(over, message):
    with pytest.raises(ValueError, match=message):
        AuditPool.from_dict(_audit(**over))


def test_audit_pool_from_dict_accepts_old_and_new_files():
    pool = AuditPool.from_dict(_audit())
    assert pool.member_indices.tolist() == [10, 14, 17] and pool.seed == 0
    old = AuditPool.from_dict({"seed": 1, "member_indices": [0, 1], "nonmember_indices": [3]})  # positions only
    assert old.member_positions.tolist() == [0, 1] and old.member_indices is None
    with pytest.raises(ValueError, match="must be a JSON object"):
        AuditPool.from_dict([1, 2])


@pytest.mark.parametrize("content, message", [
    (b'{"seed": 0, "member_positions": [1, NaN], "nonmember_positions": [0]}',
     r"member_positions\[1\] must be an integer, got nan"),
    (b'{"seed": 0, "member_positions": [1, Infinity], "nonmember_positions": [0]}',
     r"member_positions\[1\] must be an integer, got inf"),
    (b'{"seed": 0, "member_positions": [1, 2', r"is not valid JSON \(line 1, column"),
    (b"\x89PNG\r\n\x1a\n\xff", "is not UTF-8 text"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "nests too deeply|must be a JSON object"),
])
def test_audit_pool_load_names_the_file(tmp_path, content, message):
    p = tmp_path / "audit.json"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        AuditPool.load(str(p))
    assert str(p) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        AuditPool.load(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=float("inf")), "ratio .* must be a finite number > 0, got inf"),
    (dict(ratio=float("nan")), "ratio .* must be a finite number > 0, got nan"),
    (dict(ratio=True), "ratio .* must be a finite number > 0, got True"),
    (dict(ratio="5"), "ratio .* must be a finite number > 0, got '5'"),
    (dict(ratio=-1.0), "ratio .* must be a finite number > 0"),
    (dict(n_members=10.0), "n_members must be an integer or None, got 10.0"),
    (dict(n_members=True), "n_members must be an integer or None, got True"),
    (dict(n_nonmembers="3"), "n_nonmembers must be an integer or None, got '3'"),
    (dict(n_members=2**80), "n_members=1208925819614629174706176 is too large"),
    (dict(n_train=100.0), "n_train must be an integer, got 100.0"),
    (dict(n_heldout=None), "n_heldout must be an integer, got null"),
    (dict(seed=0.5), "seed must be an integer, got 0.5"),
])
def test_make_audit_pool_refuses_non_integer_sizes_and_infinite_ratios(kwargs, message):
    args = dict(n_train=100, n_heldout=50)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_audit_pool(**args)


def test_make_audit_pool_extreme_finite_ratios():
    assert make_audit_pool(100, 50, ratio=1e300).n_nonmembers == 1
    assert make_audit_pool(100, 50, ratio=1e-300).n_members == 1
    assert make_audit_pool(np.int64(100), np.int64(50), n_members=np.int64(10)).n_members == 10


# ==========================================================================================================
# item 11: CIFAR archives with links or float labels
# ==========================================================================================================
def _cifar_archive(root, replace=None, links=()):
    from tests.test_data import make_cifar

    make_cifar(root, archive=False)
    folder = root / "cifar-10-batches-py"
    if replace:
        replace(folder)
    arch = root / "cifar-10-python.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            if f.name in dict(links):
                info = tarfile.TarInfo(f"cifar-10-batches-py/{f.name}")
                info.type, info.linkname = dict(links)[f.name]
                tar.addfile(info)
            else:
                tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
    shutil.rmtree(folder)
    return arch


@pytest.mark.parametrize("link, message", [
    ((tarfile.SYMTYPE, "/etc/passwd"),
     r"member cifar-10-batches-py/data_batch_2 is a symbolic link \(to '/etc/passwd'\)"),
    ((tarfile.SYMTYPE, "data_batch_1"), "is a symbolic link"),
    ((tarfile.LNKTYPE, "cifar-10-batches-py/missing"), "is a hard link"),
], ids=["symlink-out", "symlink-in", "hardlink"])
def test_cifar_archive_with_a_link_member_is_a_clear_error(tmp_path, link, message):
    _cifar_archive(tmp_path, links=[("data_batch_2", link)])
    with pytest.raises(CorruptDataError, match=message):
        CIFARDataModule(str(tmp_path)).setup()


def _relabel(name, labels):
    import pickle

    def edit(folder):
        p = folder / name
        d = pickle.loads(p.read_bytes(), encoding="bytes")
        d[b"labels"] = labels(d[b"labels"])
        p.write_bytes(pickle.dumps(d, protocol=2))

    return edit


@pytest.mark.parametrize("labels, message", [
    (lambda y: [float(v) + 0.5 for v in y],
     r"data_batch_3 in .*labels must be integers, got float64 values \(e.g. \d\.5\)"),
    (lambda y: [float(v) for v in y], r"labels must be integers, got float64"),
    (lambda y: [[v] for v in y], r"count mismatch|must be integers|not a flat list"),
    (lambda y: [str(v) for v in y], r"labels must be integers, got <U"),
    (lambda y: [[1, 2]] + [3] * (len(y) - 1), r"not a flat list of integers"),
])
def test_cifar_float_or_odd_labels_are_refused_not_truncated(tmp_path, labels, message):
    _cifar_archive(tmp_path, replace=_relabel("data_batch_3", labels))
    with pytest.raises(CorruptDataError, match=message):
        CIFARDataModule(str(tmp_path)).setup()


def test_cifar_archive_of_regular_files_still_loads(tmp_path):
    _cifar_archive(tmp_path)
    dm = CIFARDataModule(str(tmp_path))
    dm.setup()
    assert len(dm.member_dataset()) == 20 and math.isfinite(float(dm.member_dataset()[0][0].sum()))
