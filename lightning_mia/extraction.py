"""One inference pass over audit samples: logits, correctness, loss and every feature, per sample.

Used by the monitor on each rank's shard; plain torch, usable outside Lightning.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

BATCH_HELP = (
    "Audit datasets must yield (x, y, index) items: index is the sample's position in its split. "
    "Wrap an (x, y) dataset with lightning_mia.data.IndexedDataset(dataset)."
)


def check_item(item: Any, where: str) -> None:
    """Fail early, with the fix, when a dataset does not yield ``(x, y, index)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        got = f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise TypeError(f"The {where} yields {got}. {BATCH_HELP}")


def _unpack(batch: Any, where: str):
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        check_item(batch, where)
    return batch[0], batch[1], batch[2]


def extract_pass(
    model: torch.nn.Module,
    dataset: Dataset,
    positions: Sequence[int],
    features: Mapping[str, Any],
    batch_size: int = 512,
    device: Optional[torch.device] = None,
    progress: Optional[Any] = None,
    where: str = "audit dataset",
) -> Dict[str, np.ndarray]:
    """Run ``model`` (eval mode, restored afterwards) over ``dataset[positions]``.

    Returns arrays ``position``, ``index``, ``label``, ``pred``, ``correct``, ``loss`` and ``feat:{name}`` (n, d).
    ``progress`` (optional) is called with the number of samples done after each batch.
    """
    positions = np.asarray(positions, dtype=np.int64)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in ("index", "label", "pred", "correct", "loss")}
    feats: Dict[str, List[np.ndarray]] = {name: [] for name in features}
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        if len(positions):
            check_item(dataset[int(positions[0])], where)
        loader = DataLoader(Subset(dataset, positions.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in loader:
            x, y, idx = _unpack(batch, where)
            x = x.to(device)
            y = y.to(device).long()
            with torch.no_grad():
                logits = model(x)
                # y = -1: an unlabelled sample (e.g. OOD noise): label-dependent features use the predicted class
                y = torch.where(y < 0, logits.argmax(dim=1), y)
                hook = getattr(model, "mia_loss", None)  # optional per-sample loss of the user's module
                loss = hook(logits, y) if callable(hook) else F.cross_entropy(logits.float(), y, reduction="none")
                pred = logits.argmax(dim=1)
            out["index"].append(torch.as_tensor(idx).cpu().numpy().astype(np.int64))
            out["label"].append(y.cpu().numpy())
            out["pred"].append(pred.cpu().numpy())
            out["correct"].append((pred == y).cpu().numpy())
            out["loss"].append(loss.float().cpu().numpy())
            for name, feat in features.items():
                ctx = torch.enable_grad() if getattr(feat, "requires_grad", False) else torch.no_grad()
                with ctx:
                    values = feat.extract(model, x, y, logits)
                values = torch.as_tensor(values).detach().float().reshape(len(x), -1)
                feats[name].append(values.cpu().numpy())
            if progress is not None:
                progress(len(x))
    finally:
        model.train(was_training)
    arrays: Dict[str, np.ndarray] = {"position": positions}
    for k, parts in out.items():
        arrays[k] = np.concatenate(parts) if parts else np.zeros(0)
    for name, parts in feats.items():
        arrays[f"feat:{name}"] = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    arrays["correct"] = arrays["correct"].astype(bool)
    return arrays


def concat_arrays(parts: Iterable[Mapping[str, np.ndarray]], key: str = "position") -> Dict[str, np.ndarray]:
    """Concatenate per-shard arrays array by array, then order by ``key`` and drop repeated keys."""
    parts = list(parts)
    parts = [p for p in parts if len(p["position"])] or parts[:1]  # empty shards (more ranks than samples)
    keys = list(parts[0].keys())
    merged = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}
    _, first = np.unique(merged[key], return_index=True)  # de-duplicate (padded shards), sorted by key
    return {k: v[first] for k, v in merged.items()}
