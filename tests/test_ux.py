"""An audit people can read at a glance: TensorBoard tags and layout, HParams, console lines, tables, plots, file
modes. (The command line is tested through the installed script in test_ux_cli.py.)"""
from __future__ import annotations

import math
import os
import re
import stat
import warnings

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_mia.auditor import AuditResult
from lightning_mia.report import compare_runs, write_report
from lightning_mia.report.console import audit_summary
from lightning_mia.report.history import write_history
from lightning_mia.report.plots import score_histogram_figure, training_progress_figure
from lightning_mia.report.summary import finish_run, summary_table
from lightning_mia.report.tables import UNDEFINED_NOTE, comparison_table, markdown_table
from lightning_mia.report.tensorboard import (
    CHANCE_TAG,
    HEADLINE_METRICS,
    custom_scalars_layout,
    is_headline_metric,
)
from lightning_mia.run_writer import RunWriter, metrics_of

NAN = float("nan")
SLICES = ("all", "correct", "misclassified")
SIZE = {k: 0 for k in ("compressedHistograms", "images", "audio", "scalars", "histograms", "tensors")}

#: The ~55 secondary columns of a real history row (copied from a quickstart run's history.csv header).
DETAIL_COLUMNS = tuple((
    "repeats balanced_accuracy_std far_std accuracy accuracy_std tpr tpr_std tnr precision_member recall_member "
    "precision_nonmember recall_nonmember f1 advantage auc_std naive_balanced_accuracy naive_far advantage_std "
    "f1_nonmember f1_nonmember_std f1_std n_dropped n_eval_members n_eval_nonmembers n_nonfinite n_unscored "
    "naive_accuracy naive_advantage naive_precision_member naive_precision_nonmember naive_recall_member "
    "naive_recall_nonmember naive_tpr precision_member_std precision_nonmember_std recall_member_std "
    "recall_nonmember_std tnr_std tpr_at_0.1pct_fpr_std tpr_at_1pct_fpr_std zeror_accuracy zeror_advantage "
    "zeror_balanced_accuracy zeror_far zeror_precision_member zeror_precision_nonmember zeror_recall_member "
    "zeror_recall_nonmember zeror_tpr epsilon_lb_std zeror_precision_at_ratio_0.2 precision_at_ratio_0.2_std"
).split())
OPTIONAL_HEADLINE = ("epsilon_lb", "tpr_at_1pct_fpr_lo", "tpr_at_1pct_fpr_hi", "tpr_at_0.1pct_fpr_lo",
                     "tpr_at_0.01pct_fpr", "precision_at_ratio_0.2", "balanced_accuracy_at_ratio_5")


def audit_row(feature="loss", attack="threshold", slice_="all", **extra):
    row = {"epoch": 3, "feature": feature, "attack": attack, "slice": slice_, "n_members": 400,
           "n_nonmembers": 400, "balanced_accuracy": 0.62, "far": 0.7, "auc": 0.61, "tpr_at_1pct_fpr": 0.01,
           "tpr_at_0.1pct_fpr": NAN, "train_acc": 1.0, "test_acc": 0.9, "train_loss": 0.01, "test_loss": 0.4}
    row.update({k: 0.25 for k in DETAIL_COLUMNS + OPTIONAL_HEADLINE})
    row.update(n_eval_members=80.0, n_eval_nonmembers=80.67, balanced_accuracy_std=0.011, far_std=0.038)
    row.update(extra)
    return row


def audit_result(epoch, rows, target=None):
    """An AuditResult as the auditor returns it: rows plus the pool's arrays and one attack's scores."""
    from lightning_mia.membership import MembershipData

    rng = np.random.default_rng(epoch)
    is_member = np.arange(40) < 20
    data = MembershipData(features={"loss": rng.random(40)}, is_member=is_member, correct=rng.random(40) < 0.8,
                          label=np.zeros(40, np.int64))
    score = rng.random(40) + is_member
    return AuditResult(epoch=epoch, rows=rows, target=target or {}, data=data,
                       scores={("loss", "threshold"): score}, folds={("loss", "threshold"): np.ones(40, np.int64)})


def accumulate(logdir):
    acc = EventAccumulator(str(logdir), size_guidance=SIZE)
    acc.Reload()
    return acc


# ---- TensorBoard: headline tags first, the rest behind log_all_metrics under mia_detail/ -----------------------
def test_headline_metrics_lead_and_the_rest_is_secondary():
    result = AuditResult(epoch=3, rows=[audit_row(slice_=s) for s in SLICES],
                         target={"train_acc": 1.0, "test_acc": 0.9, "train_loss": 0.01, "test_loss": 0.4})
    tags = metrics_of(result)
    per_slice = {t.rsplit("/", 1)[1] for t in tags if t.startswith("mia/loss/threshold/all/")}
    # tpr_at_0.1pct_fpr is NaN here (80 non-members cannot resolve 0.1% FPR): not logged rather than logged as 0
    assert per_slice == (set(HEADLINE_METRICS) - {"tpr_at_0.1pct_fpr"}) | set(OPTIONAL_HEADLINE)
    assert {t for t in tags if t.startswith("target/")} == {
        "target/train_acc", "target/test_acc", "target/train_loss", "target/test_loss"}
    assert not any(t.startswith("mia_detail/") for t in tags)
    assert len(tags) == 4 + 3 * len(per_slice)

    every = metrics_of(result, log_all_metrics=True)
    detail = {t.rsplit("/", 1)[1] for t in every if t.startswith("mia_detail/loss/threshold/all/")}
    assert detail == set(DETAIL_COLUMNS)
    assert set(tags) <= set(every) and every["mia_detail/loss/threshold/misclassified/zeror_far"] == 0.25
    assert not any(is_headline_metric(c) for c in DETAIL_COLUMNS)


def test_run_writer_logs_the_chance_line_and_only_headline_metrics_by_default(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    for log_all in (False, True):
        logger = TensorBoardLogger(str(tmp_path), name=f"all_{log_all}", version=0, default_hp_metric=False)
        writer = RunWriter(logger.log_dir, [logger], log_histograms=False, log_all_metrics=log_all)
        for epoch in (0, 1, 2):
            writer.write(audit_result(epoch, [dict(audit_row(slice_=s), epoch=epoch) for s in SLICES],
                                      {"train_acc": 0.9, "test_acc": 0.8}))
        logger.experiment.flush()
        acc = accumulate(logger.log_dir)
        scalars = acc.Tags()["scalars"]
        assert [(e.step, e.value) for e in acc.Scalars(CHANCE_TAG)] == [(0, 0.5), (1, 0.5), (2, 0.5)]
        assert any(t.startswith("mia_detail/") for t in scalars) == log_all
        assert "mia/loss/threshold/all/balanced_accuracy" in scalars
        assert not any(t.startswith("mia/") and t.rsplit("/", 1)[1] in DETAIL_COLUMNS for t in scalars)
        assert len(acc.Tensors("custom_scalars__config__")) == 1  # the layout is written once
    # the history keeps every column either way
    from lightning_mia.report.history import read_history

    back = read_history(os.path.join(logger.log_dir, "mia", "history.csv"))
    assert set(DETAIL_COLUMNS) <= set(back[0])


def test_custom_scalars_charts_tell_balanced_accuracy_and_far_apart_with_a_chance_line(tmp_path):
    combos = [("loss", "threshold"), ("confidence", "logistic_regression")]
    with SummaryWriter(str(tmp_path)) as w:
        w.add_custom_scalars(custom_scalars_layout(combos))
    layout = layout_pb2.Layout()
    layout.ParseFromString(accumulate(tmp_path).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    all_tags = [f"mia/{f}/{a}/{s}/{m}" for f, a in combos for s in SLICES
                for m in ("balanced_accuracy", "far", "far_std", "balanced_accuracy_std", "auc")]
    all_tags += [CHANCE_TAG, "mia_detail/loss/threshold/all/naive_far"]
    for cat in layout.category:
        if not cat.title.startswith("MIA "):
            continue
        titles = [c.title for c in cat.chart]
        # balanced accuracy and FAR have charts of their own (TensorBoard colors a chart's lines by run, so the
        # two would be indistinguishable in one): per slice, balanced accuracy then FAR (one row each in
        # TensorBoard's two-column grid)
        assert [t.rsplit(": ", 1)[1] for t in titles] == ["balanced accuracy", "FAR"] * 3
        assert [t.split(":")[0].split(" ")[1] for t in titles] == [s for s in SLICES for _ in range(2)]
        for chart in cat.chart:
            metric = "balanced_accuracy" if chart.title.endswith("balanced accuracy") else "far"
            feature_attack, slice_ = chart.title.split(":")[0].split(" ")
            matched = sorted(t for t in all_tags if any(re.match(rx, t) for rx in chart.multiline.tag))
            assert matched == sorted([CHANCE_TAG, f"mia/{feature_attack}/{slice_}/{metric}"])
    assert {c.title for cat in layout.category for c in cat.chart} >= {"train / test accuracy", "train / test loss"}


def _lightning_hparams_then_ours(tmp_path, default_hp_metric):
    """What a fit writes: Lightning's log_hyperparams at fit start, the audit's HParams entry at fit end."""
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name=f"hp_{default_hp_metric}", version=0,
                               default_hp_metric=default_hp_metric)
    logger.log_hyperparams({"lr": 0.005, "model": "lenet"})
    rows = [dict(audit_row(slice_=s), epoch=e, test_loss=1.0 - e / 10) for e in range(4) for s in SLICES]
    write_history(os.path.join(logger.log_dir, "mia", "history.csv"), rows)
    finish_run(logger.log_dir, logger.experiment, {"model/lr": 0.005, "mia/repeats": 3}, step=3)
    logger.finalize("success")
    content = accumulate(logger.log_dir).PluginTagToContent("hparams")
    return plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment


def test_the_audits_hparams_entry_shows_when_lightning_writes_none(tmp_path):
    # TensorBoard keeps the first HParams summary of a run (the event accumulator stores a tag's metadata once),
    # so Lightning's default step-0 entry hides ours; with default_hp_metric=False Lightning writes none.
    shadowed = _lightning_hparams_then_ours(tmp_path, True)
    assert [m.name.tag for m in shadowed.metric_infos] == ["hp_metric"]
    ours = _lightning_hparams_then_ours(tmp_path, False)
    tags = {m.name.tag for m in ours.metric_infos}
    assert "hparams/loss/threshold/final/balanced_accuracy" in tags and "hp_metric" not in tags
    assert ours.metric_infos[0].name.tag.endswith("/final/balanced_accuracy")  # the final numbers lead the table
    assert {h.name for h in ours.hparam_infos} == {"model/lr", "mia/repeats"}


def test_a_logger_that_hides_the_hparams_entry_gets_one_warning(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    for default_hp_metric, expected in ((True, 1), (False, 0)):
        logger = TensorBoardLogger(str(tmp_path), name=f"w{default_hp_metric}", default_hp_metric=default_hp_metric)
        writer = RunWriter(logger.log_dir, [logger], log_histograms=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in (0, 1):
                writer.write(audit_result(epoch, [dict(audit_row(), epoch=epoch)]))
        hits = [w for w in caught if "default_hp_metric=False" in str(w.message)]
        assert len(hits) == expected


# ---- console lines -----------------------------------------------------------------------------------------------
def test_console_prints_evaluation_counts_and_std():
    r = AuditResult(epoch=5, target={"train_acc": 1.0, "test_acc": 0.95}, rows=[audit_row()])
    line = audit_summary(r, 0.2, 0.1).splitlines()[1]
    assert line == ("  loss/threshold/all: bal.acc 0.620±0.011 FAR 0.700±0.038 AUC 0.610±0.250 "
                    "(scored n=80/80.7 of 400/400)")
    plain = AuditResult(epoch=0, rows=[{"feature": "f", "attack": "a", "slice": "all", "balanced_accuracy": 0.5,
                                        "n_members": 10, "n_nonmembers": 12}])
    assert audit_summary(plain, 0, 0).splitlines()[1] == "  f/a/all: bal.acc 0.500 FAR nan AUC nan (n=10/12)"


def test_console_after_a_divergence_reads_nan():
    rows = [audit_row(balanced_accuracy=NAN, balanced_accuracy_std=NAN, far=NAN, auc=None, n_dropped=400)]
    r = AuditResult(epoch=7, target={"train_acc": NAN, "test_acc": None}, rows=rows)
    head, line = audit_summary(r, 0.0, 0.0).splitlines()
    assert head.startswith("[MIA epoch 7] train acc nan test acc nan") and "400 samples with NaN/inf" in head
    assert "bal.acc nan FAR nan AUC nan" in line


# ---- tables ------------------------------------------------------------------------------------------------------
def history_with_a_tiny_misclassified_slice():
    """Misclassified members shrink 60 -> 3; its balanced accuracy peaks (noise) when 3 members are left."""
    n_mis = {0: 60, 1: 40, 2: 25, 3: 10, 4: 3}
    ba_mis = {0: 0.55, 1: 0.60, 2: 0.64, 3: 0.7, 4: 0.9}
    rows = []
    for e in range(5):
        for s in SLICES:
            rows.append({"epoch": e, "feature": "loss", "attack": "threshold", "slice": s,
                         "n_members": n_mis[e] if s == "misclassified" else 400, "n_nonmembers": 80,
                         "balanced_accuracy": ba_mis[e] if s == "misclassified" else 0.5 + e / 100,
                         "far": 0.4, "tpr_at_0.1pct_fpr": NAN, "train_acc": 0.8 + e / 25, "test_acc": 0.8,
                         "test_loss": 1.0 - e / 10, "n_eval_members": 16.0, "n_eval_nonmembers": 16.0})
    return rows


def test_max_leakage_ignores_small_slices_and_marks_them():
    rows = history_with_a_tiny_misclassified_slice()
    table = comparison_table(rows, None)
    leak = {r["slice"]: r for r in table if r["point"] == "max_leakage"}
    assert leak["misclassified"]["epoch"] == 2 and leak["misclassified"]["balanced_accuracy"] == 0.64
    assert leak["all"]["epoch"] == 4
    final = [r for r in table if r["point"] == "final" and r["slice"] == "misclassified"][0]
    assert final["small_slice"] and not leak["misclassified"]["small_slice"]
    # the option: 0 lets every epoch count (the old behaviour), a huge one leaves no candidate
    assert [r["epoch"] for r in comparison_table(rows, None, min_slice_count=0)
            if r["point"] == "max_leakage" and r["slice"] == "misclassified"] == [4]
    none = [r for r in comparison_table(rows, None, min_slice_count=1000) if r["point"] == "max_leakage"]
    assert all(r["epoch"] is None and "no epoch with >= 1000" in r["note"] for r in none)
    with pytest.raises(ValueError, match="min_slice_count"):
        comparison_table(rows, None, min_slice_count=-1)

    text = summary_table(table, "loss", "threshold")
    assert "| misclassified (small) | final |" in text and "| all | final |" in text
    assert text.count(UNDEFINED_NOTE) == 1 and text.count("(small) = fewer than 20") == 1
    # an undefined TPR at 0.1% FPR (80 non-members) is a dash, never 0
    assert re.search(r"\| misclassified \| max_leakage \| 2 \|.*\| – \|", text)


def test_report_explains_dashes_and_small_slices_and_shows_scored_counts(tmp_path):
    run = str(tmp_path / "run")
    write_history(os.path.join(run, "mia", "history.csv"), history_with_a_tiny_misclassified_slice())
    text = open(write_report(run)).read()
    assert UNDEFINED_NOTE in text and "*(small)*: fewer than 20" in text
    assert "| misclassified (small) |" in text and "| scored |" in text and "| 16 / 16 |" in text
    text = open(write_report(run, out=str(tmp_path / "r5"), min_slice_count=5)).read()
    assert "*(small)*: fewer than 5" in text


def test_markdown_dashes_for_nan_and_none():
    assert markdown_table([{"a": NAN, "b": None, "c": 0.5}], ["a", "b", "c"]).splitlines()[-1] == "| – | – | 0.500 |"


# ---- plots -------------------------------------------------------------------------------------------------------
def _pred(score_member, score_nonmember):
    n_m, n_n = len(score_member), len(score_nonmember)
    return {"is_member": np.r_[np.ones(n_m, bool), np.zeros(n_n, bool)], "correct": np.ones(n_m + n_n, bool),
            "fold": np.ones(n_m + n_n, int), "score__loss__threshold": np.r_[score_member, score_nonmember]}


def test_loss_scores_are_histogrammed_on_a_log_axis():
    rng = np.random.default_rng(0)
    # -loss: members' losses ~1e-6, non-members' spread up to 10 (and an exact zero)
    members = -10 ** rng.uniform(-8, -3, 80)
    members[0] = 0.0
    nonmembers = -10 ** rng.uniform(-6, 1, 80)
    fig = score_histogram_figure(_pred(members, nonmembers), "loss", "threshold")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel() and "lower = member" in ax.get_xlabel()
    heights = [p.get_height() for p in ax.patches]
    assert max(heights) < 0.5  # not one bar holding everything
    assert sum(heights) == pytest.approx(2.0)  # fractions of each group (the zero loss lands in the first bin)
    prob = score_histogram_figure(_pred(rng.uniform(0.4, 1, 50), rng.uniform(0, 0.6, 50)), "loss", "threshold")
    assert prob.axes[0].get_xscale() == "linear"


def test_progress_legend_sits_below_the_panels():
    rows = [{"epoch": e, "feature": "loss", "attack": "threshold", "slice": s, "balanced_accuracy": 0.5 + e / 40,
             "far": 0.9 - e / 20, "train_acc": 0.6 + e / 25, "test_acc": 0.6, "n_members": 100 - 10 * e}
            for e in range(10) for s in SLICES]
    fig = training_progress_figure(rows, "loss", "threshold", es_epochs={"es_patience_3": 4})
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:2] == ["attack balanced acc.", "attack FAR"] and "ES p=3 (ep. 4)" in labels
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in fig.axes[:3])  # entirely under the panels


# ---- file modes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_report_file_respects_the_umask(tmp_path, umask, mode):
    from tests.test_report import hand_history, write_predictions

    old = os.umask(umask)
    try:
        runs = [str(tmp_path / name / "version_0") for name in ("a", "b")]
        for run in runs:
            write_history(os.path.join(run, "mia", "history.csv"), hand_history())
            write_predictions(run, [0, 10])
            write_report(run)
        compare_runs(runs, str(tmp_path / "cmp"))
        writer = RunWriter(str(tmp_path / "w"), log_histograms=False)
        writer.write_rows(AuditResult(epoch=0, rows=[audit_row()]))
    finally:
        os.umask(old)
    written = [os.path.join(d, f) for root in (*(os.path.join(r, "mia") for r in runs), str(tmp_path / "cmp"),
                                                str(tmp_path / "w"))
               for d, _, files in os.walk(root) for f in files if "predictions" not in d]  # (test-written npz)
    assert any(p.endswith(".png") for p in written) and any(p.endswith("compare.md") for p in written)
    assert any(p.endswith("early_stopping.csv") for p in written)
    bad = {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written if stat.S_IMODE(os.stat(p).st_mode) != mode}
    assert bad == {}


def test_a_figure_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    from lightning_mia.report.plots import save_figure

    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"keep")
    link = tmp_path / "fig.png"
    link.symlink_to(target)
    save_figure(training_progress_figure([], "f", "a"), str(link))
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(os.stat(link).st_size)
