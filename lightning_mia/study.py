"""The paper's study on your own runs: train with every feature and attack, then check the paper's claims.

``lightning-mia study CONFIG... [--fast] [--out docs/results.md]`` trains each config with the monitor set to the
paper's signals (confidence, intermediate layers −1/−2, distance to the boundary, gradient norms w.r.t. input
and weights) and attacks, then writes a results page: our final-epoch numbers beside the paper's (Rezaei & Liu
2021, Tables 3–7, LeNet/MNIST rows) and each qualitative claim checked on the run's history.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from lightning_mia.validation import as_float as _f

#: Signals of the paper (§4): confidence vector, FC layers before the softmax, boundary distance, gradient norms.
STUDY_FEATURES: List[Any] = [
    "confidence",
    "logit_scaled_confidence",  # LiRA's score; also attacked calibrated against the first audited epoch
    {"name": "intermediate", "tag": "layer_-1", "layers": [-1]},
    {"name": "intermediate", "tag": "layer_-2", "layers": [-2]},
    {"name": "boundary_distance", "tag": "distance"},
    {"name": "gradient_norms", "tag": "grad_x", "wrt": ["input"]},
    {"name": "gradient_norms", "tag": "grad_w", "wrt": ["weights"]},
]
STUDY_ATTACKS: List[Any] = ["logistic_regression", "mlp", "random_forest", "xgboost"]
FAST_ATTACKS: List[Any] = ["logistic_regression"]

#: Out-of-distribution non-member sources of the false-alarm probe (paper 001: overconfidence far from the data).
STUDY_OOD: List[Any] = ["gaussian", "rotated", "inverted"]

#: The paper's LeNet/MNIST numbers (balanced accuracy %, FAR %), Tables 4–7: {feature: {slice: (acc, far)}}.
PAPER_MNIST = {
    "confidence": {"all": (50.04, 50.01), "correct": (49.98, 50.21), "misclassified": (62.30, 40.83)},  # Table 4
    "layer_-1": {"all": (47.65, 59.55), "correct": (47.58, 59.69), "misclassified": (55.45, 43.33)},  # Table 5
    "layer_-2": {"all": (47.96, 60.77), "correct": (47.99, 60.65), "misclassified": (47.42, 69.17)},  # Table 5
    "distance": {"correct": (49.86, 52.97), "misclassified": (49.81, 48.3)},  # Table 6
    "grad_x": {"correct": (52.06, 42.75), "misclassified": (57.84, 38.48)},  # Table 7
    "grad_w": {"correct": (53.19, 34.5), "misclassified": (52.02, 41.79)},  # Table 7
}
PAPER_MNIST_TARGET = {"train_acc": 99.74, "test_acc": 99.05, "attack": 50.04, "naive": 50.07}  # Table 3


def _pct(x: Any) -> str:
    v = _f(x)
    return "–" if math.isnan(v) else f"{100 * v:.1f}"


def run_config(config: str, out_dir: str, fast: bool, max_epochs: Optional[int], every: Optional[int],
               features: Sequence[Any], attacks: Sequence[Any], pool: Optional[int] = None,
               ood: Sequence[Any] = ()) -> str:
    """Train one config with the study's monitor settings; returns its run directory."""
    from lightning_mia.cli import build_cli

    name = os.path.splitext(os.path.basename(config))[0]
    args = ["fit", "--config", config,
            "--trainer.logger", "pytorch_lightning.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", out_dir, "--trainer.logger.name", name,
            "--trainer.enable_progress_bar", "false",
            "--mia.features", json.dumps(list(features)), "--mia.attacks", json.dumps(list(attacks)),
            "--mia.save_predictions", "false",
            # one attack per slice, as the authors' code fits them (attacks/paper.py); a model fitted on all
            # samples can score the small misclassified slice upside down
            "--mia.protocol", json.dumps({"class_path": "lightning_mia.protocols.StandardProtocol", "init_args": {
                "eval_ratios": [5, 1, 0.2], "fit_per_slice": True, "repeats": 2 if fast else 3}}),
            "--mia.calibrate", '["logit_scaled_confidence"]', "--mia.ood_sources", json.dumps(list(ood)),
            "--mia.ood_samples", "300"]
    if max_epochs is not None:
        args += ["--trainer.max_epochs", str(max_epochs)]
    if every is not None:
        args += ["--mia.every_n_epochs", str(every)]
    if pool is not None:
        args += ["--mia.n_members", str(pool), "--mia.n_nonmembers", str(pool)]
    cli = build_cli(args)
    return cli.trainer.logger.log_dir


def fc_layers(config: str) -> int:
    """Number of ``nn.Linear`` layers of the config's model (built without training or logging)."""
    from torch import nn

    from lightning_mia.cli import build_cli

    cli = build_cli(["--config", config, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"],
                    run=False)
    model = cli.model
    if getattr(model, "net", True) is None:  # ImageClassifier builds its network from the data's shapes
        dm = cli.datamodule
        dm.prepare_data()
        dm.setup("fit")
        model.build_network(dm.num_classes, tuple(dm.input_shape))
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def applicable_features(features: Sequence[Any], n_fc: int) -> Tuple[List[Any], List[str]]:
    """``(features the model supports, notes on the ones dropped)``: the paper attacks intermediate layers only
    at its FC layers (§5.2), so layer ``-k`` needs ``k`` of them (bearpaw's AlexNet/ResNet/DenseNet have one)."""
    keep, notes = [], []
    for f in features:
        layers = f.get("layers", [-1]) if isinstance(f, Mapping) and f.get("name") == "intermediate" else []
        need = max((-int(v) for v in layers if isinstance(v, int)), default=0)
        if need > n_fc:
            notes.append(f"`{f.get('tag', 'intermediate')}` not run: the model has {n_fc} fully connected "
                         f"layer{'s' if n_fc != 1 else ''} and the paper attacks intermediate outputs only at FC "
                         "layers (§5.2; its CIFAR rows have layer −1 only)")
        else:
            keep.append(f)
    return keep, notes


def final_rows(rows: Sequence[Mapping[str, Any]]) -> Dict[Tuple[str, str, str], Mapping[str, Any]]:
    last = max(int(r["epoch"]) for r in rows)
    return {(r["feature"], r["attack"], r["slice"]): r for r in rows if int(r["epoch"]) == last}


def claims(rows: Sequence[Mapping[str, Any]], es: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    """The paper's qualitative claims checked on one run: ``[(claim, our numbers, verdict)]``."""
    from lightning_mia.report.tables import comparison_table

    fin = final_rows(rows)
    key = ("confidence", "logistic_regression")
    get = lambda s, m: _f(fin.get((*key, s), {}).get(m))  # noqa: E731
    out = []
    corr, allb = get("correct", "balanced_accuracy"), get("all", "balanced_accuracy")
    std = get("correct", "balanced_accuracy_std")
    out.append(("Attack on correctly classified samples is near chance (bal. acc. ≈ 0.5)",
                f"{corr:.3f} ± {std:.3f}", "holds" if abs(corr - 0.5) < 0.05 else "does not hold"))
    # the misclassified slice empties once the model fits every member: use the last epoch where it is defined
    by_epoch = {(int(r["epoch"]), r["slice"]): r for r in rows if (r["feature"], r["attack"]) == key}
    defined = sorted(e for (e, sl), r in by_epoch.items() if sl == "misclassified"
                     and not math.isnan(_f(r.get("balanced_accuracy"))))
    if defined:
        e = defined[-1]
        m, c = _f(by_epoch[(e, "misclassified")]["balanced_accuracy"]), _f(by_epoch[(e, "correct")]["balanced_accuracy"])
        out.append(("Attack does better on misclassified than on correctly classified samples",
                    f"{m:.3f} vs {c:.3f} at epoch {e} (last epoch with misclassified members)",
                    "holds" if m > c else "does not hold"))
        first = defined[0]
        m0 = _f(by_epoch[(first, "misclassified")]["balanced_accuracy"])
        out.append(("Leakage on misclassified samples rises as the model overfits",
                    f"{m0:.3f} at epoch {first} → {m:.3f} at epoch {e}", "holds" if m > m0 else "does not hold"))
    else:
        out.append(("Attack does better on misclassified than on correctly classified samples", "no epoch with "
                    "misclassified members and non-members", "undefined"))
    far, tpr, test_acc = get("all", "far"), get("all", "tpr"), get("all", "test_acc")
    # The paper's point: what an attack detects comes with about as many false alarms (FAR close to TPR), however
    # accurate the target. A low FAR alone is no counter-example when the TPR is as low.
    out.append(("False alarms come with detections: FAR is at least 0.7 x TPR although the target is far above "
                "chance", f"FAR {far:.3f} vs TPR {tpr:.3f} at test acc {test_acc:.3f}",
                "holds" if far >= 0.7 * tpr else "does not hold"))
    naive = get("all", "naive_balanced_accuracy")
    out.append(("The naive attack (member iff correctly classified) is comparable",
                f"attack {allb:.3f} vs naive {naive:.3f}", "holds" if abs(allb - naive) < 0.05 else "does not hold"))
    p5, p1, p02 = (get("all", f"precision_at_ratio_{r}") for r in ("5", "1", "0.2"))
    b5, b02 = get("all", "balanced_accuracy_at_ratio_5"), get("all", "balanced_accuracy_at_ratio_0.2")
    out.append(("Table 2: member precision collapses from 5:1 to 1:5 while balanced accuracy holds",
                f"precision {p5:.3f} → {p1:.3f} → {p02:.3f}; bal. acc. {b5:.3f} vs {b02:.3f}",
                "holds" if p5 > p1 > p02 and abs(b5 - b02) < 0.05 else "does not hold"))
    table = comparison_table(rows, es)
    pick = {(r["slice"], r["point"]): r for r in table if (r["feature"], r["attack"]) == key}
    es_row, final = pick.get(("misclassified", "es_patience_5")), pick.get(("misclassified", "final"))
    if es_row and final:
        a, b = _f(es_row["balanced_accuracy"]), _f(final["balanced_accuracy"])
        verdict = ("not testable: early stopping with patience 5 did not trigger" if es_row["epoch"] is None
                   else "undefined (no misclassified members at one of the epochs)" if math.isnan(a) or math.isnan(b)
                   else "holds" if a <= b else "does not hold")
        out.append(("Leakage on misclassified samples is lower at the early-stopping epoch (patience 5) than at "
                    "the end", f"{a:.3f} at epoch {es_row['monitored_epoch']} vs {b:.3f} at {final['monitored_epoch']}",
                    verdict))
    return out


def section(config: str, run_dir: str, command: str, seconds: float, notes: Sequence[str] = ()) -> str:
    from lightning_mia.report import load_run
    from lightning_mia.report.tables import markdown_table

    run = load_run(run_dir)
    rows, fin = run["rows"], final_rows(run["rows"])
    last = max(int(r["epoch"]) for r in rows)
    lines = [f"## `{config}`", "", f"Command: `{command}` ({seconds / 60:.1f} min here). Run: `{run_dir}`.", ""]
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    any_row = next(iter(fin.values()))
    lines.append(f"Target at the last epoch ({last}): train acc {_pct(any_row.get('train_acc'))}%, test acc "
                 f"{_pct(any_row.get('test_acc'))}% (paper, LeNet/MNIST: {PAPER_MNIST_TARGET['train_acc']}% / "
                 f"{PAPER_MNIST_TARGET['test_acc']}%).")
    lines += ["", "Balanced accuracy / FAR in % at the last epoch (ours; the paper's LeNet/MNIST value in brackets):", ""]
    table = []
    for (f, a, s), r in sorted(fin.items()):
        if s.startswith("ood_") or f.startswith("logit_scaled"):
            continue
        paper = PAPER_MNIST.get(f, {}).get(s)
        table.append({"feature": f, "attack": a, "slice": s, "n": f"{r.get('n_members')}/{r.get('n_nonmembers')}",
                      "bal. acc.": f"{_pct(r.get('balanced_accuracy'))}" + (f" ({paper[0]})" if paper else ""),
                      "FAR": f"{_pct(r.get('far'))}" + (f" ({paper[1]})" if paper else ""),
                      "naive": _pct(r.get("naive_balanced_accuracy")), "AUC": _pct(r.get("auc"))})
    cols = [(c, c) for c in ("feature", "attack", "slice", "n", "bal. acc.", "FAR", "naive", "AUC")]
    lines += [markdown_table(table, cols), ""]
    ood = [r for (f, a, s_), r in sorted(fin.items()) if s_.startswith("ood_") and a == "logistic_regression"]
    if ood:
        held = {(f, a): r for (f, a, s_), r in fin.items() if s_ == "all"}
        lines += ["False alarms on out-of-distribution inputs (FAR in %, logistic regression fitted on the whole pool; the "
                  "held-out FAR of the same feature/attack for comparison):", "",
                  markdown_table([{"feature": r["feature"], "attack": r["attack"], "source": r["slice"][4:],
                                   "n": r.get("n_nonmembers"), "OOD FAR": _pct(r.get("far")),
                                   "held-out FAR": _pct(held.get((r["feature"], r["attack"]), {}).get("far"))}
                                  for r in ood],
                                 [(c, c) for c in ("feature", "attack", "source", "n", "OOD FAR", "held-out FAR")]),
                  ""]
    cal = [(a, s_) for (f, a, s_) in fin if f == "logit_scaled_confidence_calibrated"]
    if cal:
        lines += ["Difficulty calibration (LiRA-style, reference = first audited epoch): TPR at 0.1% / 1% FPR and "
                  "AUC in %, uncalibrated vs calibrated logit-scaled confidence:", "",
                  markdown_table([{"attack": a, "slice": s_,
                                   **{f"{k} {lab}": _pct(fin.get((feat, a, s_), {}).get(m)) for feat, lab in (
                                       ("logit_scaled_confidence", "raw"), ("logit_scaled_confidence_calibrated", "cal."))
                                      for m, k in (("tpr_at_0.1pct_fpr", "TPR@0.1%"), ("tpr_at_1pct_fpr", "TPR@1%"),
                                                   ("auc", "AUC"))}} for a, s_ in sorted(cal)],
                                 [(c, c) for c in ("attack", "slice", "TPR@0.1% raw", "TPR@0.1% cal.", "TPR@1% raw",
                                                   "TPR@1% cal.", "AUC raw", "AUC cal.")]), ""]
    lines += ["The paper's claims, checked on this run "
              "(confidence / logistic regression):", ""]
    lines.append(markdown_table([{"claim": c, "ours": o, "verdict": v} for c, o, v in claims(rows, run["es"])],
                                [("claim", "claim"), ("ours", "ours"), ("verdict", "verdict")]))
    return "\n".join(lines + [""])


def main_study(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-mia study CONFIG... [--fast] [--out FILE] [--runs DIR] [--max-epochs N] [--every N]``."""
    from lightning_mia.report import HelpFormatter

    p = argparse.ArgumentParser(prog="lightning-mia study", formatter_class=HelpFormatter, description=(
        "Train each config with the monitor set to the paper's signals (confidence, intermediate layers -1/-2,\n"
        "distance to the boundary, gradient norms w.r.t. input and weights) and attacks, then write a results\n"
        "page: the final-epoch numbers beside the paper's (Rezaei & Liu 2021, Tables 3-7) and each of its\n"
        "claims checked on the run's history."),
                                epilog="example:\n  lightning-mia study configs/cpu/lenet_fashion_mnist.yaml --pool 1000 "
                                       "--every 5 --out docs/results.md")
    p.add_argument("configs", nargs="+", help="training configs (YAML)")
    p.add_argument("--out", default="docs/results.md", help="results page to write")
    p.add_argument("--runs", default="runs/study", help="where the runs go")
    p.add_argument("--ood", nargs="*", default=[], help="extra OOD sources besides gaussian, rotated, inverted, e.g. "
                   "'{\"name\": \"dataset\", \"datamodule\": {\"name\": \"fashion_mnist\"}}'")
    p.add_argument("--append", action="store_true", help="add sections to an existing results page")
    p.add_argument("--fast", action="store_true", help="CI mode: logistic regression only, 2 repeats")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per config (default: the config's)")
    p.add_argument("--every", type=int, default=None, help="audit every N epochs (default: the config's)")
    p.add_argument("--pool", type=int, default=None,
                   help="members and non-members each (gradient and boundary features cost per sample; default: as "
                        "many as the data allows)")
    args = p.parse_args(argv)
    for c in args.configs:
        if not os.path.isfile(c):
            p.error(f"config {c!r} does not exist")
    attacks = FAST_ATTACKS if args.fast else STUDY_ATTACKS
    header = ["# Results: the paper's study on our runs", "",
             "Generated by `lightning-mia study` (lightning_mia/study.py). Balanced accuracy and FAR are means over "
             "the monitor's repeated 80/20 splits, each attack fitted on each slice separately (all, correctly "
             "classified, misclassified: `fit_per_slice`, as the authors' code); the paper's numbers (Rezaei & Liu "
             "2021, Tables 3–7) are for LeNet on MNIST with the authors' per-class protocol, so they compare in kind, "
             "not digit by digit. TPR at low FPR is resolved only down to 1 / (non-members in the evaluation split): "
             "below that it reads as TPR at FPR 0.",
             ""]
    parts: List[str] = []
    for config in args.configs:
        t0 = time.time()
        features, notes = applicable_features(STUDY_FEATURES, fc_layers(config))
        for n in notes:
            print(f"study: {config}: {n}")
        run_dir = run_config(config, args.runs, args.fast, args.max_epochs, args.every, features, attacks,
                             args.pool, STUDY_OOD + [json.loads(o) if o.startswith("{") else o for o in args.ood])
        command = "lightning-mia study " + shlex.join(argv if argv is not None else sys.argv[2:])  # copy-pastable
        parts.append(section(config, run_dir, command, time.time() - t0, notes))
    from lightning_mia.io import atomic_write_text

    # Decided at write time: another study may have created the page while this one trained.
    old = open(args.out).read().rstrip("\n") + "\n\n" if args.append and os.path.isfile(args.out) else ""
    atomic_write_text(args.out, old + "\n".join(([] if old else header) + parts))
    print(args.out)
    return 0
