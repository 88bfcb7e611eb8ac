"""Out-of-distribution false-alarm probe: sources, and FAR recomputed from the saved scores."""
import numpy as np
import pytest
import torch

from lightning_mia.callbacks import MembershipInferenceMonitor
from lightning_mia.data import DigitsDataModule, IndexedDataset
from lightning_mia.module import ImageClassifier
from lightning_mia.ood import build_ood_source, ood_far
from lightning_mia.report.history import read_history
from lightning_mia.protocols import StandardProtocol
from tests.helpers import scalars, tiny_trainer


def _held(n=30, shape=(1, 8, 8)):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    return IndexedDataset(TensorDataset(torch.rand((n,) + shape, generator=g), torch.arange(n) % 3))


def test_sources_match_hand_made_references():
    held = _held()
    rot = build_ood_source({"name": "rotated", "k": 1}, held, n=30, seed=0)
    for i in range(30):
        x, y, idx = rot[i]
        assert torch.equal(x, torch.rot90(held[i][0], 1, dims=(-2, -1))) and int(y) == int(held[i][1])
    inv = build_ood_source("inverted", held, n=30)
    x0 = held[0][0]
    assert torch.allclose(inv[0][0], x0.max() + x0.min() - x0)
    noise = build_ood_source("gaussian", held, n=2000, seed=1)
    xs = torch.stack([noise[i][0] for i in range(len(noise))])
    ref = torch.stack([held[i][0] for i in range(30)])
    assert abs(float(xs.mean()) - float(ref.mean())) < 0.02 and abs(float(xs.std()) - float(ref.std())) < 0.02
    assert all(int(noise[i][1]) == -1 for i in range(5))
    with pytest.raises(KeyError, match="Known ood sources: dataset, gaussian, inverted, rotated"):
        build_ood_source("svhn", held)


def test_other_dataset_is_resized_to_the_model_input():
    class DM:
        def nonmember_dataset(self):
            return _held(10, (3, 16, 16))

    ds = build_ood_source({"name": "dataset", "datamodule": DM()}, _held(), n=10)
    x = ds[3][0]
    assert tuple(x.shape) == (1, 8, 8)
    src = DM().nonmember_dataset()[3][0].mean(dim=0, keepdim=True)[None]
    ref = torch.nn.functional.interpolate(src, size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x, ref, atol=1e-6)


def test_ood_far_counts_member_calls():
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    X = rng.normal(size=(600, 1)) + 2.0 * member[:, None]
    far_hi, s, thr, n = ood_far(X, member, np.full((50, 1), 5.0), "logistic_regression")
    far_lo, *_ = ood_far(X, member, np.full((50, 1), -5.0), "logistic_regression")
    assert (far_hi, far_lo, n) == (1.0, 0.0, 50) and np.all(s >= thr)


@pytest.mark.slow
def test_digits_model_far_on_noise_from_saved_scores(tmp_path):
    dm = DigitsDataModule(train_subset=300, batch_size=32)
    monitor = MembershipInferenceMonitor(features=["confidence", "loss"], attacks=["threshold", "logistic_regression"],
                                         ood_sources=["gaussian", {"name": "rotated", "tag": "rot90"}],
                                         ood_samples=300, ratio=1.0, protocol=StandardProtocol(repeats=1), save_predictions=True,
                                         every_n_epochs=15, verbose=False, report_at_end=False)
    tiny_trainer(tmp_path, [monitor], max_epochs=15).fit(
        ImageClassifier("lenet", optimizer="adam", lr=5e-3, betas=(0.5, 0.99)), datamodule=dm)
    run = tmp_path / "run" / "version_0"
    rows = {(r["feature"], r["attack"], r["slice"]): r for r in read_history(str(run / "mia" / "history.csv"))}
    pred = np.load(run / "mia" / "predictions" / "epoch_0014.npz")
    checked = 0
    for f, a in (("confidence", "logistic_regression"), ("loss", "threshold"), ("loss", "logistic_regression")):
        for src in ("gaussian", "rot90"):
            s = pred[f"ood_score__{src}__{f}__{a}"]
            thr = float(pred[f"ood_threshold__{src}__{f}__{a}"])
            ok = np.isfinite(s)
            far = float(np.mean(s[ok] >= thr))
            row = rows[(f, a, f"ood_{src}")]
            assert row["far"] == pytest.approx(far) and row["n_nonmembers"] == ok.sum() == 300
            checked += 1
    assert checked == 6
    assert "mia/loss/threshold/ood_gaussian/far" in scalars(run)


def test_ood_probe_reuses_the_pools_pca_projection():
    """An intermediate feature with a PCA cap used to be skipped by the OOD probe; now the pool's fitted projection
    is applied to the OOD rows too (reference: sklearn's PCA fitted on the pool alone, then the same attack)."""
    from sklearn.decomposition import PCA

    from lightning_mia.auditor import Auditor
    from lightning_mia.features import Intermediate
    from lightning_mia.membership import MembershipData
    from lightning_mia.ood import ood_far
    from lightning_mia.registry import Spec

    rng = np.random.default_rng(0)
    n_pool, n_ood, d = 300, 100, 6
    member = np.r_[np.ones(150, bool), np.zeros(150 + n_ood, bool)]
    X = rng.normal(size=(n_pool + n_ood, d)) + 0.8 * member[:, None]
    source = np.r_[np.zeros(n_pool, int), np.ones(n_ood, int)]
    data = MembershipData({"layer": X}, member, np.ones(len(X), bool), np.zeros(len(X)), loss=rng.random(len(X)),
                          source=source)
    auditor = Auditor([Spec("intermediate", "layer", {"max_dims": 2})], [Spec("logistic_regression", "lr")],
                      StandardProtocol(repeats=1, slices=["all"], seed=0), ood_sources=["gauss"], seed=0)
    res = auditor.audit(data, epoch=0, feature_objs={"layer": Intermediate(max_dims=2, seed=0)})
    row = res.row("layer", "lr", "ood_gauss")
    pca = PCA(n_components=2, random_state=0).fit(X[:n_pool].astype(np.float32))
    proj = lambda Z: pca.transform(Z.astype(np.float32)).astype(np.float32)  # noqa: E731
    far, scores, _, n = ood_far(proj(X[:n_pool]), member[:n_pool], proj(X[n_pool:]), {"name": "logistic_regression"},
                                "undersample", 0)
    assert res.data.features["layer"].shape == (n_pool, 2)
    assert row["n_nonmembers"] == n == n_ood and row["far"] == pytest.approx(far)
    np.testing.assert_allclose(res.ood[("gauss", "layer", "lr")][0], scores)
