"""``MembershipInferenceMonitor``: a live membership-inference audit, every N epochs, while the model trains.

The callback keeps the hooks, the sharding over ranks, the gather/broadcast and the resumable state; the audit
itself is :class:`lightning_mia.auditor.Auditor` and the files are :class:`lightning_mia.run_writer.RunWriter`.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_mia.audit import DEFAULT_RATIO, AuditPool, make_audit_pool
from lightning_mia.auditor import CANARY_SOURCE, Auditor, AuditResult
from lightning_mia.callbacks.paths import audit_datasets, interrupt_hint, resolve_run_dir, run_dir
from lightning_mia.compat import Callback, lightning_step, rank_zero_info
from lightning_mia.data.canaries import canaries_of
from lightning_mia.callbacks.references import POPULATION_SOURCE, ReferenceModels, ReferenceTrainer
from lightning_mia.extraction import check_item, extract_sharded
from lightning_mia.fingerprint import AuditResume
from lightning_mia.membership import MembershipData
from lightning_mia.protocols import AttackProtocol, build_protocol
from lightning_mia.report.console import audit_summary, print_line
from lightning_mia.run_writer import RunWriter, log_privacy_metrics, privacy_metrics
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
        every_n_epochs: audit period (the first and the last epoch are always audited).
        features: names or ``{"name": ..., "tag": ..., **options}``: confidence, softmax, true_class_prob, loss,
            entropy, modified_entropy, logit_scaled_confidence, intermediate, gradient_norms, boundary_distance,
            trajectory (options: ``lightning_mia.features``).
        attacks: names or ``{"name": ..., "tag": ..., **options}``: threshold, logistic_regression, mlp,
            random_forest, xgboost, and lira, rmia (with ``reference_models``; options: ``lightning_mia.attacks``).
        protocol: a :class:`~lightning_mia.protocols.StandardProtocol` (the default), a ``PaperProtocol`` (the
            authors' per-class protocol), or the name ``standard`` / ``paper`` for one with its defaults.
        n_members, n_nonmembers: audit-pool sizes, integers (default: as many as the data allows at ``ratio``:1).
        ratio: members per non-member in the default pool (the paper's 5:1), a finite number > 0.
        seed: seeds the audit pool, and the protocol when its own ``seed`` is ``None``.
        save_predictions: write ``mia/predictions/epoch_NNNN.npz`` with per-sample scores.
        batch_size: inference batch size of the audit pass.
        n_jobs: threads fitting the feature/attack pairs in parallel (worth it for MLP / forest / XGBoost).
        dirpath: the run directory ``mia/`` goes into; default: the first logger's ``log_dir``.
        log_histograms, report_at_end, verbose: score histograms in TensorBoard; ``mia/report.md`` at fit end; a
            summary per audit and a progress bar for long extractions.
        ood_sources: out-of-distribution non-members; known: gaussian, rotated, inverted, dataset (``{name: dataset,
            datamodule: {name: fashion_mnist}}``): their FAR is logged as ``mia/{feature}/{attack}/ood_{source}/far``.
        ood_samples: samples per OOD source.
        calibrate, reference_epoch: feature tags also attacked as ``{tag}_calibrated`` = value now minus the value
            at the first audit at or after ``reference_epoch`` (a per-sample reference without shadow models).
        audit_file: an ``audit.json`` of an earlier run, to audit exactly the same samples again.
        check_overlap: refuse non-members identical to training samples (hashes every training input once).
        member_dataset, nonmember_dataset: ``(x, y, index)`` datasets, for datamodules without their methods.
        exposed_top_k: write the most exposed members and false alarms of each audit (``mia/exposed/``, and a
            TensorBoard image grid when the data can be shown); 0: off.
        canary_guesses: "in" and "out" guesses each of the one-run audit when the datamodule has canaries
            (``canary_dataset()`` / ``canary_inclusion()``); default a tenth of the canaries each.
        log_all_metrics: also send every secondary metric (baselines, ``*_std``, precision/recall, counts) to the
            loggers under ``mia_detail/...``; by default only the headline metrics (``history.csv`` keeps all).
        reference_models: train K reference models alongside the target (:class:`ReferenceModels`, e.g.
            ``{count: 8, mode: online}``) for the reference-model attacks ``lira`` and ``rmia``.

    Example:
        >>> from lightning_mia.protocols import StandardProtocol
        >>> monitor = MembershipInferenceMonitor(every_n_epochs=2, features=["confidence", "loss"],
        ...                                      protocol=StandardProtocol(repeats=3))  # Trainer(callbacks=[monitor])
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
        reference_models: Optional[ReferenceModels] = None,
        exposed_top_k: int = 16,
        canary_guesses: Optional[int] = None,
        log_all_metrics: bool = False,
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
        self.exposed_top_k = check_int("exposed_top_k", exposed_top_k, 0)
        self.save_predictions = check_bool("save_predictions", save_predictions)
        self.log_histograms = check_bool("log_histograms", log_histograms)
        self.report_at_end = check_bool("report_at_end", report_at_end)
        self.verbose = check_bool("verbose", verbose)
        self.check_overlap = check_bool("check_overlap", check_overlap)
        self.log_all_metrics = check_bool("log_all_metrics", log_all_metrics)
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
                               n_jobs=check_int("n_jobs", n_jobs, 1), seed=self.seed,
                               canary_guesses=check_int("canary_guesses", canary_guesses, 1, allow_none=True))
        if bool(self.auditor.reference_attacks) != (reference_models is not None):
            raise ValueError("lira and rmia are scored from reference models: pass reference_models (e.g. "
                             "{count: 8, mode: online}) together with one of them in attacks")
        self._refs = ReferenceTrainer(reference_models, self.seed) if reference_models is not None else None
        self.dirpath, self.audit_file = dirpath, audit_file
        self._member_dataset, self._nonmember_dataset = member_dataset, nonmember_dataset
        self.pool: Optional[AuditPool] = None
        self.last_epoch: int = -1
        self.last_result: Optional[AuditResult] = None
        self._resumed = False
        self._feature_objs: Dict[str, Any] = {}
        self._ood: Dict[str, Any] = {}
        self._writer: Optional[RunWriter] = None
        self._seen_epoch, self._held, self._resume = -1, {}, AuditResume()
        self._previous_run_dir: Optional[str] = None  # the run directory a resumed checkpoint recorded
        self._canaries: Optional[Tuple[Any, np.ndarray]] = None
        #: wall time of each audit on this rank: extraction (incl. gather), attacks (incl. broadcast), writing
        self.timings: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ Lightning state
    @functools.cached_property  # Lightning reads it on every hook call (six per training step)
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, seed=self.seed,
                                        features=[s.tag for s in self.features])

    def state_dict(self) -> Dict[str, Any]:
        # plain Python types only: LightningCLI resumes with torch.load(weights_only=True)
        return {"pool": None if self.pool is None else self.pool.to_dict(), "last_epoch": self.last_epoch,
                "seed": self.seed, "fingerprint": self._resume.current, **self.auditor.state_dict(),
                "references": None if self._refs is None else self._refs.state_dict(),
                "run_dir": self._writer.layout.run_dir if self._writer is not None else self._previous_run_dir}

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: Any) -> None:
        self._resume.on_load_checkpoint(checkpoint, self.state_key)  # also finds a state filed under another key

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("pool") is not None:
            self.pool = AuditPool.from_dict(state_dict["pool"])
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self._previous_run_dir = state_dict.get("run_dir")
        self.auditor.load_state_dict(state_dict)
        if self._refs is not None and state_dict.get("references") is not None:
            self._refs.load_state_dict(state_dict["references"])
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
        # every rank: range, overlap and label checks, the samples' index values, the audit's fingerprint
        self._resume.seal(self, self.pool, members, nonmembers, trainer, pl_module)
        self._feature_objs = self.auditor.build_features()
        from lightning_mia.ood import build_ood_source

        self._ood = {s.tag: build_ood_source(s, nonmembers, self.ood_samples, self.seed) for s in self.ood_sources}
        self._canaries = canaries_of(getattr(trainer, "datamodule", None))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer):
            return
        # every rank: the run directory (rank zero's, broadcast), then continue, fresh or raise
        self._resume.resolve(self, trainer, resolve_run_dir(trainer, self.dirpath, self._previous_run_dir))
        if self._refs is not None:  # after the module's own setup built its network: the references copy it
            if not self._resumed:  # a fresh audit: no reference state from a checkpoint of another audit
                self._refs = ReferenceTrainer(self._refs.config, self.seed)
            self._refs.setup(trainer, pl_module, *self._datasets(trainer), self.pool)
        if trainer.global_rank != 0:
            return
        self._run_writer(trainer).start(self.pool, self.last_epoch + 1 if self._resumed else None)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the epoch-end validation: auditing here lets EarlyStopping / ModelCheckpoint (on_validation_end) act on
        # the privacy metrics in the same epoch
        if not self._skip_run(trainer) and trainer.state.fn == "fit" and trainer.is_last_batch:
            self._epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._skip_run(trainer):
            self._epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # max_steps, max_time or an early stop can end training on an epoch that was not due for an audit
        if not self._skip_run(trainer) and self._seen_epoch > self.last_epoch:
            self.audit(trainer, pl_module, self._seen_epoch, log=False)

    def _epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = self._seen_epoch = trainer.current_epoch
        if self._refs is not None:  # every epoch, in lockstep with the target
            self._refs.train_epoch(epoch)
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        # the first epoch too: a baseline, and values for callbacks that watch a privacy metric from the start
        due = epoch == 0 or (epoch + 1) % self.every_n_epochs == 0 or last or trainer.should_stop
        if epoch > self.last_epoch and due:
            self.audit(trainer, pl_module, epoch)
        else:  # held values: callbacks watching a privacy metric find it on epochs without an audit too
            log_privacy_metrics(pl_module, self._held)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer) or trainer.global_rank != 0 or self.last_epoch < 0:
            return
        hparams = {**{f"model/{k}": v for k, v in dict(pl_module.hparams).items()},
                   **{f"mia/{k}": v for k, v in self.protocol.options().items()}}
        lines = self._run_writer(trainer).finish_fit(hparams, self.last_epoch, self.report_at_end)
        print("\n".join(lines))  # the progress bars are closed by now: their print() would drop it

    # ------------------------------------------------------------------ work
    def audit(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int,
              log: bool = True) -> AuditResult:
        """Extract (sharded over ranks), attack (rank zero), broadcast, write and (``log``) put the privacy metrics
        in ``trainer.callback_metrics``. Returns the ``AuditResult``."""
        t0 = time.perf_counter()
        data = self._extract(trainer, pl_module)
        t1 = time.perf_counter()
        refs = None if self._refs is None else self._refs.signals(trainer, data, *self._datasets(trainer))
        extra = {"dp_epsilon": float(pl_module.get_epsilon())} if callable(getattr(pl_module, "get_epsilon", None)) \
            else {}  # the DP accountant's epsilon beside the measured bounds
        result = self.auditor.audit(data, epoch, self._feature_objs, refs, extra) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        t2 = time.perf_counter()
        self.last_epoch, self.last_result = epoch, result
        if trainer.global_rank == 0:
            self._run_writer(trainer).write(result, self.protocol.slices, self._datasets(trainer),
                                            getattr(getattr(trainer, "datamodule", None), "class_names", None),
                                            step=lightning_step(trainer))
        self._held = privacy_metrics(result)
        if log:
            log_privacy_metrics(pl_module, self._held)
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
        if self._refs is not None:  # RMIA's population samples z
            sources.append((False, nonmembers, self._refs.z_positions, "non-member dataset", POPULATION_SOURCE))
        if self._canaries is not None:  # the one-run audit's canaries, by their coin
            ds, inc = self._canaries
            sources += [(flag, ds, np.flatnonzero(inc == flag), "canary dataset", CANARY_SOURCE) for flag in (1, 0)]
        return extract_sharded(pl_module, sources, self._feature_objs, rank, world, self.batch_size,
                               verbose=self.verbose, keep_logits=self._refs is not None)

    # ------------------------------------------------------------------ helpers
    def _run_writer(self, trainer: "pl.Trainer") -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(run_dir(trainer, self.dirpath), trainer.loggers, self.log_histograms,
                                     self.save_predictions, self.exposed_top_k, log_all_metrics=self.log_all_metrics,
                                     every_n_epochs=self.every_n_epochs)
        return self._writer

    def _datasets(self, trainer: "pl.Trainer") -> Tuple[Any, Any]:
        return audit_datasets(trainer, self._member_dataset, self._nonmember_dataset)

    def _skip_run(self, trainer: "pl.Trainer") -> bool:
        if trainer.fast_dev_run and not getattr(self, "_said_skipped", False):
            self._said_skipped = True
            rank_zero_info("MembershipInferenceMonitor: skipped under fast_dev_run (a smoke test of a few batches: no "
                           "audit, no files); run without fast_dev_run to audit", trainer)
        return bool(trainer.sanity_checking or trainer.fast_dev_run)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if trainer.global_rank == 0 and self._writer is not None:  # a SIGTERM, Ctrl+C or an error: what was saved
            print("\n".join(interrupt_hint(self._writer.layout.run_dir, self.last_epoch, exception)), flush=True)
