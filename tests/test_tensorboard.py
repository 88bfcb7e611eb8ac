"""TensorBoard helpers: event files read back with TensorBoard's own EventAccumulator, and a real server."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_mia.report.plots import save_figure, training_progress_figure
from lightning_mia.report.tensorboard import (
    add_custom_scalars_layout,
    add_figures,
    add_hparams,
    add_score_histograms,
    add_text_table,
    metric_tag,
)

SIZE = {k: 0 for k in ("compressedHistograms", "images", "audio", "scalars", "histograms", "tensors")}
COMBOS = [("loss", "threshold"), ("confidence", "xgboost")]
SLICES = ("all", "correct", "misclassified")


def accumulate(logdir):
    acc = EventAccumulator(str(logdir), size_guidance=SIZE)
    acc.Reload()
    return acc


def test_custom_scalars_layout_groups_ba_and_far_per_slice(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        add_custom_scalars_layout(w, COMBOS)
    acc = accumulate(tmp_path)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    all_tags = [metric_tag(f, a, s, m) for f, a in COMBOS for s in SLICES
                for m in ("balanced_accuracy", "far", "far_std", "balanced_accuracy_std", "auc")]
    all_tags += ["target/train_acc", "target/test_acc", "target/train_loss", "target/test_loss"]
    all_tags.append("mia/chance")
    for f, a in COMBOS:
        for s in SLICES:
            # one chart per metric (TensorBoard colours lines by run, so BA and FAR in one chart look alike), each
            # with the chance line; the regexes (re.match, as the plugin does) pick exactly that metric and chance
            for metric, name in (("balanced_accuracy", "balanced accuracy"), ("far", "FAR")):
                regexes = charts[f"{f}/{a} {s}: {name}"]
                matched = sorted(t for t in all_tags if any(re.match(rx, t) for rx in regexes))
                assert matched == sorted([metric_tag(f, a, s, metric), "mia/chance"])
    acc_regexes = charts["train / test accuracy"]
    assert sorted(t for t in all_tags if any(re.match(rx, t) for rx in acc_regexes)) == [
        "target/test_acc", "target/train_acc"]


def test_score_histograms(tmp_path):
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
    members[3] = np.nan  # evaluation-split NaNs are dropped
    with SummaryWriter(str(tmp_path)) as w:
        add_score_histograms(w, "loss", "threshold", 7, members, nonmembers)
        add_score_histograms(w, "loss", "threshold", 8, np.array([np.nan]), nonmembers)  # empty group skipped
    acc = accumulate(tmp_path)
    (m,) = acc.Histograms("mia/loss/threshold/scores/member")
    assert m.step == 7 and m.histogram_value.num == 49
    assert m.histogram_value.min == pytest.approx(np.nanmin(members))
    assert m.histogram_value.sum == pytest.approx(np.nansum(members))
    nm = acc.Histograms("mia/loss/threshold/scores/nonmember")
    assert [e.step for e in nm] == [7, 8] and nm[0].histogram_value.max == pytest.approx(nonmembers.max())


def test_figures_and_text(tmp_path):
    import matplotlib.image as mpimg

    rows = [{"epoch": e, "feature": "loss", "attack": "threshold", "slice": s, "balanced_accuracy": 0.5 + e / 20,
             "far": 0.5 - e / 30, "train_acc": 0.6 + e / 10, "test_acc": 0.6} for e in range(4) for s in SLICES]
    fig = training_progress_figure(rows, "loss", "threshold")
    png = save_figure(training_progress_figure(rows, "loss", "threshold"), str(tmp_path / "p.png"))
    md = "| point | epoch |\n|---|---|\n| final | 3 |"
    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir)) as w:
        add_figures(w, {"mia/figures/progress": fig, "mia/figures/from_png": png}, step=3)
        add_text_table(w, "mia/early_stopping", md, step=3)
    acc = accumulate(logdir)
    (img,) = acc.Images("mia/figures/from_png")
    decoded = mpimg.imread(io.BytesIO(img.encoded_image_string), format="png")
    source = mpimg.imread(png)
    assert decoded.shape[:2] == source.shape[:2] == (img.height, img.width)
    np.testing.assert_allclose(decoded[..., :3], source[..., :3], atol=1 / 255)  # lossless PNG round trip
    (img,) = acc.Images("mia/figures/progress")
    decoded = mpimg.imread(io.BytesIO(img.encoded_image_string), format="png")
    assert img.step == 3 and decoded[..., :3].var() > 1e-3
    (text,) = acc.Tensors("mia/early_stopping/text_summary")
    assert text.step == 3 and text.tensor_proto.string_val[0].decode() == md


def test_hparams_in_the_same_run_dir(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        w.add_scalar("mia/loss/threshold/all/balanced_accuracy", 0.6, 5)
        add_hparams(w, {"model": "lenet", "lr": 0.1, "augment": True, "patience": [3, 5]},
                    {"hparams/final_balanced_accuracy": 0.61, "hparams/es_balanced_accuracy": 0.55,
                     "hparams/undefined": float("nan")})
    assert [p for p in os.listdir(tmp_path) if os.path.isdir(tmp_path / p)] == []  # no timestamped sub-run
    acc = accumulate(tmp_path)
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "lenet"
    assert start.hparams["lr"].number_value == pytest.approx(0.1)
    assert start.hparams["augment"].number_value == 1.0  # torch stores bools as numbers (bool is an int)
    assert start.hparams["patience"].string_value == "[3, 5]"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert sorted(m.name.tag for m in exp.metric_infos) == ["hparams/es_balanced_accuracy",
                                                             "hparams/final_balanced_accuracy"]
    assert acc.Scalars("hparams/final_balanced_accuracy")[0].value == pytest.approx(0.61)
    assert "hparams/undefined" not in acc.Tags()["scalars"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_tensorboard_server_serves_tags_and_layout(tmp_path):
    binary = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    assert os.path.exists(binary), binary
    tags = [metric_tag("loss", "threshold", s, m) for s in SLICES for m in ("balanced_accuracy", "far")]
    with SummaryWriter(str(tmp_path)) as w:
        for epoch in range(3):
            for i, tag in enumerate(tags):
                w.add_scalar(tag, 0.5 + 0.01 * epoch + 0.001 * i, epoch)
            w.add_scalar("target/train_acc", 0.7 + 0.1 * epoch, epoch)
            w.add_scalar("target/test_acc", 0.6 + 0.05 * epoch, epoch)
        add_custom_scalars_layout(w, [("loss", "threshold")])
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([binary, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
                             "--load_fast=false", "--reload_interval", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, served, last_error = time.time() + 60, {}, None
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited early: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                served = _get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
                if served.get(".") and set(tags) <= set(served["."]):
                    break
            except OSError as err:  # server not listening yet
                last_error = err
            time.sleep(0.5)
        assert served.get(".") and set(tags + ["target/train_acc", "target/test_acc"]) <= set(served["."]), \
            (served, last_error)
        layout = _get_json(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout")
        titles = [c["title"] for cat in layout["category"] for c in cat["chart"]]
        assert {"loss/threshold misclassified: balanced accuracy", "loss/threshold misclassified: FAR"} <= set(titles)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
