"""The most exposed samples: the CSV matches the saved per-sample scores (reference: the predictions file, sorted
by hand) and the picture is a real image with the right number of panels."""
import csv

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import SyntheticDataModule
from lightning_mia.module import ImageClassifier
from lightning_mia.protocols import StandardProtocol
from tests.helpers import tiny_trainer


def test_exposed_csv_matches_the_saved_scores_and_the_grid_is_an_image(tmp_path):
    import matplotlib.image as mpimg

    monitor = MembershipInferenceMonitor(features=["loss"], attacks=["threshold"], protocol=StandardProtocol(
        repeats=1, folds=3), ratio=1.0, save_predictions=True, exposed_top_k=4, verbose=False, report_at_end=False)
    dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=96, n_heldout=64, signal=1.0,
                             batch_size=32, seed=0)
    tiny_trainer(tmp_path, [monitor], max_epochs=2).fit(ImageClassifier("lenet", optimizer="adam", lr=1e-2),
                                                        datamodule=dm)
    mia = tmp_path / "run" / "version_0" / "mia"
    rows = list(csv.DictReader(open(mia / "exposed" / "epoch_0001.csv")))
    pred = np.load(mia / "predictions" / "epoch_0001.npz")
    s, member, index = pred["score__loss__threshold"], pred["is_member"].astype(bool), pred["index"]
    for kind, side in (("member", member), ("false_alarm", ~member)):
        got = [r for r in rows if r["kind"] == kind]
        want = np.argsort(-np.where(side & np.isfinite(s), s, -np.inf), kind="stable")[:4]
        assert [int(r["index"]) for r in got] == index[want].tolist()
        np.testing.assert_allclose([float(r["score"]) for r in got], s[want])
    img = mpimg.imread(mia / "exposed" / "epoch_0001.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0] and img[..., :3].std() > 0.05  # not blank
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("mia_exposed/loss/threshold")] == [0, 1]
    assert [e.step for e in acc.Images("mia_roc/all")] == [0, 1]  # the first audit, and the last at fit end


def test_exposed_figure_shows_every_sample_once_with_its_label():
    from lightning_mia.report.exposed import exposed_figure

    rows = [{"kind": k, "index": 10 * r + i, "label": 0, "predicted": 1, "score": 0.5, "feature": "f", "attack": "a"}
            for r, k in enumerate(("member", "false_alarm")) for i in range(3)]
    fills = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]  # one distinct grey per sample
    fig = exposed_figure(rows, [np.full((8, 8, 3), v) for v in fills], epoch=2)
    (ax,) = [ax for ax in fig.axes if ax.images]
    mosaic = np.asarray(ax.images[0].get_array())
    for v in fills:  # each image pasted whole, exactly once
        ys, xs = np.nonzero(np.isclose(mosaic[..., 0], v))
        assert len(ys) == 64 and np.ptp(ys) == 7 and np.ptp(xs) == 7
    member_rows = {int(np.nonzero(np.isclose(mosaic[..., 0], v))[0][0]) for v in fills[:3]}
    alarm_rows = {int(np.nonzero(np.isclose(mosaic[..., 0], v))[0][0]) for v in fills[3:]}
    assert len(member_rows) == len(alarm_rows) == 1 and min(member_rows) < min(alarm_rows)  # members on top
    labels = " ".join(t.get_text() for t in ax.texts)
    assert all(f"#{r['index']} " in labels for r in rows)
