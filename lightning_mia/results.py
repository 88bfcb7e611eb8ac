"""Sections of ``docs/results.md`` for the strong attacks, the privacy budgets and the trajectory attack, from
finished runs (the study of the paper's claims is :mod:`lightning_mia.study`).

    python -m lightning_mia.results references RUN_DIR [RUN_DIR ...] --out docs/results.md --append
    python -m lightning_mia.results dp RUN_DIR [RUN_DIR ...] --labels ... --out docs/results.md --append
    python -m lightning_mia.results trajectory RUN_DIR --out docs/results.md --append

Each section names the command that trained its runs (``--command``) and the figures it writes beside the page.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lightning_mia.layout import RunLayout
from lightning_mia.report.history import read_history
from lightning_mia.validation import as_float

REFERENCE_ATTACKS = ("lira", "rmia")


def _last(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    last = max(int(r["epoch"]) for r in rows)
    return [r for r in rows if int(r["epoch"]) == last]


def _pct(x: Any, digits: int = 1) -> str:
    v = as_float(x)
    return "–" if math.isnan(v) else f"{100 * v:.{digits}f}"


def _num(x: Any, digits: int = 3) -> str:
    v = as_float(x)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def reference_gap(rows: Sequence[Mapping[str, Any]], slice_: str = "all") -> Dict[str, Any]:
    """At the last epoch: the best paper attack by TPR at 1% FPR, and each reference attack's ratio to it."""
    last = [r for r in _last(rows) if r["slice"] == slice_]
    paper = [r for r in last if r["attack"] not in REFERENCE_ATTACKS]
    best = max(paper, key=lambda r: (as_float(r.get("tpr_at_1pct_fpr")), as_float(r.get("auc"))), default=None)
    best_auc = max((as_float(r.get("auc")) for r in paper), default=math.nan)
    out: Dict[str, Any] = {"best_paper": best, "best_paper_auc": best_auc, "reference": {}}
    for r in last:
        if r["attack"] in REFERENCE_ATTACKS and best is not None:
            b = as_float(best.get("tpr_at_1pct_fpr"))
            out["reference"][r["attack"]] = {
                "row": r, "tpr_ratio": as_float(r.get("tpr_at_1pct_fpr")) / b if b > 0 else math.inf,
                "auc_ok": as_float(r.get("auc")) >= best_auc}
    return out


def roc_figure_of_run(run_dir: str, epoch: Optional[int] = None) -> Tuple[Any, int]:
    """The log-log ROC of every attack in a run's predictions file (the last one, or ``epoch``)."""
    from lightning_mia.report.attack_roc import roc_overlay_figure

    files = RunLayout(run_dir).prediction_files()
    if not files:
        raise FileNotFoundError(f"{run_dir}: no predictions (run with save_predictions: true)")
    epoch = max(files) if epoch is None else epoch
    with np.load(files[epoch], allow_pickle=False) as pred:
        y = pred["is_member"].astype(bool)
        curves = {}
        for k in pred.files:
            if k.startswith("score__"):
                _, f, a = k.split("__", 2)
                s = pred[k].astype(float)
                ok = np.isfinite(s)
                curves[f"{f} / {a}"] = (y[ok], s[ok])
    return roc_overlay_figure(curves, f"{os.path.basename(os.path.dirname(run_dir.rstrip('/')))}, epoch {epoch}"), epoch


def references_section(run_dirs: Sequence[str], out_dir: str, command: str = "") -> str:
    from lightning_mia.report.plots import save_figure

    md = ["## Reference-model attacks: LiRA and RMIA live", ""]
    if command:
        md += ["```bash", command, "```", ""]
    md += ["Every attack scores the whole audit pool: the paper's attacks cross-fitted (`folds: 5`, each sample "
           "scored by a model not fitted on it), LiRA and RMIA from the reference models trained alongside the "
           "target. TPR at 1% FPR with its 95% Clopper-Pearson interval; `–` where the budget is finer than "
           "1/(non-members) and cannot be resolved.", ""]
    for run in run_dirs:
        rows = read_history(RunLayout(run).history)
        gap = reference_gap(rows)
        last = [r for r in _last(rows) if r["slice"] == "all"]
        name = os.path.basename(os.path.dirname(run.rstrip("/")))
        t = last[0]
        md += [f"### {name} (epoch {int(t['epoch'])}: train acc {_num(t.get('train_acc'))}, test acc "
               f"{_num(t.get('test_acc'))}; references {_num(t.get('reference_train_acc'))} / "
               f"{_num(t.get('reference_test_acc'))})", ""]
        md += [_table(["feature / attack", "AUC", "TPR@1%FPR % [95% CI]", "TPR@0.1%FPR %", "bal. acc.",
                       "non-members", "epsilon_lb"],
                      [[f"{r['feature']} / {r['attack']}", _num(r.get("auc")),
                        f"{_pct(r.get('tpr_at_1pct_fpr'))} [{_pct(r.get('tpr_at_1pct_fpr_lo'))}, "
                        f"{_pct(r.get('tpr_at_1pct_fpr_hi'))}]", _pct(r.get("tpr_at_0.1pct_fpr"), 2),
                        _num(r.get("balanced_accuracy")), str(int(as_float(r.get("n_eval_nonmembers")) or 0)),
                        _num(r.get("epsilon_lb"), 2)] for r in last]), ""]
        best = gap["best_paper"]
        if best is not None:
            for a, g in gap["reference"].items():
                verdict = "holds" if g["tpr_ratio"] >= 3 and g["auc_ok"] else "does not hold"
                md.append(f"- {a}: TPR@1%FPR {g['tpr_ratio']:.1f}x the best paper attack's "
                          f"({best['feature']} / {best['attack']}), AUC {_num(g['row'].get('auc'))} vs the best "
                          f"paper AUC {_num(gap['best_paper_auc'])}: the >= 3x and >= AUC claim {verdict}.")
        fig, epoch = roc_figure_of_run(run)
        path = save_figure(fig, os.path.join(out_dir, f"roc_{name}.png"))
        md += ["", f"![log-log ROC, {name}]({os.path.relpath(path, os.path.dirname(out_dir) or '.')})", ""]
    return "\n".join(md)


def dp_section(run_dirs: Sequence[str], labels: Sequence[str], out_dir: str, command: str = "") -> str:
    from lightning_mia.report.plots import save_figure
    from lightning_mia.report.privacy import epsilon_figure

    md = ["## Privacy budgets: DP-SGD next to what the attacks measure", ""]
    if command:
        md += ["```bash", command, "```", ""]
    md += ["The accountant's epsilon is a proven upper bound; `epsilon_lb` (from the audit pool, 95% confidence, "
           "delta 0) and `epsilon_one_run` (from the canaries, Steinke et al. 2023) are measured lower bounds. A "
           "lower bound above the accountant would be a bug in one of them.", ""]
    table, runs = [], {}
    for run, label in zip(run_dirs, labels):
        rows = read_history(RunLayout(run).history)
        runs[label] = rows
        last = _last(rows)
        all_rows = [r for r in last if r["slice"] == "all"]
        can = [r for r in last if r["slice"] == "canaries"]
        t = all_rows[0]
        best = max(all_rows, key=lambda r: as_float(r.get("auc")))
        table.append([label, str(int(t["epoch"])), _num(t.get("test_acc")), _num(t.get("dp_epsilon"), 2),
                      _num(max((as_float(r.get("epsilon_lb")) for r in all_rows), default=math.nan), 2),
                      _num(max((as_float(r.get("epsilon_one_run")) for r in can), default=math.nan), 2),
                      _num(best.get("balanced_accuracy")), _num(best.get("far")), _num(best.get("auc")),
                      _pct(best.get("tpr_at_1pct_fpr"))])
    md += [_table(["run", "epoch", "test acc", "accountant eps", "max epsilon_lb", "max epsilon_one_run",
                   "bal. acc.", "FAR", "AUC", "TPR@1%FPR %"], table), "",
           "(bal. acc., FAR, AUC, TPR: the attack with the highest AUC on all samples at the last epoch.)", ""]
    path = save_figure(epsilon_figure(runs), os.path.join(out_dir, "privacy_budget.png"))
    md += [f"![epsilon against the epoch]({os.path.relpath(path, os.path.dirname(out_dir) or '.')})", ""]
    return "\n".join(md)


def trajectory_section(run_dir: str, out_dir: str, command: str = "") -> str:
    import shutil

    md = ["## What leaks, and when: the loss trajectory and the most exposed samples", ""]
    if command:
        md += ["```bash", command, "```", ""]
    rows = [r for r in _last(read_history(RunLayout(run_dir).history)) if r["slice"] in ("all", "correct",
                                                                                           "misclassified")]
    md += ["`trajectory` attacks the loss at every audited epoch so far (cross-fitted logistic regression), "
           "`trajectory_drop` the fall of the loss since the first audit (no fitting); beside them the "
           "single-epoch attacks of the same run.", ""]
    md += [_table(["feature / attack", "slice", "AUC", "TPR@1%FPR %", "bal. acc."],
                  [[f"{r['feature']} / {r['attack']}", r["slice"], _num(r.get("auc")), _pct(r.get("tpr_at_1pct_fpr")),
                    _num(r.get("balanced_accuracy"))] for r in rows if r["attack"] not in REFERENCE_ATTACKS]), ""]
    layout = RunLayout(run_dir)
    pngs = sorted(p for p in os.listdir(os.path.dirname(layout.exposed(0))) if p.endswith(".png")) if \
        os.path.isdir(os.path.dirname(layout.exposed(0))) else []
    if pngs:
        dst = os.path.join(out_dir, "exposed_" + pngs[-1])
        shutil.copyfile(os.path.join(os.path.dirname(layout.exposed(0)), pngs[-1]), dst)
        md += ["The most exposed samples at the last audit (top: members the strongest attack is surest about; "
               "bottom: non-members it most confidently calls members):", "",
               f"![most exposed samples]({os.path.relpath(dst, os.path.dirname(out_dir) or '.')})", ""]
    return "\n".join(md)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_mia.results", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("section", choices=["references", "dp", "trajectory"])
    p.add_argument("runs", nargs="+", help="run directories (the loggers' log_dir)")
    p.add_argument("--labels", nargs="*", default=None, help="one label per run (dp)")
    p.add_argument("--out", default="docs/results.md", help="results page")
    p.add_argument("--append", action="store_true", help="append to the page instead of replacing it")
    p.add_argument("--command", default="", help="the command that trained the runs, shown above the section")
    a = p.parse_args(argv)
    fig_dir = os.path.join(os.path.dirname(a.out) or ".", "results")
    os.makedirs(fig_dir, exist_ok=True)
    if a.section == "references":
        text = references_section(a.runs, fig_dir, a.command)
    elif a.section == "dp":
        text = dp_section(a.runs, a.labels or [os.path.basename(r.rstrip("/")) for r in a.runs], fig_dir, a.command)
    else:
        text = trajectory_section(a.runs[0], fig_dir, a.command)
    from lightning_mia.io import atomic_write_text

    old = open(a.out).read().rstrip("\n") + "\n\n" if a.append and os.path.isfile(a.out) else ""
    atomic_write_text(a.out, old + text)
    print(f"wrote {a.section} section to {a.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
