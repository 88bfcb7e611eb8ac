"""``MembershipInferenceMonitor``: a live membership-inference audit, every N epochs, while the model trains."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from lightning_mia.callbacks.paths import mia_dir
from lightning_mia.audit import (DEFAULT_RATIO, AuditPool, check_nonmembers_unseen, make_audit_pool,
                                 validate_audit_pool)
from lightning_mia.extraction import check_item, concat_arrays, extract_pass
from lightning_mia.pipeline import MODES, audit_arrays, target_metrics
from lightning_mia.registry import parse_spec
from lightning_mia.report.history import append_rows, atomic_write_bytes, truncate_history

Spec = Union[str, Dict[str, Any]]
SLICES = ("all", "correct", "misclassified")
BALANCE = ("undersample", "oversample", "class_weight", "none")
#: Metrics shown in the one-line summary printed after each audit.
_SUMMARY = (("balanced_accuracy", "bal.acc"), ("far", "FAR"), ("auc", "AUC"))


def _normalise_specs(specs: Sequence[Spec], kind: str, registry: Any) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``[(tag, name, options)]`` from ``"name"`` / ``{"name":..., "tag":..., **options}`` specs, names checked."""
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    out, seen = [], set()
    for spec in specs:
        name, options = parse_spec(spec, kind)
        registry[name]  # KeyError listing the known names
        tag = str(options.pop("tag", name))
        if tag in seen:
            raise ValueError(f"Two {kind}s share the tag {tag!r}: give one a distinct 'tag'")
        seen.add(tag)
        out.append((tag, name, options))
    if not out:
        raise ValueError(f"At least one {kind} is needed")
    return out


class MembershipInferenceMonitor(Callback):
    r"""Audit membership leakage of the model every ``every_n_epochs`` epochs.

    Each audit runs one inference pass over a fixed, seeded pool of members (training samples) and non-members
    (held-out samples) in eval mode, extracts the chosen features, fits each attack on a stratified
    ``1 - eval_fraction`` of the pool and scores it on the rest (``repeats`` seeded splits), separately for all,
    correctly classified and misclassified samples. Results go to every logger as
    ``mia/{feature}/{attack}/{slice}/{metric}`` with the epoch as step, plus ``target/{train,test}_{acc,loss}``,
    and to ``{run_dir}/mia/history.csv``.

    Args:
        every_n_epochs: audit period (the last epoch is always audited).
        features: feature names or ``{"name": ..., "tag": ..., **options}`` (see ``lightning_mia.features``).
        attacks: attack names or ``{"name": ..., "tag": ..., **options}`` (see ``lightning_mia.attacks``).
        protocol: ``standard`` (repeated stratified splits, options below) or ``paper`` (the authors' code: one
            attack per class, first 80% of each class in dataset order, metrics averaged over classes; attacks
            ``mlp``, ``random_forest``, ``xgboost``, ``logistic_regression`` with the paper's settings).
        repeats: number of seeded attack-train/evaluation splits; metrics are their mean, ``*_std`` their std.
        eval_fraction: share of the pool the attack is scored on (the attacker knows the rest's membership).
        slices: subsets reported: ``all``, ``correct``, ``misclassified``.
        balance: attack training-set balancing: ``undersample``, ``oversample``, ``class_weight``, ``none``.
        fit_per_slice: fit separate attacks on correct and misclassified samples (as the paper's tables do).
        per_class: fit one attack per true class.
        eval_ratios: also score each attack with the evaluation set resampled to these member:non-member ratios.
        n_members, n_nonmembers, ratio: audit-pool size (default: as large as the data allows at ``ratio``:1).
        seed: seeds the audit pool and every split.
        save_predictions: write ``mia/predictions/epoch_NNNN.npz`` with per-sample scores.
        batch_size: inference batch size of the audit pass.
        n_jobs: threads fitting the feature/attack pairs in parallel (worth it for MLP / forest / XGBoost).
        dirpath: where ``mia/`` goes; default: the first logger's ``log_dir`` (else ``trainer.default_root_dir``).
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
        member_dataset, nonmember_dataset: ``(x, y, index)`` datasets, for datamodules that do not provide
            ``member_dataset()`` / ``nonmember_dataset()``.

    Example:
        >>> from lightning_mia.callbacks import MembershipInferenceMonitor
        >>> monitor = MembershipInferenceMonitor(every_n_epochs=2, features=["confidence", "loss"],
        ...                                      attacks=["threshold", "logistic_regression"], repeats=3)
        >>> # pl.Trainer(callbacks=[monitor]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        features: Sequence[Spec] = ("confidence", "loss"),
        attacks: Sequence[Spec] = ("threshold", "logistic_regression"),
        protocol: str = "standard",
        repeats: int = 3,
        eval_fraction: float = 0.2,
        slices: Sequence[str] = SLICES,
        balance: str = "undersample",
        fit_per_slice: bool = False,
        per_class: bool = False,
        eval_ratios: Sequence[float] = (),
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
        ood_sources: Sequence[Spec] = (),
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

        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        if not 0.0 < float(eval_fraction) < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        slices = [slices] if isinstance(slices, str) else list(slices)
        bad = [s for s in slices if s not in SLICES]
        if bad or not slices:
            raise ValueError(f"slices must be a non-empty subset of {SLICES}, got {slices}")
        if protocol not in MODES:
            raise ValueError(f"protocol must be one of {MODES}, got {protocol!r}")
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
        if any(not (float(r) > 0 and math.isfinite(float(r))) for r in eval_ratios):
            raise ValueError(f"eval_ratios must be positive numbers (members per non-member), got {list(eval_ratios)}")
        if not float(ratio) > 0:
            raise ValueError(f"ratio (members per non-member) must be > 0, got {ratio}")
        for name, value in (("n_members", n_members), ("n_nonmembers", n_nonmembers)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"n_jobs must be an integer >= 1, got {n_jobs!r}")
        if (member_dataset is None) != (nonmember_dataset is None):
            raise ValueError("Pass both member_dataset and nonmember_dataset, or neither")

        self.every_n_epochs = every_n_epochs
        self.features = _normalise_specs(features, "feature", FEATURES)
        self.attacks = _normalise_specs(attacks, "attack", ATTACKS)
        self.mode = protocol
        self.protocol = {
            "repeats": repeats, "eval_fraction": float(eval_fraction), "balance": balance, "slices": slices,
            "fit_per_slice": bool(fit_per_slice), "per_class": bool(per_class),
            "eval_ratios": [float(r) for r in eval_ratios], "seed": int(seed),
        }
        self.n_members, self.n_nonmembers, self.ratio, self.seed = n_members, n_nonmembers, float(ratio), int(seed)
        self.save_predictions = save_predictions
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.dirpath = dirpath
        self.log_histograms = log_histograms
        self.report_at_end = report_at_end
        self.verbose = verbose
        if audit_file is not None and not os.path.isfile(audit_file):
            raise ValueError(f"audit_file {audit_file!r} does not exist (it is the mia/audit.json of a run)")
        self.audit_file = audit_file
        self.check_overlap = check_overlap
        calibrate = [calibrate] if isinstance(calibrate, str) else list(calibrate)
        unknown = [t for t in calibrate if t not in [tag for tag, _, _ in self.features]]
        if unknown:
            raise ValueError(f"calibrate names features that are not monitored: {unknown}; monitored: "
                             f"{[tag for tag, _, _ in self.features]}")
        if not isinstance(reference_epoch, int) or reference_epoch < 0:
            raise ValueError(f"reference_epoch must be an integer >= 0, got {reference_epoch!r}")
        self.calibrate, self.reference_epoch = calibrate, reference_epoch
        from lightning_mia.ood import OOD_SOURCES

        self.ood_sources = _normalise_specs(ood_sources, "ood source", OOD_SOURCES) if ood_sources else []
        if not isinstance(ood_samples, int) or ood_samples < 1:
            raise ValueError(f"ood_samples must be an integer >= 1, got {ood_samples!r}")
        self.ood_samples = ood_samples
        self._ood: Dict[str, Any] = {}
        self._reference: Optional[Dict[str, Any]] = None
        self.last_features: Dict[str, np.ndarray] = {}
        self._member_dataset, self._nonmember_dataset = member_dataset, nonmember_dataset

        self.pool: Optional[AuditPool] = None
        self.last_epoch: int = -1
        self._resumed = False
        self._feature_objs: Dict[str, Any] = {}
        self._layout_written = False
        self.last_result: Optional[Any] = None
        #: wall time of each audit on this rank: extraction (incl. gather), attacks (incl. broadcast), writing
        self.timings: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ Lightning state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, seed=self.seed,
                                        features=[t for t, _, _ in self.features])

    def state_dict(self) -> Dict[str, Any]:
        return {"pool": None if self.pool is None else self.pool.to_dict(), "last_epoch": self.last_epoch,
                "seed": self.seed, "reference": self._reference}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("pool") is not None:
            self.pool = AuditPool.from_dict(state_dict["pool"])
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self._reference = state_dict.get("reference")
        self._resumed = True

    # ------------------------------------------------------------------ paths
    def mia_dir(self, trainer: "pl.Trainer") -> str:
        return mia_dir(trainer, self.dirpath)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        members, nonmembers = self._datasets(trainer)
        n_train, n_heldout = len(members), len(nonmembers)
        for ds, where in ((members, "member dataset"), (nonmembers, "non-member dataset")):
            if len(ds):
                check_item(ds[0], where)
        if self.pool is None and self.audit_file is not None:
            self.pool = AuditPool.load(self.audit_file)
        if self.pool is None:
            self.pool = make_audit_pool(n_train, n_heldout, self.n_members, self.n_nonmembers, self.ratio, self.seed)
        validate_audit_pool(self.pool, n_train, n_heldout)
        if self.check_overlap:  # on every rank: an error raised on one rank only would deadlock the others
            n_seen = check_nonmembers_unseen(members, nonmembers, self.pool.nonmember_positions)
            if n_seen:
                rank_zero_warn(f"{n_seen} audit non-members are identical to training samples (duplicates across "
                               "the data set's splits); they count as non-members")
        from lightning_mia.features import FEATURES

        self._feature_objs = {tag: FEATURES[name](**options) for tag, name, options in self.features}
        from lightning_mia.ood import build_ood_source

        self._ood = {tag: build_ood_source({"name": name, **options}, nonmembers, self.ood_samples, self.seed)
                     for tag, name, options in self.ood_sources}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skip_run(trainer) or trainer.global_rank != 0:
            return
        d = self.mia_dir(trainer)
        os.makedirs(d, exist_ok=True)
        if self._resumed:  # drop rows a killed run wrote after the checkpoint we resume from
            truncate_history(os.path.join(d, "history.csv"), self.last_epoch + 1)
        self.pool.save(os.path.join(d, "audit.json"))

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
        d = self.mia_dir(trainer)
        lines = []
        if self.report_at_end:
            try:
                from lightning_mia.report.summary import finish_run

                hparams = {**{f"model/{k}": v for k, v in dict(pl_module.hparams).items()},
                           **{f"mia/{k}": v for k, v in self.protocol.items()}}
                report, table = finish_run(os.path.dirname(d), self._writer(trainer), hparams, self.last_epoch)
                lines += [table, f"Report: {report}"]
            except Exception as err:  # a report failure must not lose the training run
                rank_zero_warn(f"Could not write the MIA report: {err!r}")
        lines.append(f"Membership-inference audit: {os.path.join(d, 'history.csv')}")
        root = next((lg.save_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if root is not None:
            lines.append(f"TensorBoard: tensorboard --logdir {root}")
        print("\n".join(lines))  # the progress bars are closed by now: their print() would drop it

    # ------------------------------------------------------------------ work
    def audit(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> Any:
        """Extract (sharded over ranks), attack (rank zero), broadcast, log. Returns the ``AuditResult``."""
        t0 = time.perf_counter()
        everything = self._extract(trainer, pl_module)
        arrays = {k: v[everything["source"] == 0] for k, v in everything.items()}  # the audit pool
        t1 = time.perf_counter()
        result = None
        if trainer.global_rank == 0:
            result = self._attack(arrays, epoch)
            self._attack_ood(everything, result, epoch)
        result = self._broadcast(trainer, result)
        t2 = time.perf_counter()
        self.last_epoch = epoch
        self.last_result = result
        if trainer.global_rank == 0:
            self._write(trainer, arrays, result, epoch)
        self._log_progress_bar(pl_module, result)
        self.timings.append({"epoch": epoch, "extract_s": t1 - t0, "attack_s": t2 - t1,
                             "write_s": time.perf_counter() - t2})
        if self.verbose:
            self._print(trainer, self._summary(result, epoch, t1 - t0, t2 - t1))
        return result

    def _extract(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Dict[str, np.ndarray]:
        members, nonmembers = self._datasets(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        parts = []
        sources = [(True, members, self.pool.member_positions, "member dataset", 0),
                   (False, nonmembers, self.pool.nonmember_positions, "non-member dataset", 0)]
        for k, (tag, ds) in enumerate(self._ood.items(), start=1):
            sources.append((False, ds, np.arange(len(ds)), f"OOD source {tag!r}", k))
        total = sum((len(pos) + world - 1) // world for _, _, pos, _, _ in sources)
        bar = self._progress_bar(trainer, total)
        try:
            for is_member, ds, positions, where, source in sources:
                shard = positions[rank::world]  # disjoint shards: no padding, no duplicates
                a = extract_pass(pl_module, ds, shard, self._feature_objs, batch_size=self.batch_size,
                                 device=pl_module.device, progress=bar.update if bar else None, where=where)
                a["is_member"] = np.full(len(shard), is_member)
                a["source"] = np.full(len(shard), source)
                # positions of the datasets are separate: offset them so one sort orders all
                a["key"] = a["position"] + (0 if is_member else 2**40) + source * 2**41
                parts.append(a)
        finally:
            if bar is not None:
                bar.close()
        local = concat_arrays(parts, key="key")
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: List[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, local)
            local = concat_arrays(gathered, key="key")
        return local

    def _attack(self, arrays: Mapping[str, np.ndarray], epoch: int) -> Any:
        feats = {}
        for tag, feat in self._feature_objs.items():
            X = arrays[f"feat:{tag}"]
            post = getattr(feat, "fit_postprocess", None)
            feats[tag] = post(X) if post is not None else X
        feats.update(self._calibrated(feats, epoch))
        self.last_features = feats
        target = target_metrics(arrays["is_member"], arrays["correct"], arrays["loss"])
        specs = [{"name": name, "tag": tag, **options} for tag, name, options in self.attacks]
        result = audit_arrays(feats, arrays["is_member"], arrays["correct"], arrays["label"], specs,
                              self.protocol, extra_columns=target, epoch=epoch, n_jobs=self.n_jobs,
                              mode=self.mode, feature_kinds={**{f"{t}_calibrated": n for t, n, _ in self.features},
                                                              **{tag: name for tag, name, _ in self.features}})
        result.target = target
        return result

    def _attack_ood(self, everything: Mapping[str, np.ndarray], result: Any, epoch: int) -> None:
        """FAR of each feature/attack on each OOD source; adds ``ood_{source}`` rows and scores to ``result``."""
        from lightning_mia.ood import ood_far

        result.ood = {}
        if not self._ood:
            return
        pool = everything["source"] == 0
        done = {(f, a) for f, a in result.scores}
        specs = {tag: {"name": name, **options} for tag, name, options in self.attacks}
        for k, src in enumerate(self._ood, start=1):
            mask = everything["source"] == k
            for tag, feat in self._feature_objs.items():
                if getattr(feat, "max_dims", None):  # a PCA fitted on the pool has no transform for new rows
                    continue
                X = everything[f"feat:{tag}"]
                for atag, spec in specs.items():
                    if (tag, atag) not in done:
                        continue
                    far, scores, thr, n = ood_far(X[pool], everything["is_member"][pool], X[mask], spec,
                                                  self.protocol["balance"], self.seed)
                    result.ood[(src, tag, atag)] = (scores, thr)
                    result.rows.append({"epoch": epoch, "feature": tag, "attack": atag, "slice": f"ood_{src}",
                                        "n_members": 0, "n_nonmembers": n, "repeats": 1, "far": far,
                                        **result.target})

    def _calibrated(self, feats: Mapping[str, np.ndarray], epoch: int) -> Dict[str, np.ndarray]:
        """Difficulty-calibrated copies ``{tag}_calibrated`` = value now − value at the reference epoch.

        LiRA-style per-sample calibration without shadow models (Carlini et al. 2022; Watson et al. 2022): the
        early-epoch model stands in for a reference model that has not memorised the sample yet, so what is left
        is the change that training on the sample caused.
        """
        if not self.calibrate:
            return {}
        if self._reference is None:
            if epoch >= self.reference_epoch:
                self._reference = {"epoch": epoch, **{t: np.array(feats[t], copy=True) for t in self.calibrate}}
            return {}
        return {f"{t}_calibrated": np.asarray(feats[t]) - self._reference[t] for t in self.calibrate}

    def _broadcast(self, trainer: "pl.Trainer", result: Any) -> Any:
        if trainer.world_size > 1:
            return trainer.strategy.broadcast(result, src=0)
        return result

    def _write(self, trainer: "pl.Trainer", arrays: Mapping[str, np.ndarray], result: Any, epoch: int) -> None:
        d = self.mia_dir(trainer)
        os.makedirs(d, exist_ok=True)
        append_rows(os.path.join(d, "history.csv"), result.rows, replace_from_epoch=epoch)
        metrics: Dict[str, float] = {f"target/{k}": v for k, v in result.target.items() if _finite(v)}
        for r in result.rows:
            prefix = f"mia/{r['feature']}/{r['attack']}/{r['slice']}"
            for k, v in r.items():
                if k in ("epoch", "feature", "attack", "slice") or k.startswith(("train_", "test_")):
                    continue
                if isinstance(v, (int, float, np.integer, np.floating)) and _finite(v):
                    metrics[f"{prefix}/{k}"] = float(v)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=epoch)
        self._tensorboard_extras(trainer, arrays, result, epoch)
        if self.save_predictions:
            self._save_predictions(d, arrays, result, epoch)
        for logger in trainer.loggers:
            logger.save()

    def _tensorboard_extras(self, trainer: "pl.Trainer", arrays: Mapping[str, np.ndarray], result: Any,
                            epoch: int) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        from lightning_mia.report import tensorboard as tb

        if not self._layout_written:
            combos = sorted({(r["feature"], r["attack"]) for r in result.rows})
            tb.add_custom_scalars_layout(writer, combos, self.protocol["slices"])
            self._layout_written = True
        if self.log_histograms:
            member = np.asarray(arrays["is_member"], bool)
            for (f, a), s in result.scores.items():
                ok = np.isfinite(s)
                if (ok & member).any() and (ok & ~member).any():
                    tb.add_score_histograms(writer, f, a, epoch, s[ok & member], s[ok & ~member])

    def _save_predictions(self, d: str, arrays: Mapping[str, np.ndarray], result: Any, epoch: int) -> None:
        import io

        out = {"index": arrays["index"], "is_member": arrays["is_member"], "correct": arrays["correct"],
               "label": arrays["label"], "pred": arrays["pred"]}
        first = True
        for (f, a), s in result.scores.items():
            out[f"score__{f}__{a}"] = s
            out[f"fold__{f}__{a}"] = result.folds[(f, a)]
            if first:
                out["fold"] = result.folds[(f, a)]
                first = False
        for (src, f, a), (s, thr) in getattr(result, "ood", {}).items():
            out[f"ood_score__{src}__{f}__{a}"] = s
            out[f"ood_threshold__{src}__{f}__{a}"] = np.asarray(thr)
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        atomic_write_bytes(os.path.join(d, "predictions", f"epoch_{epoch:04d}.npz"), buf.getvalue())

    def _log_progress_bar(self, pl_module: "pl.LightningModule", result: Any) -> None:
        head = next((r for r in result.rows if r["slice"] == "all"), None)
        if head is not None and _finite(head.get("balanced_accuracy")):
            pl_module.log("mia_bal_acc", float(head["balanced_accuracy"]), prog_bar=True, logger=False,
                          rank_zero_only=True)  # same value on every rank (broadcast)

    # ------------------------------------------------------------------ helpers
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
    def _writer(trainer: "pl.Trainer") -> Any:
        """The TensorBoard SummaryWriter of the first TensorBoard logger (rank zero), else ``None``."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    @staticmethod
    def _skip_run(trainer: "pl.Trainer") -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run)

    def _progress_bar(self, trainer: "pl.Trainer", total: int) -> Any:
        slow = any(getattr(f, "requires_grad", False) for f in self._feature_objs.values())
        if not self.verbose or trainer.global_rank != 0 or not (slow or total > 20000):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="MIA features", leave=False, dynamic_ncols=True)

    def _summary(self, result: Any, epoch: int, t_extract: float, t_attack: float) -> str:
        tgt = result.target
        parts = [f"[MIA epoch {epoch}] train acc {tgt['train_acc']:.3f} test acc {tgt['test_acc']:.3f} "
                 f"(extract {t_extract:.1f}s, attacks {t_attack:.1f}s)"]
        for r in result.rows:
            keys = (("far", "FAR"),) if r["slice"].startswith("ood_") else _SUMMARY
            vals = " ".join(f"{short} {r.get(k, float('nan')):.3f}" for k, short in keys)
            parts.append(f"  {r['feature']}/{r['attack']}/{r['slice']}: {vals} "
                         f"(n={r.get('n_members')}/{r.get('n_nonmembers')})")
        return "\n".join(parts)

    @staticmethod
    def _print(trainer: "pl.Trainer", text: str) -> None:
        if trainer.global_rank != 0:
            return
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text)


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
