"""The audit pass over one dataset shard: ``(x, y, index)`` items in, a :class:`MembershipData` out.

Used by the monitor on each rank's shard; plain torch, usable outside Lightning. The loop itself is
:func:`lightning_mia.features.run_extraction` (shared with :func:`lightning_mia.features.extract_features`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_mia.features.extract import AuditForward, ForwardFn, run_extraction
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


def _batches_of(dataset: Dataset, positions: np.ndarray, batch_size: int, where: str) -> Iterator[Any]:
    """``(x, y, index)`` batches of ``dataset[positions]``: an in-memory split without a transform (the package's
    :class:`~lightning_mia.data.IndexedTensorDataset`) gives each batch in one slice (``items_at``, the same values as
    item by item); any other dataset goes through a ``DataLoader``."""
    if getattr(dataset, "transform", True) is None and callable(getattr(dataset, "items_at", None)):
        for start in range(0, len(positions), batch_size):
            yield dataset.items_at(positions[start:start + batch_size])
        return
    loader = DataLoader(Subset(dataset, positions.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    yield from _indexed_batches(loader, where)


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
    forward: Union[None, AuditForward, ForwardFn] = None,
    keep_logits: bool = False,
    stop_check: Optional[Callable[[], None]] = None,
) -> MembershipData:
    """Run ``model`` (eval mode; each submodule's mode restored afterwards) over ``dataset[positions]``.

    ``is_member`` and ``source`` (0 = the audit pool, k = the k-th OOD source, -1 = population samples of the
    reference-model attacks) label every returned sample; ``keep_logits`` keeps the target's logits in
    ``extra["logits"]`` (the reference-model attacks read them). ``forward`` and ``stop_check``: see
    :func:`lightning_mia.features.extract.run_extraction`.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions):
        check_item(dataset[int(positions[0])], where)
    a = run_extraction(model, _batches_of(dataset, positions, batch_size, where), features, device=device,
                       progress=progress, forward=forward, stop_check=stop_check)
    n = len(positions)
    return MembershipData(features={tag: a[f"feat:{tag}"] for tag in features}, is_member=np.full(n, is_member),
                          correct=a["correct"], label=a["label"], loss=a["loss"], pred=a["pred"], index=a["index"],
                          position=positions, source=np.full(n, source),
                          extra={"logits": a["logits"]} if keep_logits else {})


def extract_sharded(model: torch.nn.Module, sources: Sequence[Tuple[bool, Any, np.ndarray, str, int]],
                    features: Mapping[str, Any], rank: int = 0, world: int = 1, batch_size: int = 512,
                    verbose: bool = True, keep_logits: bool = False,
                    forward: Union[None, AuditForward, ForwardFn] = None,
                    stop_check: Optional[Callable[[], None]] = None) -> MembershipData:
    """One pass over every source ``(is_member, dataset, positions, where, source)``: this rank takes the
    disjoint shard ``positions[rank::world]`` of each (no padding, no duplicates), and under an initialised
    process group the shards are gathered, so every rank returns the whole, ordered :class:`MembershipData`.
    A progress bar shows on rank zero for gradient features or large pools.

    ``forward`` (an :class:`~lightning_mia.features.extract.AuditForward`) says how the model runs; ``stop_check()``
    is called before every batch and raises to stop the pass. For a LightningModule attached to a Trainer both
    default to the trainer's: :func:`lightning_mia.compat.audit_forward` (its precision plugin's input conversion
    and forward context, the module's ``transfer_batch_to_device``) and :func:`lightning_mia.compat.sigterm_check`
    (a SIGTERM stops the audit within one batch, by Lightning's own ``SIGTERMException``)."""
    from lightning_mia.compat import audit_forward, sigterm_check, trainer_of

    trainer = trainer_of(model)
    if forward is None and trainer is not None:
        forward = audit_forward(trainer, model)
    if stop_check is None and trainer is not None:
        stop_check = sigterm_check(trainer)
    slow = any(getattr(f, "requires_grad", False) for f in features.values())
    total = sum((len(pos) + world - 1) // world for _, _, pos, _, _ in sources)
    bar = None
    if verbose and rank == 0 and (slow or total > 20000):
        from lightning_mia.report.console import progress_bar

        bar = progress_bar(total, "MIA features")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        parts = [extract_pass(model, ds, np.asarray(positions)[rank::world], features, batch_size=batch_size,
                              device=device, progress=bar.update if bar else None, where=where,
                              is_member=is_member, source=source, keep_logits=keep_logits, forward=forward,
                              stop_check=stop_check)
                 for is_member, ds, positions, where, source in sources]
    finally:
        if bar is not None:
            bar.close()
    local = MembershipData.concat(parts)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: List[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        local = MembershipData.concat(gathered)
    return local
