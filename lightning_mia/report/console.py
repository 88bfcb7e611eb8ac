"""The lines the monitor prints after each audit (pure: an ``AuditResult`` in, text out).

Each row line shows the attack's balanced accuracy and FAR (mean ± std over the protocol's repeated splits) and
AUC, measured on the *evaluation* split: ``n=`` is the number of members / non-members that were scored (the
``n_eval_members`` / ``n_eval_nonmembers`` row keys, a mean over the repeats), not the slice's pool size.
Undefined values (a slice with one class only, a diverged model) print as ``nan``.

Example:
    >>> from lightning_mia.auditor import AuditResult
    >>> r = AuditResult(epoch=2, target={"train_acc": 1.0, "test_acc": 0.9}, rows=[
    ...     {"feature": "loss", "attack": "threshold", "slice": "all", "balanced_accuracy": 0.61,
    ...      "balanced_accuracy_std": 0.02, "far": 0.3, "far_std": 0.05, "auc": 0.66, "n_members": 200,
    ...      "n_nonmembers": 200, "n_eval_members": 40, "n_eval_nonmembers": 40}])
    >>> print(audit_summary(r, 0.5, 0.1))
    [MIA epoch 2] train acc 1.000 test acc 0.900 (extract 0.5s, attacks 0.1s)
      loss/threshold/all: bal.acc 0.610±0.020 FAR 0.300±0.050 AUC 0.660 (scored n=40/40 of 200/200)
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

#: Metrics shown per row: (row key, short name); those with a ``{key}_std`` get ``±std``.
SUMMARY_METRICS = (("balanced_accuracy", "bal.acc"), ("far", "FAR"), ("auc", "AUC"))


def _value(v: Any) -> float:
    try:
        return float(v) if v is not None and not isinstance(v, (str, bool)) else math.nan
    except (TypeError, ValueError):
        return math.nan


def num(v: Any, digits: int = 3) -> str:
    """A number for a console line: ``digits`` decimals, ``nan`` when missing or not finite."""
    x = _value(v)
    return f"{x:.{digits}f}" if math.isfinite(x) else "nan"


def _with_std(row: Mapping[str, Any], key: str) -> str:
    mean, std = _value(row.get(key)), _value(row.get(f"{key}_std"))
    if math.isfinite(mean) and math.isfinite(std):
        return f"{mean:.3f}±{std:.3f}"
    return num(mean)


def _count(v: Any) -> Optional[str]:
    x = _value(v)
    if not math.isfinite(x):
        return None
    return str(int(round(x))) if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def counts(row: Mapping[str, Any]) -> str:
    """``scored n=M/N of P/Q``: evaluation-split counts (mean over repeats) and the slice's pool counts; just
    ``n=P/Q`` where the protocol reports no evaluation counts."""
    pool = f"{_count(row.get('n_members')) or '?'}/{_count(row.get('n_nonmembers')) or '?'}"
    m, n = _count(row.get("n_eval_members")), _count(row.get("n_eval_nonmembers"))
    if m is None and n is None:
        return f"n={pool}"
    return f"scored n={m or '?'}/{n or '?'} of {pool}"


def audit_summary(result: Any, t_extract: float, t_attack: float) -> str:
    """One header line with the target's accuracies and timings, one line per feature/attack/slice."""
    tgt = result.target
    head = (f"[MIA epoch {result.epoch}] train acc {num(tgt.get('train_acc'))} test acc "
            f"{num(tgt.get('test_acc'))} (extract {t_extract:.1f}s, attacks {t_attack:.1f}s)")
    dropped = max((int(_value(r.get("n_dropped"))) for r in result.rows if math.isfinite(_value(r.get("n_dropped")))),
                  default=0)
    if dropped:
        head += f" — {dropped} samples with NaN/inf model outputs left out"
    parts = [head]
    for r in result.rows:
        keys = (("far", "FAR"),) if str(r["slice"]).startswith("ood_") else SUMMARY_METRICS
        vals = " ".join(f"{short} {_with_std(r, k)}" for k, short in keys)
        parts.append(f"  {r['feature']}/{r['attack']}/{r['slice']}: {vals} ({counts(r)})")
    return "\n".join(parts)


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar that disappears when closed (the audit's own lines stay)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def print_line(trainer: Any, text: str) -> None:
    """Print through the trainer's progress bar when it has one (so bars are not torn), else plainly."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and hasattr(bar, "print"):
        bar.print(text)
    else:
        print(text)
