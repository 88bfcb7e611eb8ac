"""Comparison table, figures and the markdown report, on hand-made histories written with write_history."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from lightning_mia.report import compare_runs, load_run, main_compare, main_report, write_report
from lightning_mia.report.history import write_history
from lightning_mia.report.plots import (
    eval_scores,
    privacy_utility_figure,
    roc_figure,
    save_figure,
    score_histogram_figure,
    training_progress_figure,
)
from lightning_mia.report.tables import (
    TABLE_COLUMNS,
    comparison_table,
    epoch_series,
    markdown_table,
    write_early_stopping_csv,
)

NAN = float("nan")
SLICES = ("all", "correct", "misclassified")


def png_is_not_blank(path, threshold=1e-3):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and float(img[..., :3].var()) > threshold


# ---- hand-made history --------------------------------------------------------------------------------------
# Monitored every 2 epochs (0..10). Balanced accuracy per (slice, epoch) chosen so the max is at a known epoch:
BA = {
    "all":           {0: 0.50, 2: 0.55, 4: 0.61, 6: 0.58, 8: 0.60, 10: 0.59},   # max at 4
    "correct":       {0: 0.50, 2: 0.52, 4: 0.53, 6: 0.53, 8: 0.51, 10: 0.52},   # tie 4/6 -> first (4)
    "misclassified": {0: 0.51, 2: 0.60, 4: 0.70, 6: 0.75, 8: 0.80, 10: NAN},    # max at 8, NaN ignored
}
N_MIS = {0: 40, 2: 30, 4: 20, 6: 10, 8: 3, 10: 0}


def hand_history(epochs=(0, 2, 4, 6, 8, 10), combos=(("loss", "threshold"),)):
    rows = []
    for e in epochs:
        for feature, attack in combos:
            for s in SLICES:
                rows.append({
                    "epoch": e, "feature": feature, "attack": attack, "slice": s,
                    "n_members": N_MIS[e] if s == "misclassified" else 100 - (N_MIS[e] if s == "correct" else 0),
                    "n_nonmembers": 100, "repeats": 3,
                    "balanced_accuracy": BA[s][e], "balanced_accuracy_std": 0.01 * (e + 1),
                    "far": 1.0 - BA[s][e] - 0.05, "far_std": 0.02, "tpr": BA[s][e] + 0.05,
                    "tpr_at_0.1pct_fpr": e / 100, "auc": BA[s][e] + 0.02,
                    "train_acc": 0.5 + e / 20, "test_acc": 0.5 + e / 40, "train_loss": 1.0 - e / 20,
                    "test_loss": {0: 1.0, 2: 0.8, 4: 0.7, 6: 0.75, 8: 0.8, 10: 0.9}[e],
                })
    return rows


def es_json(rules, best_epoch=5):
    return {"monitor": "val_loss", "mode": "min", "min_delta": 0.0, "source": "callback", "best_epoch": best_epoch,
            "best_value": 0.5, "last_epoch": 11,
            "rules": [{"name": f"es_patience_{p}", "patience": p, "stop_epoch": s, "best_epoch": None,
                       "best_value": None, "reason": None} for p, s in rules]}


def _row(table, slice_, point):
    (r,) = [r for r in table if r["slice"] == slice_ and r["point"] == point]
    return r


def test_table_picks_the_right_rows():
    rows = hand_history()
    # ES at epoch 5 (not monitored -> 4), 8 (monitored), never; best validation epoch 3 (-> 2).
    table = comparison_table(rows, es_json([(2, 5), (4, 8), (9, None)], best_epoch=3))
    assert [r["point"] for r in table if r["slice"] == "all"] == [
        "es_patience_2", "es_patience_4", "es_patience_9", "best_val", "max_leakage", "final"]
    assert len(table) == 3 * 6
    r = _row(table, "all", "es_patience_2")
    assert (r["epoch"], r["monitored_epoch"]) == (5, 4) and "not monitored" in r["note"]
    assert r["balanced_accuracy"] == BA["all"][4] and r["balanced_accuracy_std"] == pytest.approx(0.05)
    assert r["train_acc"] == pytest.approx(0.7) and r["test_acc"] == pytest.approx(0.6)
    assert r["gap"] == pytest.approx(0.1)
    assert r["n_misclassified_members"] == N_MIS[4] and r["tpr_at_0.1pct_fpr"] == pytest.approx(0.04)
    r = _row(table, "misclassified", "es_patience_4")
    assert (r["epoch"], r["monitored_epoch"], r["note"]) == (8, 8, "")
    assert r["balanced_accuracy"] == 0.80 and r["n_members"] == 3 and r["n_misclassified_members"] == 3
    r = _row(table, "correct", "es_patience_9")
    assert r["epoch"] is None and r["monitored_epoch"] == 10 and "did not stop" in r["note"]
    assert _row(table, "all", "best_val")["monitored_epoch"] == 2
    # misclassified: epoch 8 (BA 0.80) holds 3 members, below min_slice_count=20; of epochs 0-4 (40/30/20) 4 leads
    assert [_row(table, s, "max_leakage")["epoch"] for s in SLICES] == [4, 4, 4]
    every = comparison_table(rows, es_json([(2, 5), (4, 8), (9, None)], best_epoch=3), min_slice_count=0)
    assert _row(every, "misclassified", "max_leakage")["epoch"] == 8
    assert all(_row(table, s, "final")["epoch"] == 10 for s in SLICES)
    assert math.isnan(_row(table, "misclassified", "final")["balanced_accuracy"])


def test_table_point_before_first_monitored_epoch():
    rows = hand_history(epochs=(4, 6, 8))
    r = _row(comparison_table(rows, es_json([(3, 2)])), "all", "es_patience_3")
    assert r["monitored_epoch"] is None and math.isnan(r["balanced_accuracy"]) and "no monitored epoch" in r["note"]


def test_table_recomputes_early_stopping_from_test_loss_when_json_missing():
    rows = []
    # test_loss by epoch: best 0.8 at epoch 2; patience 3 -> stop at 5, 5 -> 7, 10 -> 12 (hand-computed).
    losses = [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3, 1.4]
    for e, loss in enumerate(losses):
        rows.append({"epoch": e, "feature": "loss", "attack": "threshold", "slice": "all", "test_loss": loss,
                     "balanced_accuracy": 0.5 + e / 100, "train_acc": 0.9, "test_acc": 0.8})
    assert epoch_series(rows, "test_loss") == list(enumerate(losses))
    table = comparison_table(rows, None)
    got = {r["point"]: r["epoch"] for r in table}
    assert got == {"es_patience_3": 5, "es_patience_5": 7, "es_patience_10": 12, "best_val": 2,
                   "max_leakage": 13, "final": 13}


def test_csv_and_markdown(tmp_path):
    table = comparison_table(hand_history(), es_json([(2, 5)]))
    path = write_early_stopping_csv(str(tmp_path), table)
    assert path == os.path.join(str(tmp_path), "mia", "early_stopping.csv")
    with open(path, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == list(TABLE_COLUMNS) and len(back) == len(table)
    for a, b in zip(back, table):
        assert a["point"] == b["point"] and a["slice"] == b["slice"]
        assert (a["balanced_accuracy"] == "") == math.isnan(b["balanced_accuracy"])
        if a["balanced_accuracy"]:
            assert float(a["balanced_accuracy"]) == b["balanced_accuracy"]
    md = markdown_table([{"a": 1, "b": NAN, "c": "x|y"}, {"a": None, "b": 0.12345, "c": ""}],
                        ["a", ("B", "b"), ("C", "c"), ("twice a", lambda r: None if r["a"] is None else 2 * r["a"])])
    assert md.splitlines() == ["| a | B | C | twice a |", "|---|---|---|---|", "| 1 | – | x\\|y | 2 |",
                               "| – | 0.123 |  | – |"]


# ---- predictions --------------------------------------------------------------------------------------------
def write_predictions(run_dir, epochs, n=120, combos=(("loss", "threshold"),), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(run_dir, "mia", "predictions"), exist_ok=True)
    is_member = np.arange(n) < n // 2
    for e in epochs:
        correct = rng.random(n) < 0.7
        fold = (rng.random(n) < 0.5).astype(np.int64)
        arrays = {"index": np.arange(n), "is_member": is_member, "correct": correct, "fold": fold}
        for f, a in combos:
            score = rng.normal(size=n) + is_member * (0.1 * e)
            score[fold == 0] = np.nan
            arrays[f"score__{f}__{a}"] = score
        np.savez(os.path.join(run_dir, "mia", "predictions", f"epoch_{e:04d}.npz"), **arrays)


def test_eval_scores_selects_evaluation_split_and_slice():
    pred = {"is_member": np.array([1, 1, 0, 0, 1, 0], bool), "correct": np.array([1, 0, 1, 0, 1, 1], bool),
            "fold": np.array([1, 1, 1, 1, 0, 1]), "score__f__a": np.array([0.9, 0.8, np.nan, 0.1, 0.7, 0.2])}
    y, s = eval_scores(pred, "f", "a", "all")
    assert y.tolist() == [True, True, False, False] and s.tolist() == [0.9, 0.8, 0.1, 0.2]
    y, s = eval_scores(pred, "f", "a", "misclassified")
    assert y.tolist() == [True, False] and s.tolist() == [0.8, 0.1]
    y, s = eval_scores(pred, "f", "a", "correct")
    assert y.tolist() == [True, False] and s.tolist() == [0.9, 0.2]
    with pytest.raises(KeyError, match="score__f__a"):
        eval_scores(pred, "g", "a")


def test_figures_render_and_are_not_blank(tmp_path):
    rows = hand_history()
    write_predictions(str(tmp_path), [0, 4, 10])
    preds = {e: str(tmp_path / "mia" / "predictions" / f"epoch_{e:04d}.npz") for e in (0, 4, 10)}
    figs = {
        "progress": training_progress_figure(rows, "loss", "threshold", es_epochs={"es_patience_2": 5, "x": None}),
        "roc": roc_figure(preds, "loss", "threshold"),
        "hist": score_histogram_figure(preds[10], "loss", "threshold"),
        "pu": privacy_utility_figure(rows),
    }
    for name, fig in figs.items():
        path = save_figure(fig, str(tmp_path / "figs" / f"{name}.png"))
        assert png_is_not_blank(path), name
    # The progress figure draws what the history says: the balanced-accuracy line of the "all" panel.
    ax = figs["progress"].axes[0]
    (ba_line,) = [ln for ln in ax.get_lines() if ln.get_label() == "attack balanced acc."]
    np.testing.assert_allclose(ba_line.get_ydata(), [BA["all"][e] for e in sorted(BA["all"])])
    assert any(ln.get_label().startswith("ES p=2 (ep. 5)") for ln in ax.get_lines())


def test_figures_with_nan_and_empty_slices(tmp_path):
    rows = [r for r in hand_history(epochs=(0,)) if r["slice"] != "correct"]  # slice missing entirely
    for r in rows:
        if r["slice"] == "misclassified":
            r.update(balanced_accuracy=NAN, far=NAN, balanced_accuracy_std=NAN, tpr=NAN, n_members=0)
    for fig in (training_progress_figure(rows, "loss", "threshold", es_epochs={"es_patience_3": 0}),
                privacy_utility_figure(rows, slice_="misclassified"), privacy_utility_figure([])):
        save_figure(fig, str(tmp_path / "f.png"))
    # Predictions where a slice has only members: a note instead of a curve.
    pred = {"is_member": np.array([1, 1, 0, 0], bool), "correct": np.array([0, 1, 1, 1], bool),
            "fold": np.ones(4, int), "score__f__a": np.array([0.3, 0.9, 0.1, 0.2])}
    save_figure(roc_figure({3: pred}, "f", "a"), str(tmp_path / "roc.png"))
    save_figure(score_histogram_figure(pred, "f", "a"), str(tmp_path / "h.png"))
    assert png_is_not_blank(str(tmp_path / "roc.png"))


# ---- the report -----------------------------------------------------------------------------------------------
def test_report_with_json_and_predictions(tmp_path):
    run = str(tmp_path / "run")
    write_history(os.path.join(run, "mia", "history.csv"), hand_history(combos=(("loss", "threshold"),
                                                                               ("confidence", "mlp"))))
    with open(os.path.join(run, "mia", "early_stopping.json"), "w") as fh:
        json.dump(es_json([(3, 5), (5, 9)], best_epoch=3), fh)
    write_predictions(run, [0, 4, 8, 10])  # only loss/threshold has saved scores
    path = write_report(run)
    assert path == os.path.join(run, "mia", "report.md")
    text = open(path).read()
    assert "From `EarlyStoppingComparison`" in text and "## loss / threshold" in text and "## confidence / mlp" in text
    figs = os.listdir(os.path.join(run, "mia", "figures"))
    assert {"progress__loss__threshold.png", "progress__confidence__mlp.png", "roc__loss__threshold.png",
            "scores__loss__threshold__epoch_0010.png", "privacy_utility.png"} <= set(figs)
    assert not any(f.startswith("roc__confidence") for f in figs)
    for f in figs:
        assert png_is_not_blank(os.path.join(run, "mia", "figures", f)), f
        assert f"](figures/{f})" in text
    # Default ROC epochs: first saved, ES epochs 5 -> 4 and 9 -> 8, max leakage (all) 4, last 10.
    assert "ROC curves (evaluation split) at epochs 0, 4, 8, 10" in text
    with open(os.path.join(run, "mia", "early_stopping.csv"), newline="") as fh:
        es_rows = list(csv.DictReader(fh))
    assert {r["point"] for r in es_rows} == {"es_patience_3", "es_patience_5", "best_val", "max_leakage", "final"}


def test_report_on_nan_slices_and_single_epoch_into_out_dir(tmp_path):
    run = str(tmp_path / "run")
    rows = hand_history(epochs=(0,))
    for r in rows:
        if r["slice"] == "misclassified":
            r.update(balanced_accuracy=NAN, balanced_accuracy_std=NAN, far=NAN, far_std=NAN, tpr=NAN, auc=NAN,
                     n_members=0)
    write_history(os.path.join(run, "mia", "history.csv"), rows)
    out = str(tmp_path / "out")
    path = write_report(run, out=out)
    assert path == os.path.join(out, "report.md")
    text = open(path).read()
    assert "recomputed from the history's `test_loss`" in text
    assert os.path.exists(os.path.join(out, "early_stopping.csv"))
    assert not os.path.exists(os.path.join(run, "mia", "report.md"))  # the run dir is left alone
    assert png_is_not_blank(os.path.join(out, "figures", "progress__loss__threshold.png"))


def test_report_errors_and_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="history.csv"):
        write_report(str(tmp_path / "nothing"))
    with pytest.raises(SystemExit) as err:
        main_report([str(tmp_path / "nothing")])
    assert err.value.code == 2 and "history.csv" in capsys.readouterr().err
    empty = tmp_path / "empty"
    write_history(str(empty / "mia" / "history.csv"), [])
    with pytest.raises(ValueError, match="no rows"):
        load_run(str(empty))

    run = str(tmp_path / "run")
    write_history(os.path.join(run, "mia", "history.csv"), hand_history(epochs=(0, 2)))
    assert main_report([run, "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")


def test_compare_runs(tmp_path, capsys):
    a, b = str(tmp_path / "a" / "version_0"), str(tmp_path / "b" / "version_0")
    write_history(os.path.join(a, "mia", "history.csv"), hand_history())
    write_history(os.path.join(b, "mia", "history.csv"),
                  hand_history(epochs=(0,), combos=(("loss", "threshold"), ("confidence", "mlp"))))
    out = str(tmp_path / "cmp")
    assert main_compare([a, b, "--out", out]) == 0
    path = capsys.readouterr().out.strip()
    text = open(path).read()
    assert "**a/version_0**" in text and "**b/version_0**" in text  # labels made distinct
    assert "## loss / threshold" in text and "confidence / mlp" not in text  # only shared combos
    assert png_is_not_blank(os.path.join(out, "figures", "compare__loss__threshold.png"))
    c = str(tmp_path / "c")
    write_history(os.path.join(c, "mia", "history.csv"), hand_history(epochs=(0,), combos=(("entropy", "lr"),)))
    with pytest.raises(ValueError, match="share no feature/attack"):
        compare_runs([a, c], out)
    with pytest.raises(ValueError, match="labels"):
        compare_runs([a, b], out, labels=["only one"])


def test_report_reads_the_callbacks_json_format(tmp_path):
    from lightning_mia.callbacks.early_stopping import early_stopping_results

    run = str(tmp_path / "run")
    write_history(os.path.join(run, "mia", "history.csv"), hand_history())
    # Validation every epoch 0..11 (the monitor audits every 2): patience 2 stops at 7 (best 0.6 at epoch 5),
    # which is not monitored -> epoch 6 of the history.
    val = [1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.62, 0.61, 0.5, 0.4, 0.3, 0.2]
    es = early_stopping_results(list(enumerate(val)), patiences=[2, 20], source="callback", last_epoch=11)
    with open(os.path.join(run, "mia", "early_stopping.json"), "w") as fh:
        json.dump(es, fh, allow_nan=False)
    table = comparison_table(load_run(run)["rows"], load_run(run)["es"])
    r = _row(table, "all", "es_patience_2")
    assert (r["epoch"], r["monitored_epoch"], r["balanced_accuracy"]) == (7, 6, BA["all"][6])
    assert _row(table, "all", "best_val")["epoch"] == 11
    text = open(write_report(run)).read()
    assert "| es_patience_2 | 2 | 7 | 5 |" in text and "| es_patience_20 | 20 | did not stop |" in text
