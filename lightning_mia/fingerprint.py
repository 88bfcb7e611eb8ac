"""Fingerprints of an audit: which pool, which data split and which monitor settings a run was audited with.

A resumed run continues the history of the run it resumes. That is only sound when it audits the same samples
of the same data with the same settings; otherwise two audit pools (or two feature sets, or two cadences) end up
mixed in one ``history.csv``. :func:`fingerprint` captures all three as plain Python types (checkpoint-safe under
``torch.load(weights_only=True)`` and JSON-safe for ``audit.json``); :func:`check_resume` compares two and raises
a ValueError that says what changed and how to start a fresh audit instead; :func:`resume_plan` is the whole
decision the monitor takes on resume.

Example:
    >>> import torch
    >>> from lightning_mia.audit import make_audit_pool
    >>> from lightning_mia.data import IndexedTensorDataset
    >>> members = IndexedTensorDataset(torch.rand(20, 1, 2, 2), torch.arange(20) % 2)
    >>> nonmembers = IndexedTensorDataset(torch.rand(10, 1, 2, 2), torch.arange(10) % 2)
    >>> pool = make_audit_pool(20, 10, ratio=2.0, seed=0).attach_indices(members, nonmembers)
    >>> a = fingerprint({"seed": 0, "features": ["loss"]}, pool, members, nonmembers)
    >>> b = fingerprint({"seed": 1, "features": ["loss"]}, pool, members, nonmembers)
    >>> check_resume(a, a)
    >>> try:
    ...     check_resume(a, b)
    ... except ValueError as err:
    ...     print(str(err).splitlines()[1])
      - the monitor's seed changed: 0 -> 1
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

#: Bumped when the fingerprint's content changes; fingerprints of another version are not compared.
FINGERPRINT_VERSION = 1
#: Inputs hashed per dataset (evenly spaced), and labels / index values read per dataset without bulk access.
N_SAMPLED_INPUTS = 16
N_SAMPLED_ITEMS = 256

#: Monitor attributes that decide what a history row means; everything else (batch size, verbosity, n_jobs,
#: where files go, whether predictions are saved) may change on resume.
MONITOR_FIELDS = ("seed", "every_n_epochs", "features", "attacks", "protocol", "n_members", "n_nonmembers", "ratio",
                  "calibrate", "reference_epoch", "ood_sources", "ood_samples")

_WHAT = {
    "seed": "the monitor's seed", "every_n_epochs": "every_n_epochs (the audit cadence)", "features": "the features",
    "attacks": "the attacks", "protocol": "the attack protocol", "n_members": "n_members", "ratio": "ratio",
    "n_nonmembers": "n_nonmembers", "calibrate": "calibrate", "reference_epoch": "reference_epoch",
    "ood_sources": "the OOD sources", "ood_samples": "ood_samples",
}


# ----------------------------------------------------------------------------------------------------------
# plain values
# ----------------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """JSON- and ``weights_only``-safe form: dicts with str keys, lists, str, int, float, bool, None."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else repr(f)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    to_dict = getattr(v, "to_dict", None)  # registry.Spec
    if callable(to_dict):
        return _plain(to_dict())
    options = getattr(v, "options", None)  # protocols
    if callable(options):
        return {"class": type(v).__name__, **_plain(options())}
    return repr(v)


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(_plain(p), sort_keys=True).encode())
        h.update(b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# the parts
# ----------------------------------------------------------------------------------------------------------
def monitor_config(monitor: Any) -> Dict[str, Any]:
    """The monitor settings a history depends on (:data:`MONITOR_FIELDS`), as plain values.

    ``monitor`` is a :class:`~lightning_mia.callbacks.MembershipInferenceMonitor` (``calibrate`` and
    ``reference_epoch`` are read from its ``auditor``) or a mapping of those fields.
    """
    if isinstance(monitor, Mapping):
        return {k: _plain(monitor[k]) for k in MONITOR_FIELDS if k in monitor}
    out: Dict[str, Any] = {}
    auditor = getattr(monitor, "auditor", None)
    for k in MONITOR_FIELDS:
        if hasattr(monitor, k) and not (k in ("calibrate", "reference_epoch") and auditor is not None):
            out[k] = _plain(getattr(monitor, k))
        elif auditor is not None and hasattr(auditor, k):
            out[k] = _plain(getattr(auditor, k))
    return out


def _bulk(dataset: Any, attr: str) -> Optional[np.ndarray]:
    import torch

    values = getattr(dataset, attr, None)
    if callable(getattr(dataset, "tensors", None)) and isinstance(values, torch.Tensor) and values.ndim == 1 \
            and len(values) == len(dataset):
        return values.cpu().numpy()
    return None


def _input_bytes(dataset: Any, p: int) -> bytes:
    x = dataset[int(p)][0]
    if not hasattr(x, "detach") and not isinstance(x, np.ndarray):  # dict / tuple inputs (token ids, ...)
        from lightning_mia.compat import input_bytes

        return input_bytes(x)
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32).tobytes()


def dataset_digest(dataset: Any) -> Dict[str, Any]:
    """``{"n": len, "sha256": ...}`` over the dataset's ``index`` and label arrays and a few sampled inputs.

    In-memory indexed datasets hand over all index values and labels at once; other datasets are sampled at
    :data:`N_SAMPLED_ITEMS` evenly spaced positions. :data:`N_SAMPLED_INPUTS` evenly spaced inputs are hashed as
    the model sees them (float32); a dataset whose inputs change between two reads (random transforms) is hashed
    without them rather than reporting a change on every resume.
    """
    from lightning_mia.audit import pool_indices, pool_labels

    n = len(dataset)
    index, labels = _bulk(dataset, "indices"), _bulk(dataset, "targets")
    if index is None or labels is None:
        sample = np.unique(np.linspace(0, n - 1, min(n, N_SAMPLED_ITEMS)).round().astype(np.int64)) if n else []
        index, labels = pool_indices(dataset, sample), pool_labels(dataset, sample)
    inputs = np.unique(np.linspace(0, n - 1, min(n, N_SAMPLED_INPUTS)).round().astype(np.int64)) if n else []
    first = [_input_bytes(dataset, p) for p in inputs]
    stable = all(_input_bytes(dataset, p) == b for p, b in zip(inputs[:2], first[:2]))
    h = hashlib.sha256()
    h.update(_sha(np.asarray(index, np.int64), np.asarray(labels, np.float64), n).encode())
    if stable:
        for b in first:
            h.update(hashlib.sha256(b).digest())
    return {"n": int(n), "sha256": h.hexdigest(), "inputs": bool(stable)}


def pool_digest(pool: Any) -> Dict[str, Any]:
    """Sizes, seed and one hash of the pool's positions and (when read) the samples' ``index`` values."""
    def arr(a: Any) -> np.ndarray:
        return np.asarray([] if a is None else a, dtype=np.int64)

    return {"seed": int(pool.seed), "n_members": int(pool.n_members), "n_nonmembers": int(pool.n_nonmembers),
            "sha256": _sha(arr(pool.member_positions), arr(pool.nonmember_positions), arr(pool.member_indices),
                           arr(pool.nonmember_indices))}


def fingerprint(monitor: Any, pool: Any, member_dataset: Any, nonmember_dataset: Any) -> Dict[str, Any]:
    """The audit's fingerprint: monitor settings, pool and data split (plain types; store it, compare it).

    Call it once the pool's index values are read (:meth:`AuditPool.attach_indices`).
    """
    return {"version": FINGERPRINT_VERSION, "monitor": monitor_config(monitor), "pool": pool_digest(pool),
            "data": {"member": dataset_digest(member_dataset), "nonmember": dataset_digest(nonmember_dataset)}}


# ----------------------------------------------------------------------------------------------------------
# comparing
# ----------------------------------------------------------------------------------------------------------
def _short(v: Any, limit: int = 120) -> str:
    if isinstance(v, list) and all(isinstance(x, Mapping) and "tag" in x for x in v):
        text = "[" + ", ".join(str(x["tag"]) if set(x) <= {"name", "tag"} and x.get("name") == x.get("tag")
                               else json.dumps(x, sort_keys=True) for x in v) + "]"
    else:
        text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """What differs between two fingerprints, one line each (empty: the same audit)."""
    out: List[str] = []
    if saved.get("version") != current.get("version"):
        return []  # another fingerprint format: nothing comparable
    a, b = saved.get("monitor") or {}, current.get("monitor") or {}
    for k in [k for k in MONITOR_FIELDS if k in a or k in b] + sorted((set(a) | set(b)) - set(MONITOR_FIELDS)):
        if a.get(k) != b.get(k):
            out.append(f"{_WHAT.get(k, k)} changed: {_short(a.get(k))} -> {_short(b.get(k))}")
    da, db = saved.get("data") or {}, current.get("data") or {}
    data_changed = False
    for side, name in (("member", "member (training) dataset"), ("nonmember", "non-member (held-out) dataset")):
        x, y = da.get(side) or {}, db.get(side) or {}
        if not x or not y:
            continue
        if x.get("n") != y.get("n"):
            out.append(f"the data split changed: the {name} had {x.get('n')} samples and now has {y.get('n')}")
            data_changed = True
        elif x.get("sha256") != y.get("sha256") and x.get("inputs") == y.get("inputs"):
            out.append(f"the data split changed: the {name} holds other samples (index values, labels or inputs)")
            data_changed = True
    if data_changed:
        out.append("  (the datamodule's seed, train_subset / heldout_subset, train_fraction, normalisation or the "
                   "data files differ from the resumed run's)")
    pa, pb = saved.get("pool") or {}, current.get("pool") or {}
    if pa and pb and pa.get("sha256") != pb.get("sha256") and not out:
        out.append(f"the audit pool changed: {pa.get('n_members')}/{pa.get('n_nonmembers')} members/non-members "
                   f"-> {pb.get('n_members')}/{pb.get('n_nonmembers')}, other positions or samples "
                   "(another audit_file?)")
    return out


FRESH_AUDIT_HINT = (
    "To continue this audit, resume with the original settings. To audit the resumed model afresh, write the audit "
    "to a new run directory (a new logger version, e.g. --trainer.logger.init_args.version=<new>, or "
    "--mia.dirpath=<new dir>); the epochs audited before the resume cannot be audited again there (their models "
    "are gone), so its history starts at the resumed epoch.")


def check_resume(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], run_dir: Optional[str] = None
                 ) -> None:
    """Raise a ValueError naming every change between the resumed audit (``saved``) and this run's (``current``).

    ``saved=None`` (a checkpoint or run directory of a version without fingerprints) passes: nothing to compare.
    """
    if saved is None:
        return
    diff = differences(saved, current)
    if not diff:
        return
    where = f" in {run_dir}" if run_dir else ""
    raise ValueError(
        f"Cannot resume the membership-inference audit{where}: this run audits with other settings than the run it "
        "resumes, and continuing would mix two audits in one history:\n"
        + "\n".join(f"  - {d}" if not d.startswith("  ") else f"  {d}" for d in diff)
        + "\n" + FRESH_AUDIT_HINT)


def read_fingerprint(audit_json: str) -> Optional[Dict[str, Any]]:
    """The fingerprint stored in a run's ``audit.json``; ``None`` when the file or its fingerprint is absent.

    An ``audit.json`` that cannot be read is a ValueError naming it: its audit cannot be checked.
    """
    if not os.path.lexists(audit_json):
        return None
    try:
        with open(audit_json, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"Cannot resume the membership-inference audit: {audit_json} is unreadable ({err}); the "
                         f"audit this run would continue cannot be checked. Move the file away to start the audit "
                         f"over, or write the audit to a new run directory.") from None
    fp = d.get("fingerprint") if isinstance(d, Mapping) else None
    return dict(fp) if isinstance(fp, Mapping) else None


def find_saved_fingerprint(callback_states: Optional[Mapping[Any, Any]], state_key: str,
                           class_name: str = "MembershipInferenceMonitor") -> Optional[Dict[str, Any]]:
    """The fingerprint a checkpoint holds for this monitor, also when its state key changed.

    Lightning files a callback's state under ``state_key``, which for the monitor includes ``seed``, ``features``
    and ``every_n_epochs``: change one and Lightning silently skips the saved state. Call this from
    ``on_load_checkpoint`` with ``checkpoint["callbacks"]``: it returns the fingerprint under ``state_key``, else
    that of the only monitor state in the checkpoint (a changed setting), else ``None``.
    """
    if not callback_states:
        return None
    state = callback_states.get(state_key)
    if state is None:
        others = [v for k, v in callback_states.items() if str(k).startswith(class_name)]
        state = others[0] if len(others) == 1 else None
    fp = state.get("fingerprint") if isinstance(state, Mapping) else None
    return dict(fp) if isinstance(fp, Mapping) else None


def resume_plan(state: Optional[Mapping[str, Any]], on_disk: Optional[Mapping[str, Any]],
                current: Mapping[str, Any], run_dir: Optional[str] = None) -> bool:
    """What a resumed monitor does: ``True`` continue the saved audit, ``False`` start a fresh audit.

    Args:
        state: the fingerprint in the checkpoint (:func:`find_saved_fingerprint`), or ``None``.
        on_disk: the fingerprint in the run directory's ``audit.json`` (:func:`read_fingerprint`), or ``None``.
        current: this run's :func:`fingerprint`.

    The run directory's audit is what a continued history would be mixed with: when it exists and differs, or
    the checkpoint's differs from it, this raises (:func:`check_resume`). When the run directory holds no audit
    yet (a new logger version / ``dirpath``) and the checkpoint's audit differs from this run's, the audit starts
    afresh there (``False``): the monitor must then drop the restored pool, ``last_epoch`` and calibration
    reference.
    """
    if on_disk is not None:
        check_resume(on_disk, current, run_dir)
        check_resume(state, on_disk, run_dir)
        return True
    if state is not None and differences(state, current):
        return False
    return True


def _num_classes(trainer: Any, pl_module: Any) -> Optional[int]:
    hparams = getattr(pl_module, "hparams", None) or {}
    n = hparams.get("num_classes") if hasattr(hparams, "get") else None
    n = n if n is not None else getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    return int(n) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else None


class AuditResume:
    """The monitor's pool checks and resume decision in one object (the callback stays thin).

    - :meth:`seal` (``setup``, every rank): validate the pool, refuse non-members seen in training, refuse bad
      labels, read the samples' ``index`` values and fingerprint the audit (also stored in the pool, hence in
      ``audit.json``).
    - :attr:`current` goes into the callback's ``state_dict`` as ``"fingerprint"``.
    - :meth:`on_load_checkpoint` (the callback hook) finds the checkpoint's fingerprint, also when the callback's
      state key changed (which makes Lightning skip the state silently).
    - :meth:`resolve` (``on_train_start``, every rank, before anything is written): on resume, continue the
      restored audit, start afresh (a run directory without an audit), or raise (what changed, and what to do).
    """

    def __init__(self) -> None:
        self.current: Optional[Dict[str, Any]] = None
        self.saved: Optional[Dict[str, Any]] = None
        self.fresh_pool: Any = None
        self._datasets: Any = None

    def seal(self, monitor: Any, pool: Any, members: Any, nonmembers: Any, trainer: Any = None,
             pl_module: Any = None) -> Any:
        from lightning_mia.audit import check_dataset_labels, check_nonmembers_unseen, validate_audit_pool

        validate_audit_pool(pool, len(members), len(nonmembers))
        if getattr(monitor, "check_overlap", True):  # on every rank: an error on one rank only would deadlock
            n_seen = check_nonmembers_unseen(members, nonmembers, pool.nonmember_positions)
            if n_seen:
                from lightning_mia.compat import rank_zero_warn

                rank_zero_warn(f"{n_seen} audit non-members are identical to training samples (duplicates across "
                               "the data set's splits); they count as non-members")
        num_classes = _num_classes(trainer, pl_module)
        pool.set_indices(check_dataset_labels(members, pool.member_positions, num_classes, "member dataset"),
                         check_dataset_labels(nonmembers, pool.nonmember_positions, num_classes, "non-member dataset"))
        self.current = pool.fingerprint = fingerprint(monitor, pool, members, nonmembers)
        self.fresh_pool, self._datasets = pool, (members, nonmembers)
        return pool

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any], state_key: str) -> None:
        self.saved = find_saved_fingerprint(checkpoint.get("callbacks"), state_key)

    def resolve(self, monitor: Any, trainer: Any, run_dir: str) -> bool:
        """On resume (``trainer.ckpt_path`` set): ``True`` when the restored audit continues; ``False`` when the
        monitor was reset to a fresh audit (its pool, ``last_epoch`` and calibration reference). Raises a
        ValueError, on every rank, when continuing would mix two audits."""
        if getattr(trainer, "ckpt_path", None) is None or self.current is None:
            return True
        message, keep = None, True
        if trainer.global_rank == 0:  # the run directory is rank zero's
            from lightning_mia.layout import RunLayout

            try:
                keep = resume_plan(self.saved, read_fingerprint(RunLayout(run_dir).audit_json), self.current, run_dir)
            except ValueError as err:
                message = str(err)
        if getattr(trainer, "world_size", 1) > 1:
            message, keep = trainer.strategy.broadcast((message, keep), src=0)
        if message is not None:
            raise ValueError(message)
        if not keep:
            monitor.pool, monitor.last_epoch, monitor._resumed = self.fresh_pool, -1, False
            monitor.auditor.reference = None
        elif monitor.pool is not self.fresh_pool:  # the restored pool: same samples (checked), with their index
            if monitor.pool.member_indices is None or monitor.pool.nonmember_indices is None:
                monitor.pool.attach_indices(*self._datasets)
            monitor.pool.fingerprint = self.current
        return keep


__all__: Sequence[str] = ("AuditResume", "FINGERPRINT_VERSION", "MONITOR_FIELDS", "check_resume", "dataset_digest",
                          "differences",
                          "find_saved_fingerprint", "fingerprint", "monitor_config", "pool_digest",
                          "read_fingerprint", "resume_plan")
