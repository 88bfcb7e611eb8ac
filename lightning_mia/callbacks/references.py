"""Reference models trained alongside the target, for the reference-model attacks (LiRA, RMIA).

:class:`ReferenceModels` is the monitor's option; :class:`ReferenceTrainer` is what the monitor delegates to: it
draws the reference population, trains the K references one epoch each time the target finishes one (on the
target's own architecture and recipe, :class:`lightning_mia.reference.ReferenceEnsemble`), shards them over DDP
ranks, and turns their logits into :class:`lightning_mia.attacks.ReferenceSignals` at each audit.

Population (Carlini et al. 2022, Sec. IV): ``online`` -- the members and the held-out split, audit pool included,
so every audit sample is IN for exactly half of the references; ``offline`` -- the same without the audit pool,
so no reference ever trains on an audit sample. Either way ``population_z`` held-out samples outside the pool
are kept out of every model: they are RMIA's population samples z.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Literal, Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset

from lightning_mia.attacks.reference import ReferenceSignals
from lightning_mia.membership import MembershipData
from lightning_mia.validation import check_int

#: ``MembershipData.source`` of RMIA's population samples z.
POPULATION_SOURCE = -1


@dataclass(frozen=True)
class ReferenceModels:
    """The monitor's ``reference_models`` option (YAML: ``reference_models: {count: 8, mode: online}``).

    Args:
        count: number of reference models K (each trains on half of the population: K/2 IN per sample).
        mode: ``online`` (audit samples in the population) or ``offline`` (never trained on by a reference).
        population_z: held-out samples outside the audit pool kept out of every model (RMIA's z).
        vectorize: train the K references as one vectorised ensemble (``auto``: where the model allows).
        batch_size: reference training batch size (default: the datamodule's ``batch_size``, else 64).
        seed: seeds the population halves and the references (default: the monitor's seed).

    Example:
        >>> ReferenceModels(count=4, mode="offline").count
        4
    """

    count: int = 8
    mode: Literal["online", "offline"] = "online"
    population_z: int = 500
    vectorize: Literal["auto", "always", "never"] = "auto"
    batch_size: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("reference_models.count", self.count, 2)
        if self.mode not in ("online", "offline"):
            raise ValueError(f"reference_models.mode must be one of ['online', 'offline'], got {self.mode!r}")
        if self.vectorize not in ("auto", "always", "never"):
            raise ValueError(f"reference_models.vectorize must be one of ['auto', 'always', 'never'], "
                             f"got {self.vectorize!r}")
        check_int("reference_models.population_z", self.population_z, 0)
        check_int("reference_models.batch_size", self.batch_size, 1, allow_none=True)
        check_int("reference_models.seed", self.seed, 0, allow_none=True)


def half_in_mask(count: int, n: int, seed: int) -> np.ndarray:
    """``(count, n)`` bool: each item IN for exactly ``count // 2`` references, chosen at random (as LiRA's
    ``keep = order < pkeep * num_experiments`` with pkeep 0.5)."""
    rng = np.random.default_rng([seed, 7])
    order = rng.random((count, n)).argsort(axis=0)
    return order < count // 2


def _population(members: Any, nonmembers: Any, mem: np.ndarray, non: np.ndarray) -> Any:
    """The members at ``mem`` followed by the non-members at ``non``: one in-memory split when both are the
    package's tensor datasets with the same normalisation (fast batched reads), else a ``ConcatDataset``."""
    from lightning_mia.data.base import IndexedTensorDataset

    both = isinstance(members, IndexedTensorDataset) and isinstance(nonmembers, IndexedTensorDataset)
    if both and torch.equal(members.mean, nonmembers.mean) and torch.equal(members.std, nonmembers.std) and \
            members.input_scale == nonmembers.input_scale and members.data.dtype == nonmembers.data.dtype:
        a, b = members.subset(mem), nonmembers.subset(non)
        return IndexedTensorDataset(torch.cat([a.data, b.data]), torch.cat([a.targets, b.targets]),
                                    indices=torch.cat([a.indices, b.indices]), mean=a.mean.flatten().tolist(),
                                    std=a.std.flatten().tolist(), input_scale=a.input_scale, seed=a.seed)
    return ConcatDataset([Subset(members, mem.tolist()), Subset(nonmembers, non.tolist())])


class ReferenceTrainer:
    """The monitor's reference-model side (see the module docstring); collectives run on every rank."""

    def __init__(self, config: ReferenceModels, seed: int) -> None:
        self.config = config
        self.seed = int(config.seed if config.seed is not None else seed)
        self.ensemble: Any = None
        self.z_positions = np.zeros(0, np.int64)
        self._pop_members = self._pop_nonmembers = np.zeros(0, np.int64)
        self._in_mask = np.zeros((config.count, 0), bool)
        self._state: Optional[Dict[str, Any]] = None
        self.trained_epoch = -1

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, members: Any, nonmembers: Any, pool: Any) -> None:
        from lightning_mia.reference import ReferenceEnsemble

        rng = np.random.default_rng([self.seed, 11])
        outside = np.setdiff1d(np.arange(len(nonmembers)), pool.nonmember_positions)
        self.z_positions = np.sort(rng.permutation(outside)[:self.config.population_z])
        mem = np.arange(len(members))
        non = np.setdiff1d(np.arange(len(nonmembers)), self.z_positions)
        if self.config.mode == "offline":
            mem = np.setdiff1d(mem, pool.member_positions)
            non = np.setdiff1d(non, pool.nonmember_positions)
        if len(mem) + len(non) < 2 * self.config.count:
            raise ValueError(f"reference_models ({self.config.mode}) has only {len(mem) + len(non)} population "
                             "samples to train on: use mode online, or a smaller audit pool / population_z")
        self._pop_members, self._pop_nonmembers = mem, non
        self._in_mask = half_in_mask(self.config.count, len(mem) + len(non), self.seed)
        dm = getattr(trainer, "datamodule", None)
        population = self._train_view(dm, _population(members, nonmembers, mem, non))
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, self.config.count, world))
        batch = self.config.batch_size or int(getattr(dm, "batch_size", 64) or 64)
        self.ensemble = ReferenceEnsemble(pl_module, count=self.config.count, seed=self.seed,
                                          vectorize=self.config.vectorize, batch_size=batch,
                                          device=pl_module.device, indices=mine)
        self.ensemble.setup(population, in_mask=self._in_mask[mine], max_epochs=trainer.max_epochs)
        if self._state is not None:
            self.ensemble.load_state_dict(self._state)
            self._state = None

    @staticmethod
    def _train_view(dm: Any, dataset: Any) -> Any:
        """The dataset with the datamodule's train-time augmentation, when it has one (references use the
        target's recipe); the plain dataset otherwise."""
        transform = getattr(dm, "_train_transform", None)
        if callable(transform) and hasattr(dataset, "with_transform") and transform() is not None:
            return dataset.with_transform(transform(), seed=getattr(dm, "seed", 0))
        return dataset

    # -- training -------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """Train every reference one epoch, once per target epoch (the monitor may ask twice per epoch)."""
        if epoch <= self.trained_epoch:
            return {}
        self.trained_epoch = int(epoch)
        from lightning_mia.features.base import autograd_on

        with autograd_on():  # the monitor may be called from a validation hook, where Lightning disables autograd
            return self.ensemble.train_epoch(epoch)

    # -- signals at an audit --------------------------------------------------------------------------------
    def signals(self, trainer: Any, data: MembershipData, members: Any, nonmembers: Any) -> ReferenceSignals:
        """The references' and the target's logits on the pool (in ``data.pool()`` order) and on z."""
        pool, pop = data.pool(), data.select(data.source == POPULATION_SOURCE)
        ref_pool = self._gathered_logits(trainer, pool, members, nonmembers)
        ref_pop = self._gathered_logits(trainer, pop, members, nonmembers)
        return ReferenceSignals(pool.extra["logits"], pool.label, ref_pool, self._pool_in(pool),
                                pop.extra["logits"], pop.label, ref_pop)

    def _gathered_logits(self, trainer: Any, rows: MembershipData, members: Any, nonmembers: Any) -> np.ndarray:
        parts = []
        for is_member, ds in ((True, members), (False, nonmembers)):
            sel = rows.is_member == is_member
            parts.append((sel, self.ensemble.logits(ds, rows.position[sel].tolist()).float().cpu().numpy()))
        n_local = len(self.ensemble.indices)
        C = next((p.shape[-1] for _, p in parts if p.size), 1)
        local = np.zeros((n_local, rows.n, C), np.float32)
        for sel, logits in parts:
            if logits.size:
                local[:, sel] = logits
        gathered: List[Any] = [(list(self.ensemble.indices), local)]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (list(self.ensemble.indices), local))
        out = np.zeros((self.config.count, rows.n, C), np.float32)
        for idx, logits in gathered:
            out[idx] = logits
        return out

    def _pool_in(self, pool: MembershipData) -> np.ndarray:
        """``(K, n)``: which reference trained on each pool sample (all False offline)."""
        ref_in = np.zeros((self.config.count, pool.n), bool)
        if self.config.mode == "offline":
            return ref_in
        offset = len(self._pop_members)
        for is_member, pop_pos, base in ((True, self._pop_members, 0), (False, self._pop_nonmembers, offset)):
            sel = np.flatnonzero(pool.is_member == is_member)
            where = np.searchsorted(pop_pos, pool.position[sel])
            found = (where < len(pop_pos)) & (pop_pos[np.minimum(where, len(pop_pos) - 1)] == pool.position[sel])
            ref_in[:, sel[found]] = self._in_mask[:, base + where[found]]
        return ref_in

    # -- checkpoint state (tensors and plain types only) ------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"config": asdict(self.config), "seed": self.seed, "trained_epoch": self.trained_epoch,
                "ensemble": None if self.ensemble is None else self.ensemble.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.trained_epoch = int(state.get("trained_epoch", -1))
        if state.get("ensemble") is not None:
            if self.ensemble is not None:
                self.ensemble.load_state_dict(state["ensemble"])
            else:  # setup() has not run yet: applied there, after the ensemble is built
                self._state = state["ensemble"]
