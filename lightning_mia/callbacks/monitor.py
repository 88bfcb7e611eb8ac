"""``MembershipInferenceMonitor``: a live membership-inference audit, every N epochs, while the model trains.

The callback keeps the hooks, the sharding over ranks, the gather/broadcast and the resumable state; the audit
itself is :class:`lightning_mia.auditor.Auditor` and the files are :class:`lightning_mia.run_writer.RunWriter`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn

from lightning_mia.audit import DEFAULT_RATIO, AuditPool, check_nonmembers_unseen, make_audit_pool, validate_audit_pool
from lightning_mia.auditor import Auditor, AuditResult
from lightning_mia.callbacks.paths import run_dir
from lightning_mia.extraction import check_item, extract_pass
from lightning_mia.layout import PROGRESS_BAR_METRIC
from lightning_mia.membership import MembershipData
from lightning_mia.protocols import AttackProtocol, build_protocol
from lightning_mia.report.console import audit_summary, print_line, progress_bar
from lightning_mia.run_writer import RunWriter, finite, tensorboard_writer
from lightning_mia.validation import check_bool, check_int, check_positive

SpecArg = Union[str, Dict[str, Any]]


class MembershipInferenceMonitor(Callback):
    r"""Audit membership leakage of the model every ``every_n_epochs`` epochs.

    Each audit runs one inference pass over a fixed, seeded pool of members (training samples) and non-members
    (held-out samples) in eval mode, extracts the chosen features, and evaluates each attack under the
    ``protocol`` separately for all, correctly classified and misclassified samples. Results go to every logger as
    ``mia/{feature}/{attack}/{slice}/{metric}`` with the epoch as step, plus ``target/{train,test}_{acc,loss}``,
    and to ``{run_dir}/mia/history.csv`` (the files: :mod:`lightning_mia.layout`).

    Args:
        every_n_epochs: audit period (the last epoch is always audited).
        features: feature names or ``{"name": ..., "tag": ..., **options}`` (see ``lightning_mia.features``).
        attacks: attack names or ``{"name": ..., "tag": ..., **options}`` (see ``lightning_mia.attacks``).
        protocol: how attacks are fitted and scored: a :class:`~lightning_mia.protocols.StandardProtocol`
            (repeated stratified splits; the default), a :class:`~lightning_mia.protocols.PaperProtocol` (the
            authors' per-class protocol), or the name ``standard`` / ``paper`` for one with its defaults.
        n_members: members in the audit pool (default: as many as the data allows at ``ratio``:1).
        n_nonmembers: held-out non-members in the audit pool (default: likewise).
        ratio: members per non-member when the pool sizes are not given.
        seed: seeds the audit pool, and the protocol when its own ``seed`` is ``None``.
        save_predictions: write ``mia/predictions/epoch_NNNN.npz`` with per-sample scores.
        batch_size: inference batch size of the audit pass.
        n_jobs: threads fitting the feature/attack pairs in parallel (worth it for MLP / forest / XGBoost).
        dirpath: the run directory ``mia/`` goes into; default: the first logger's ``log_dir``
            (else ``trainer.default_root_dir``).
        log_histograms: TensorBoard histograms of member / non-member scores.
        report_at_end: write ``mia/report.md`` and figures when fitting ends.
        verbose: print a summary line per audit and a progress bar for long extractions.
        ood_sources: out-of-distribution non-member sources (``gaussian``, ``rotated``, ``inverted``,
            ``{name: dataset, datamodule: {name: fashion_mnist}}``; see ``lightning_mia.ood``): each attack, fitted on
            the whole audit pool, is applied to them and their FAR logged as ``mia/{feature}/{attack}/ood_{source}/far``.
        ood_samples: samples per OOD source.
        calibrate: feature tags to also attack difficulty-calibrated, as ``{tag}_calibrated`` = value now minus
            the sample's value at ``reference_epoch`` (a LiRA-style per-sample reference without shadow models).
        reference_epoch: the first audited epoch at or after it is the reference of ``calibrate``.
        audit_file: an ``audit.json`` of an earlier run, to audit exactly the same samples again.
        check_overlap: refuse non-members identical to training samples (hashes every training input once).
        member_dataset: ``(x, y, index)`` dataset of members, for datamodules without ``member_dataset()``.
        nonmember_dataset: likewise for non-members (``nonmember_dataset()``).

    Example:
        >>> from lightning_mia.callbacks import MembershipInferenceMonitor
        >>> from lightning_mia.protocols import StandardProtocol
        >>> monitor = MembershipInferenceMonitor(every_n_epochs=2, features=["confidence", "loss"],
        ...                                      attacks=["threshold", "logistic_regression"],
        ...                                      protocol=StandardProtocol(repeats=3))
        >>> # pl.Trainer(callbacks=[monitor]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        features: Sequence[SpecArg] = ("confidence", "loss"),
        attacks: Sequence[SpecArg] = ("threshold", "logistic_regression"),
        protocol: Union[AttackProtocol, Literal["standard", "paper"]] = "standard",
        n_members: Optional[int] = None,
        n_nonmembers: Optional[int] = None,
        ratio: float = DEFAULT_RATIO,
        seed: int = 0,
        save_predictions: bool = False,
        batch_size: int = 512,
        n_jobs: int = 1,
        dirpath: Optional[str] = None,
        log_histograms: bool = True,
        report_at_end: bool = True,
        verbose: bool = True,
        ood_sources: Sequence[SpecArg] = (),
        ood_samples: int = 500,
        calibrate: Sequence[str] = (),
        reference_epoch: int = 0,
        audit_file: Optional[str] = None,
        check_overlap: bool = True,
        member_dataset: Optional[Any] = None,
        nonmember_dataset: Optional[Any] = None,
    ) -> None:
        super().__init__()
        from lightning_mia.attacks import ATTACKS
        from lightning_mia.features import FEATURES
        from lightning_mia.ood import OOD_SOURCES

        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1)
        self.n_members = check_int("n_members", n_members, 1, allow_none=True)
        self.n_nonmembers = check_int("n_nonmembers", n_nonmembers, 1, allow_none=True)
        self.ratio = float(check_positive("ratio", ratio))
        self.seed = check_int("seed", seed, 0)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.ood_samples = check_int("ood_samples", ood_samples, 1)
        self.save_predictions = check_bool("save_predictions", save_predictions)
        self.log_histograms = check_bool("log_histograms", log_histograms)
        self.report_at_end = check_bool("report_at_end", report_at_end)
        self.verbose = check_bool("verbose", verbose)
        self.check_overlap = check_bool("check_overlap", check_overlap)
        if (member_dataset is None) != (nonmember_dataset is None):
            raise ValueError("Pass both member_dataset and nonmember_dataset, or neither")
        if audit_file is not None and not os.path.isfile(audit_file):
            raise ValueError(f"audit_file {audit_file!r} does not exist (it is the mia/audit.json of a run)")
        self.features = FEATURES.resolve_all(features)
        self.attacks = ATTACKS.resolve_all(attacks)
        self.ood_sources = OOD_SOURCES.resolve_all(ood_sources, allow_empty=True)
        self.protocol = build_protocol(protocol).with_seed(self.seed)
        self.auditor = Auditor(self.features, self.attacks, self.protocol,
                               calibrate=[calibrate] if isinstance(calibrate, str) else list(calibrate),
                               reference_epoch=check_int("reference_epoch", reference_epoch, 0),
                               ood_sources=[s.tag for s in self.ood_sources],
                               n_jobs=check_int("n_jobs", n_jobs, 1), seed=self.seed)
        self.dirpath, self.audit_file = dirpath, audit_file
        self._member_dataset, self._nonmember_dataset = member_dataset, nonmember_dataset
        self.pool: Optional[AuditPool] = None
        self.last_epoch: int = -1
        self.last_result: Optional[AuditResult] = None
        self._resumed = False
        self._feature_objs: Dict[str, Any] = {}
        self._ood: Dict[str, Any] = {}
        self._writer: Optional[RunWriter] = None
        #: wall time of each audit on this rank: extraction (incl. gather), attacks (incl. broadcast), writing
        self.timings: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ Lightning state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, seed=self.seed,
                                        features=[s.tag for s in self.features])

    def state_dict(self) -> Dict[str, Any]:
        # plain Python types only: LightningCLI resumes with torch.load(weights_only=True)
        return {"pool": None if self.pool is None else self.pool.to_dict(), "last_epoch": self.last_epoch,
                "seed": self.seed, **self.auditor.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("pool") is not None:
            self.pool = AuditPool.from_dict(state_dict["pool"])
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self.auditor.load_state_dict(state_dict)
        self._resumed = True

    @property
    def last_features(self) -> Dict[str, np.ndarray]:
        """The last audit's (post-processed, calibrated) pool features."""
        return {} if self.last_result is None else dict(self.last_result.data.features)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        members, nonmembers = self._datasets(trainer)
        for ds, where in ((members, "member dataset"), (nonmembers, "non-member dataset")):
            if len(ds):
                check_item(ds[0], where)
        if self.pool is None and self.audit_file is not None:
            self.pool = AuditPool.load(self.audit_file)
        if self.pool is None:
            self.pool = make_audit_pool(len(members), len(nonmembers), self.n_members, self.n_nonmembers, self.ratio,
                                        self.seed)
        validate_audit_pool(self.pool, len(members), len(nonmembers))
        if self.check_overlap:  # on every rank: an error raised on one rank only would deadlock the others
            n_seen = check_nonmembers_unseen(members, nonmembers, self.pool.nonmember_positions)
            if n_seen:
                rank_zero_warn(f"{n_seen} audit non-members are identical to training samples (duplicates across "
                               "the data set's splits); they count as non-members")
        self._feature_objs = self.auditor.build_features()
        from lightning_mia.ood import build_ood_source

        self._ood = {s.tag: build_ood_source(s, nonmembers, self.ood_samples, self.seed) for s in self.ood_sources}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer) or trainer.global_rank != 0:
            return
        self._run_writer(trainer).start(self.pool, self.last_epoch + 1 if self._resumed else None)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer):
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs != 0 and not last and not trainer.should_stop:
            return
        self.audit(trainer, pl_module, epoch)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer) or trainer.global_rank != 0 or self.last_epoch < 0:
            return
        writer = self._run_writer(trainer)
        lines = []
        if self.report_at_end:
            try:
                hparams = {**{f"model/{k}": v for k, v in dict(pl_module.hparams).items()},
                           **{f"mia/{k}": v for k, v in self.protocol.options().items()}}
                report, table = writer.finish(hparams, self.last_epoch)
                lines += [table, f"Report: {report}"]
            except Exception as err:  # a report failure must not lose the training run
                rank_zero_warn(f"Could not write the MIA report: {err!r}")
        lines.append(f"Membership-inference audit: {writer.layout.history}")
        root = next((lg.save_dir for lg in trainer.loggers if tensorboard_writer([lg]) is not None), None)
        if root is not None:
            lines.append(f"TensorBoard: tensorboard --logdir {root}")
        print("\n".join(lines))  # the progress bars are closed by now: their print() would drop it

    # ------------------------------------------------------------------ work
    def audit(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> AuditResult:
        """Extract (sharded over ranks), attack (rank zero), broadcast, log. Returns the ``AuditResult``."""
        t0 = time.perf_counter()
        data = self._extract(trainer, pl_module)
        t1 = time.perf_counter()
        result = self.auditor.audit(data, epoch, self._feature_objs) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        t2 = time.perf_counter()
        self.last_epoch, self.last_result = epoch, result
        if trainer.global_rank == 0:
            self._run_writer(trainer).write(result, self.protocol.slices)
        head = next((r for r in result.rows if r["slice"] == "all"), None)
        if head is not None and finite(head.get("balanced_accuracy")):
            pl_module.log(PROGRESS_BAR_METRIC, float(head["balanced_accuracy"]), prog_bar=True, logger=False,
                          rank_zero_only=True)  # same value on every rank (broadcast)
        self.timings.append({"epoch": epoch, "extract_s": t1 - t0, "attack_s": t2 - t1,
                             "write_s": time.perf_counter() - t2})
        if self.verbose and trainer.global_rank == 0:
            print_line(trainer, audit_summary(result, t1 - t0, t2 - t1))
        return result

    def _extract(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> MembershipData:
        members, nonmembers = self._datasets(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        sources: List[Tuple[bool, Any, np.ndarray, str, int]] = [
            (True, members, self.pool.member_positions, "member dataset", 0),
            (False, nonmembers, self.pool.nonmember_positions, "non-member dataset", 0)]
        for k, (tag, ds) in enumerate(self._ood.items(), start=1):
            sources.append((False, ds, np.arange(len(ds)), f"OOD source {tag!r}", k))
        slow = any(getattr(f, "requires_grad", False) for f in self._feature_objs.values())
        total = sum((len(pos) + world - 1) // world for _, _, pos, _, _ in sources)
        bar = progress_bar(total, "MIA features") if self.verbose and rank == 0 and (slow or total > 20000) else None
        try:
            parts = [extract_pass(pl_module, ds, positions[rank::world],  # disjoint shards: no padding
                                  self._feature_objs, batch_size=self.batch_size, device=pl_module.device,
                                  progress=bar.update if bar else None, where=where, is_member=is_member,
                                  source=source)
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

    # ------------------------------------------------------------------ helpers
    def _run_writer(self, trainer: "pl.Trainer") -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(run_dir(trainer, self.dirpath), trainer.loggers, self.log_histograms,
                                     self.save_predictions)
        return self._writer

    def _datasets(self, trainer: "pl.Trainer") -> Tuple[Any, Any]:
        if self._member_dataset is not None:
            return self._member_dataset, self._nonmember_dataset
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "member_dataset", None)) and callable(
                getattr(dm, "nonmember_dataset", None)):
            return dm.member_dataset(), dm.nonmember_dataset()
        raise ValueError(
            "MembershipInferenceMonitor needs member and non-member datasets: use a lightning_mia datamodule "
            "(it provides member_dataset() and nonmember_dataset()), or pass member_dataset= and "
            "nonmember_dataset= (datasets of (x, y, index) items; see lightning_mia.data.IndexedDataset)")

    @staticmethod
    def _skip_run(trainer: "pl.Trainer") -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run)
