"""The trajectory feature: a planted faster loss fall of members is recovered, noise stays at chance, and the
history survives a checkpoint. References: scikit-learn's ROC AUC, the planted effect, torch.load(weights_only)."""
import io

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_mia.auditor import Auditor
from lightning_mia.features.trajectory import TrajectoryState
from lightning_mia.membership import MembershipData
from lightning_mia.protocols import StandardProtocol
from lightning_mia.registry import Spec


def _losses(n=600, epochs=6, fall=0.3, seed=0):
    """Per-sample loss per epoch: a hard/easy offset shared by all epochs (swamps the single-epoch signal), a
    common fall, and an extra ``fall`` per epoch for members."""
    rng = np.random.default_rng(seed)
    member = np.arange(n) < n // 2
    labels = rng.integers(0, 3, n)
    offset = rng.gamma(2.0, 3.0, n)
    return member, labels, [offset + 2.0 - 0.2 * e - fall * e * member + 0.1 * rng.normal(size=n)
                            for e in range(epochs)]


def _audit_all(auditor, member, labels, per_epoch):
    res = None
    for e, loss in enumerate(per_epoch):
        data = MembershipData({"traj": loss}, member, np.ones(len(member), bool), labels, loss=loss)
        res = auditor.audit(data, epoch=e)
    return res


def _auditor():
    return Auditor([Spec("trajectory", "traj", {"history": 4})], [Spec("threshold", "threshold"),
                                                                   Spec("logistic_regression", "lr")],
                   StandardProtocol(repeats=1, folds=5, slices=["all"], seed=0))


def test_planted_faster_fall_is_recovered_by_the_trajectory_not_by_one_epoch():
    member, labels, per_epoch = _losses()
    res = _audit_all(_auditor(), member, labels, per_epoch)
    assert res.data.features["traj"].shape == (600, 4)  # the last 4 audits
    one_epoch = roc_auc_score(member, -per_epoch[-1])
    drop_auc = res.row("traj_drop", "threshold")["auc"]
    assert drop_auc > 0.95 > 0.75 > one_epoch  # the offset hides membership in any single epoch
    assert res.row("traj", "lr")["auc"] > 0.95  # a learned attack on the (n, T) history, cross-fitted
    assert res.row("traj", "lr")["n_eval_members"] == 300  # folds: every pool sample scored


def test_trajectory_of_noise_stays_at_chance():
    member, labels, per_epoch = _losses(fall=0.0, seed=1)
    res = _audit_all(_auditor(), member, labels, per_epoch)
    sigma = np.sqrt((300 + 300 + 1) / (12 * 300 * 300))
    for feat, attack in (("traj_drop", "threshold"), ("traj", "lr")):
        assert abs(res.row(feat, attack)["auc"] - 0.5) < 3 * sigma, feat


def test_trajectory_state_survives_a_weights_only_checkpoint():
    member, labels, per_epoch = _losses(epochs=5)
    straight = _auditor()
    want = _audit_all(straight, member, labels, per_epoch)
    first = _auditor()
    _audit_all(first, member, labels, per_epoch[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _auditor()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for e in (3, 4):
        data = MembershipData({"traj": per_epoch[e]}, member, np.ones(600, bool), labels, loss=per_epoch[e])
        got = resumed.audit(data, epoch=e)
    np.testing.assert_array_equal(got.data.features["traj"], want.data.features["traj"])
    np.testing.assert_array_equal(got.scores[("traj_drop", "threshold")], want.scores[("traj_drop", "threshold")])


def test_reaudited_epoch_replaces_its_row_and_history_is_bounded():
    st = TrajectoryState(history=2)
    st.update(0, np.array([3.0]))
    st.update(1, np.array([2.0]))
    st.update(1, np.array([1.5]))  # the same epoch again (a resume re-audits it)
    assert st.matrix().tolist() == [[3.0, 1.5]]
    st.update(2, np.array([1.0]))
    assert st.matrix().tolist() == [[1.5, 1.0]] and st.first == [3.0]
    with pytest.raises(ValueError, match="audit pool changed"):
        st.update(3, np.array([1.0, 2.0]))
