"""The most exposed samples of an audit: the members an attack is surest about, and the non-members it most
confidently calls members (the false alarms). A table, and a labelled image grid when the data can be shown.

Example:
    >>> import numpy as np
    >>> from lightning_mia.auditor import AuditResult
    >>> from lightning_mia.membership import MembershipData
    >>> d = MembershipData({}, [1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 2, 0], pred=[0, 2, 2, 1], index=[10, 11, 12, 13])
    >>> r = AuditResult(epoch=0, data=d, scores={("loss", "threshold"): np.array([0.9, 0.2, 0.8, 0.1])},
    ...                 rows=[{"feature": "loss", "attack": "threshold", "slice": "all", "auc": 0.75}])
    >>> [(t["kind"], t["index"]) for t in exposed_samples(r, top_k=1)]
    [('member', 10), ('false_alarm', 12)]
"""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Columns of ``mia/exposed/epoch_NNNN.csv``.
EXPOSED_COLUMNS = ("kind", "rank", "feature", "attack", "index", "position", "label", "predicted", "correct", "score")


def strongest_pair(result: Any) -> Optional[Tuple[str, str]]:
    """The (feature, attack) with the highest AUC on all samples that has per-sample scores."""
    best = None
    for r in result.rows:
        key = (r["feature"], r["attack"])
        if r["slice"] == "all" and key in result.scores and np.isfinite(r.get("auc", np.nan)):
            if best is None or r["auc"] > best[0]:
                best = (r["auc"], key)
    return None if best is None else best[1]


def exposed_samples(result: Any, top_k: int = 16, pair: Optional[Tuple[str, str]] = None) -> List[Dict[str, Any]]:
    """The ``top_k`` members with the highest attack scores and the ``top_k`` highest-scoring non-members."""
    pair = pair or strongest_pair(result)
    if pair is None:
        return []
    d, s = result.data, np.asarray(result.scores[pair], dtype=np.float64)
    out = []
    for kind, side in (("member", d.is_member), ("false_alarm", ~d.is_member)):
        rows = np.flatnonzero(side & np.isfinite(s))
        for rank, i in enumerate(rows[np.argsort(-s[rows], kind="stable")][:top_k]):
            out.append({"kind": kind, "rank": rank, "feature": pair[0], "attack": pair[1], "index": int(d.index[i]),
                        "position": int(d.position[i]), "label": int(d.label[i]), "predicted": int(d.pred[i]),
                        "correct": bool(d.correct[i]), "score": float(s[i])})
    return out


def exposed_csv(rows: Sequence[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPOSED_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in EXPOSED_COLUMNS})
    return buf.getvalue()


def sample_image(dataset: Any, position: int) -> Optional[np.ndarray]:
    """An ``(H, W, 3)`` float image in [0, 1] of ``dataset[position]``, un-normalised, or ``None`` when the dataset
    cannot show one: its own ``display_image(position)``, else the stored pixels of an in-memory split
    (``data`` scaled by ``input_scale``, as the package's datamodules keep them)."""
    show = getattr(dataset, "display_image", None)
    if callable(show):
        img = np.asarray(show(position), dtype=np.float64)
    elif hasattr(dataset, "data") and hasattr(dataset, "input_scale"):
        img = np.asarray(dataset.data[position], dtype=np.float64) * float(dataset.input_scale)
        img = np.moveaxis(img, 0, -1) if img.ndim == 3 else img
    else:
        return None
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img[..., :3], 0.0, 1.0)


def exposed_figure(rows: Sequence[Dict[str, Any]], images: Sequence[Optional[np.ndarray]], epoch: int,
                   class_names: Optional[Sequence[str]] = None) -> Any:
    """Two rows of labelled images: members the attack is surest about, and its most confident false alarms.

    One mosaic on one axes, labels as text and a fixed layout: it is drawn once per audit, and a grid of
    ``2 x k`` axes under the constrained layout cost 5x as much (about 1 s of CPU for k = 16 on our machines).
    """
    from matplotlib.figure import Figure

    kinds = [("member", "members called members"), ("false_alarm", "non-members called members (false alarms)")]
    k = max(1, max((sum(r["kind"] == kind for r in rows) for kind, _ in kinds), default=1))
    name = (lambda c: str(class_names[c]) if class_names and 0 <= c < len(class_names) else str(c))
    shown = [np.asarray(im) for im in images if im is not None] or [np.zeros((8, 8, 3))]
    h, w = max(im.shape[0] for im in shown), max(im.shape[1] for im in shown)
    head, band = 0.4 * h, 0.55 * h  # room for the row's title, then the two label lines, in mosaic pixels
    cell_h, cell_w = head + band + h, 1.25 * w
    mosaic = np.ones((int(round(2 * cell_h)), int(round(k * cell_w)), 3))
    fig = Figure(figsize=(1.3 * k, 3.8), dpi=100)
    ax = fig.add_axes((0.01, 0.0, 0.98, 0.92))
    ax.set_axis_off()
    for row_i, (kind, title) in enumerate(kinds):
        picked = [(r, im) for r, im in zip(rows, images) if r["kind"] == kind]
        for j, (r, im) in enumerate(picked[:k]):
            y0, x0 = int(round(row_i * cell_h + head + band)), int(round(j * cell_w + (cell_w - w) / 2))
            tile = np.zeros((8, 8, 3)) if im is None else np.asarray(im)[..., :3]
            mosaic[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
            ax.text(x0 + w / 2, y0 - 1, f"#{r['index']} y={name(r['label'])}\npred={name(r['predicted'])} "
                    f"s={r['score']:.2g}", ha="center", va="bottom", fontsize=6)
        ax.text(0, row_i * cell_h + head, title if k > 2 else kind, ha="left", va="bottom", fontsize=7,
                fontweight="bold")
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    pair = f"{rows[0]['feature']} / {rows[0]['attack']}" if rows else ""
    fig.suptitle(f"Most exposed samples at epoch {epoch} ({pair})", fontsize=8)
    return fig
