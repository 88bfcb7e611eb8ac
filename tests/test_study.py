"""The study runner's fast mode on digits (what CI exercises) and its claim checks on a hand-made history."""

import pytest

from lightning_mia.study import STUDY_FEATURES, applicable_features, claims, fc_layers, main_study


def _row(epoch, slice_, **kw):
    base = {"epoch": epoch, "feature": "confidence", "attack": "logistic_regression", "slice": slice_,
            "n_members": 10, "n_nonmembers": 10, "test_loss": 1.0 - 0.01 * epoch}
    base.update(kw)
    return base


def test_claims_on_a_hand_made_history():
    rows = []
    for e in range(3):
        rows += [_row(e, "all", balanced_accuracy=0.55, far=0.6, tpr=0.7, test_acc=0.9, naive_balanced_accuracy=0.53,
                      **{"precision_at_ratio_5": 0.9, "precision_at_ratio_1": 0.6, "precision_at_ratio_0.2": 0.2,
                         "balanced_accuracy_at_ratio_5": 0.55, "balanced_accuracy_at_ratio_0.2": 0.56}),
                 _row(e, "correct", balanced_accuracy=0.51, balanced_accuracy_std=0.01),
                 _row(e, "misclassified", balanced_accuracy=0.7)]
    got = {c: v for c, _, v in claims(rows, {"rules": [], "best_epoch": 2, "best_value": 0.98})}
    assert got["Attack on correctly classified samples is near chance (bal. acc. ≈ 0.5)"] == "holds"
    assert got["Attack does better on misclassified than on correctly classified samples"] == "holds"
    far_claim = next(c for c in got if c.startswith("False alarms come with detections"))
    assert got[far_claim] == "holds"  # FAR 0.6 >= 0.7 x TPR 0.7
    assert got["The naive attack (member iff correctly classified) is comparable"] == "holds"
    assert got["Table 2: member precision collapses from 5:1 to 1:5 while balanced accuracy holds"] == "holds"
    rows[-1]["balanced_accuracy"] = 0.3
    rows[-3].update(far=0.2, tpr=0.9)  # last epoch, "all": detections without as many false alarms
    got = {c: v for c, _, v in claims(rows, {"rules": [], "best_epoch": 2, "best_value": 0.98})}
    assert got["Attack does better on misclassified than on correctly classified samples"] == "does not hold"
    assert got[far_claim] == "does not hold"


def test_append_writes_the_page_header_once_even_if_another_study_created_the_page(tmp_path, monkeypatch):
    import lightning_mia.study as study

    out = tmp_path / "results.md"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")

    def other_study_finishes_first(*args, **kwargs):
        out.write_text("# Results: the paper's study on our runs\n\nintro\n\n## `other.yaml`\n")
        return str(tmp_path)

    monkeypatch.setattr(study, "fc_layers", lambda config: 3)
    monkeypatch.setattr(study, "run_config", other_study_finishes_first)
    monkeypatch.setattr(study, "section", lambda config, *a, **k: f"## `{config}`\n")
    assert main_study([str(cfg), "--append", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("# Results:") == 1 and text.index("## `other.yaml`") < text.index(f"## `{cfg}`")
    out.unlink()
    monkeypatch.setattr(study, "run_config", lambda *a, **k: str(tmp_path))
    assert main_study([str(cfg), "--append", "--out", str(out)]) == 0  # no page yet: the header is written
    assert out.read_text().startswith("# Results:")


@pytest.mark.slow
def test_fast_study_on_digits_writes_results(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    cfg = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = tmp_path / "results.md"
    assert main_study([str(cfg), "--fast", "--max-epochs", "4", "--every", "2", "--out", str(out),
                       "--runs", str(tmp_path / "runs")]) == 0
    text = out.read_text()
    assert "Command: `lightning-mia study" in text
    for feature in ("confidence", "layer_-1", "layer_-2", "distance", "grad_x", "grad_w"):
        assert f"| {feature} | logistic_regression | all |" in text, feature
    assert "(49.98)" in text  # the paper's Table 4 number beside ours
    assert text.count("| holds |") + text.count("| does not hold |") >= 4
    with pytest.raises(SystemExit):
        main_study([str(tmp_path / "missing.yaml")])


def test_intermediate_layers_beyond_the_models_fc_layers_are_dropped_with_a_note(tmp_path):
    # The quick-start LeNet has 3 FC layers (120 -> 84 -> 10), bearpaw's ResNet one classifier layer.
    assert fc_layers("configs/quickstart.yaml") == 3
    text = open("configs/quickstart.yaml").read().replace("model: lenet", "model: resnet20")
    (tmp_path / "resnet.yaml").write_text(text)
    assert fc_layers(str(tmp_path / "resnet.yaml")) == 1
    keep, notes = applicable_features(STUDY_FEATURES, 3)
    assert keep == STUDY_FEATURES and notes == []
    keep, notes = applicable_features(STUDY_FEATURES, 1)
    tags = [f.get("tag") for f in keep if isinstance(f, dict)]
    assert "layer_-1" in tags and "layer_-2" not in tags and len(keep) == len(STUDY_FEATURES) - 1
    assert len(notes) == 1 and "layer_-2" in notes[0] and "1 fully connected layer " in notes[0]
