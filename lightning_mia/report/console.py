"""The lines the monitor prints after each audit (pure: an ``AuditResult`` in, text out).

Example:
    >>> from lightning_mia.auditor import AuditResult
    >>> r = AuditResult(epoch=2, target={"train_acc": 1.0, "test_acc": 0.9}, rows=[
    ...     {"feature": "loss", "attack": "threshold", "slice": "all", "balanced_accuracy": 0.61, "far": 0.3,
    ...      "auc": 0.66, "n_members": 40, "n_nonmembers": 40}])
    >>> print(audit_summary(r, 0.5, 0.1))
    [MIA epoch 2] train acc 1.000 test acc 0.900 (extract 0.5s, attacks 0.1s)
      loss/threshold/all: bal.acc 0.610 FAR 0.300 AUC 0.660 (n=40/40)
"""
from __future__ import annotations

from typing import Any

#: Metrics shown per row: (row key, short name).
SUMMARY_METRICS = (("balanced_accuracy", "bal.acc"), ("far", "FAR"), ("auc", "AUC"))


def audit_summary(result: Any, t_extract: float, t_attack: float) -> str:
    """One header line with the target's accuracies and timings, one line per feature/attack/slice."""
    tgt = result.target
    nan = float("nan")
    parts = [f"[MIA epoch {result.epoch}] train acc {tgt.get('train_acc', nan):.3f} test acc "
             f"{tgt.get('test_acc', nan):.3f} (extract {t_extract:.1f}s, attacks {t_attack:.1f}s)"]
    for r in result.rows:
        keys = (("far", "FAR"),) if r["slice"].startswith("ood_") else SUMMARY_METRICS
        vals = " ".join(f"{short} {r.get(k, nan):.3f}" for k, short in keys)
        parts.append(f"  {r['feature']}/{r['attack']}/{r['slice']}: {vals} "
                     f"(n={r.get('n_members')}/{r.get('n_nonmembers')})")
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
