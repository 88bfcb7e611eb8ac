"""Reference-model attacks in the audit: LiRA and RMIA scored on every pool sample from reference logits.

References: the pure score functions (themselves checked against scipy and naive loops in
test_reference_scores.py), scikit-learn's ROC AUC, and binomial counts of the IN/OUT assignment."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lightning_mia.attacks.reference import LiRAAttack, ReferenceSignals, RMIAAttack
from lightning_mia.attacks.reference_scores import lira_scores, logit_scaled_confidence
from lightning_mia.auditor import Auditor
from lightning_mia.callbacks.references import ReferenceModels, half_in_mask
from lightning_mia.membership import MembershipData
from lightning_mia.protocols import StandardProtocol
from lightning_mia.registry import Spec


def _planted(n=400, K=8, m=300, C=4, shift=1.5, seed=0):
    """Logits where training on a sample raises its true-class logit by ``shift`` (target and references alike)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    member = np.arange(n) < n // 2
    base = rng.normal(size=(n, C))  # per-sample difficulty shared by every model
    ref_in = half_in_mask(K, n, seed)
    onehot = np.eye(C)[labels]
    target = base + 0.3 * rng.normal(size=(n, C)) + shift * member[:, None] * onehot
    refs = base[None] + 0.3 * rng.normal(size=(K, n, C)) + shift * ref_in[:, :, None] * onehot[None]
    pop_labels = rng.integers(0, C, m)
    pop_base = rng.normal(size=(m, C))
    sig = ReferenceSignals(target, labels, refs, ref_in, pop_base + 0.3 * rng.normal(size=(m, C)), pop_labels,
                           pop_base[None] + 0.3 * rng.normal(size=(K, m, C)))
    return sig, member


def test_half_in_mask_puts_every_sample_in_exactly_half_the_references():
    mask = half_in_mask(8, 1000, seed=3)
    assert mask.shape == (8, 1000) and (mask.sum(axis=0) == 4).all()
    per_ref = mask.sum(axis=1)  # each reference trains on about half: binomial(1000, 1/2) within 5 sigma
    assert (np.abs(per_ref - 500) < 5 * np.sqrt(250)).all()
    assert (half_in_mask(8, 1000, seed=3) == mask).all() and not (half_in_mask(8, 1000, seed=4) == mask).all()


def test_auditor_scores_lira_and_rmia_on_every_pool_sample():
    sig, member = _planted()
    n = len(member)
    data = MembershipData({"loss": np.zeros(n)}, member, np.ones(n, bool), sig.labels, loss=np.zeros(n))
    auditor = Auditor([Spec("loss", "loss")], [Spec("lira", "lira"), Spec("rmia", "rmia"),
                                              Spec("lira", "lira_off", {"online": False})],
                      StandardProtocol(repeats=1, seed=0))
    res = auditor.audit(data, epoch=3, references=sig)
    want = lira_scores(logit_scaled_confidence(sig.target_logits, sig.labels),
                       logit_scaled_confidence(sig.ref_logits, sig.labels[None]), sig.ref_in)
    np.testing.assert_allclose(res.scores[("reference", "lira")], want)
    for tag in ("lira", "rmia", "lira_off"):
        row = res.row("reference", tag, "all")
        scores = res.scores[("reference", tag)]
        assert row["n_eval_members"] + row["n_eval_nonmembers"] == n  # the whole pool, no split
        assert row["auc"] == pytest.approx(roc_auc_score(member, scores))
        assert row["auc"] > 0.75 and row["epoch"] == 3
    assert 0.0 <= res.target["reference_train_acc"] <= 1.0


def chance_consistent(m, n_nonmembers):
    """TPR at 1% and 0.1% FPR consistent with TPR = FPR: the TPR's 95% Clopper-Pearson interval overlaps the
    budget's own interval over the non-members (both rates are estimated from a finite pool)."""
    from lightning_mia.bounds import clopper_pearson

    for key, budget in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001)):
        f_lo, f_hi = clopper_pearson(int(round(budget * n_nonmembers)), n_nonmembers)
        if not (m[f"{key}_lo"] <= f_hi and m[f"{key}_hi"] >= f_lo):
            return False
    return True


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reference_attacks_on_a_no_signal_control_sit_at_chance(seed):
    """Training on a sample changes nothing: AUC within 3 sigma of 0.5, TPR at low FPR consistent with FPR."""
    from lightning_mia.metrics import score_metrics

    sig, member = _planted(n=4000, m=2000, shift=0.0, seed=seed)
    for attack in (LiRAAttack(), RMIAAttack()):
        m = score_metrics(member, attack.score_references(sig)[0])
        assert abs(m["auc"] - 0.5) < 3 * np.sqrt((2000 + 2000 + 1) / (12 * 2000 * 2000)), attack.name
        assert chance_consistent(m, 2000), attack.name


def test_reference_models_option_is_validated():
    from lightning_mia.callbacks import MembershipInferenceMonitor

    with pytest.raises(ValueError, match="count must be an integer >= 2"):
        ReferenceModels(count=1)
    with pytest.raises(ValueError, match=r"mode must be one of \['online', 'offline'\]"):
        ReferenceModels(mode="shadow")
    with pytest.raises(ValueError, match="lira and rmia are scored from reference models"):
        MembershipInferenceMonitor(attacks=["lira"])
    with pytest.raises(ValueError, match="lira and rmia are scored from reference models"):
        MembershipInferenceMonitor(attacks=["threshold"], reference_models=ReferenceModels())
