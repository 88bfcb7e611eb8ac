"""Privacy budgets against the epoch: the DP accountant's epsilon (proven upper bound) next to the empirical lower
bounds the attacks measure -- per feature/attack from the pool (``epsilon_lb``) and from the canaries
(``epsilon_one_run``) -- for one run or several (e.g. a DP run and its non-private twin).

Example:
    >>> rows = [{"epoch": e, "feature": "loss", "attack": "threshold", "slice": "all", "epsilon_lb": 0.1 * e,
    ...          "dp_epsilon": 1.0 + e} for e in range(3)]
    >>> fig = epsilon_figure({"dp": rows})
    >>> len(fig.axes)
    1
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from lightning_mia.validation import as_float


def epsilon_series(rows: Sequence[Mapping[str, Any]]) -> Dict[str, List[Tuple[int, float]]]:
    """``{"accountant": [(epoch, eps)], "pool: f/a": [...], "canaries: f/a": [...]}`` from history rows."""
    out: Dict[str, Dict[int, float]] = {}
    for r in rows:
        e = int(r["epoch"])
        if math.isfinite(as_float(r.get("dp_epsilon"))):
            out.setdefault("accountant (upper bound)", {})[e] = as_float(r["dp_epsilon"])
        key, col = ((f"pool: {r['feature']}/{r['attack']}", "epsilon_lb") if r.get("slice") == "all" else
                    (f"canaries: {r['feature']}/{r['attack']}", "epsilon_one_run") if r.get("slice") == "canaries"
                    else (None, None))
        if key is not None and math.isfinite(as_float(r.get(col))):
            out.setdefault(key, {})[e] = as_float(r[col])
    return {k: sorted(v.items()) for k, v in out.items()}


def epsilon_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "Privacy budget: proven vs measured"
                   ) -> Any:
    """One panel: per run, the accountant's epsilon (solid, thick) and each measured lower bound (dashed: pool
    attacks, dotted: canaries) against the epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    colors = ["C0", "C3", "C2", "C1", "C4", "C5"]
    for i, (label, rows) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        for name, pts in epsilon_series(rows).items():
            if not pts:
                continue
            x, y = zip(*pts)
            style = dict(lw=2.5, ls="-") if name.startswith("accountant") else dict(
                lw=1.2, ls="--" if name.startswith("pool") else ":", marker=".")
            ax.plot(x, y, color=c, label=f"{label}: {name}", **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
