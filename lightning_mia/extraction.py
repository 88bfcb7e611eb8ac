"""The audit pass over one dataset shard: ``(x, y, index)`` items in, a :class:`MembershipData` out.

Used by the monitor on each rank's shard; plain torch, usable outside Lightning. The loop itself is
:func:`lightning_mia.features.run_extraction` (shared with :func:`lightning_mia.features.extract_features`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_mia.features.extract import run_extraction
from lightning_mia.membership import MembershipData

BATCH_HELP = (
    "Audit datasets must yield (x, y, index) items: index is the sample's position in its split. "
    "Wrap an (x, y) dataset with lightning_mia.data.IndexedDataset(dataset)."
)


def check_item(item: Any, where: str) -> None:
    """Fail early, with the fix, when a dataset does not yield ``(x, y, index)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        got = f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise TypeError(f"The {where} yields {got}. {BATCH_HELP}")


def _indexed_batches(loader: DataLoader, where: str) -> Iterator[Any]:
    for batch in loader:
        check_item(batch, where)
        yield batch[0], batch[1], batch[2]


def extract_pass(
    model: torch.nn.Module,
    dataset: Dataset,
    positions: Sequence[int],
    features: Mapping[str, Any],
    batch_size: int = 512,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[int], None]] = None,
    where: str = "audit dataset",
    is_member: bool = False,
    source: int = 0,
    forward: Optional[Callable[..., torch.Tensor]] = None,
) -> MembershipData:
    """Run ``model`` (eval mode; each submodule's mode restored afterwards) over ``dataset[positions]``.

    ``is_member`` and ``source`` (0 = the audit pool, k = the k-th OOD source) label every returned sample.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions):
        check_item(dataset[int(positions[0])], where)
    loader = DataLoader(Subset(dataset, positions.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    a = run_extraction(model, _indexed_batches(loader, where), features, device=device, progress=progress,
                       forward=forward)
    n = len(positions)
    return MembershipData(features={tag: a[f"feat:{tag}"] for tag in features}, is_member=np.full(n, is_member),
                          correct=a["correct"], label=a["label"], loss=a["loss"], pred=a["pred"], index=a["index"],
                          position=positions, source=np.full(n, source))
