"""The LightningCLI with the monitor built in: :class:`MIACLI` and :func:`build_cli`.

The ``lightning-mia`` command dispatches in :mod:`lightning_mia.commands`; this module only builds the CLI, so the
study (and users' own scripts) can build one without importing the command dispatcher.

- ``--model`` takes any LightningModule class path and ``--data`` any LightningDataModule (subclass mode with
  Lightning's own base classes); ``ImageClassifier`` and ``DigitsDataModule`` are the defaults.
- Both Lightning packages: the CLI is built on ``pytorch_lightning`` unless the command line or a ``--config``
  file names ``lightning.pytorch`` classes (``--trainer.logger lightning.pytorch.loggers.CSVLogger``,
  ``lightning_mia.lightning.ImageClassifier``, a module of your own built on ``lightning.pytorch``), or only
  ``lightning`` is installed; then it is built on ``lightning.pytorch`` (:func:`detect_namespace`). A Trainer
  takes one package's classes, so naming both packages' classes is refused with a message saying which.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from jsonargparse import lazy_instance

from lightning_mia.compat import available_namespaces, default_namespace, namespace_of

#: Runs land in ./runs/{name}/version_N, so `tensorboard --logdir runs` shows them all.
TRAINER_DEFAULTS = {
    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
               # default_hp_metric=False: TensorBoard keeps a run's first HParams entry; Lightning's placeholder
               # (hp_metric = -1) would hide the audit's own, written at fit end
               "init_args": {"save_dir": "runs", "name": "lightning_mia", "default_hp_metric": False}},
}


def trainer_defaults(ns: str) -> Dict[str, Any]:
    """:data:`TRAINER_DEFAULTS` with the logger of the namespace ``ns``."""
    logger = dict(TRAINER_DEFAULTS["logger"], class_path=f"{ns}.loggers.TensorBoardLogger")
    return {**TRAINER_DEFAULTS, "logger": logger}


class _MIACLIMixin:
    """Adds the monitor (``--mia.*``), the early-stopping comparison (``--es.*``) and the default model and data."""

    _mia_namespace = "pytorch_lightning"

    def add_arguments_to_parser(self, parser: Any) -> None:
        from lightning_mia.data import DigitsDataModule

        model, monitor, es = _package_classes(self._mia_namespace)
        parser.add_lightning_class_args(monitor, "mia")
        # the embedded defaults: LeNet on scikit-learn digits
        parser.set_defaults({"model": lazy_instance(model), "data": lazy_instance(DigitsDataModule)})
        parser.add_lightning_class_args(es, "es")


def _package_classes(ns: str) -> Tuple[type, type, type]:
    """(ImageClassifier, MembershipInferenceMonitor, EarlyStoppingComparison) of the namespace ``ns``."""
    from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison

    if ns == "lightning.pytorch":
        from lightning_mia import lightning as flavour

        return flavour.ImageClassifier, flavour.MembershipInferenceMonitor, EarlyStoppingComparison
    from lightning_mia.callbacks.monitor import MembershipInferenceMonitor
    from lightning_mia.module import ImageClassifier

    return ImageClassifier, MembershipInferenceMonitor, EarlyStoppingComparison


@functools.lru_cache(maxsize=None)
def cli_class(ns: str) -> type:
    """The ``MIACLI`` class of the Lightning namespace ``ns`` (``pytorch_lightning`` or ``lightning.pytorch``)."""
    base = importlib.import_module(ns + ".cli").LightningCLI
    return type("MIACLI", (_MIACLIMixin, base), {"_mia_namespace": ns, "__module__": __name__,
                                                  "__doc__": MIACLI_DOC})


MIACLI_DOC = "LightningCLI whose parser also holds the monitor (``--mia.*``) and the early-stopping comparison (``--es.*``)."


def __getattr__(name: str) -> Any:  # MIACLI, on the default namespace, built when first asked for
    if name == "MIACLI":
        return cli_class(default_namespace())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ which package
_LIGHTNING_RE = re.compile(r"(?<![\w.])(lightning\.pytorch|lightning\.fabric|lightning_mia\.lightning)(?=[.\s'\",\]}]|$)")
_PL_RE = re.compile(r"(?<![\w.])(pytorch_lightning|lightning_fabric)(?=[.\s'\",\]}]|$)")
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_CONFIG_FLAGS = ("--config", "-c")


def _config_files(args: Sequence[str]) -> List[str]:
    paths = []
    for i, a in enumerate(args):
        if a in _CONFIG_FLAGS and i + 1 < len(args):
            paths.append(args[i + 1])
        elif any(a.startswith(f + "=") for f in _CONFIG_FLAGS):
            paths.append(a.split("=", 1)[1])
    return [p for p in paths if os.path.isfile(p)]


def _yaml_strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _yaml_strings(k)
            yield from _yaml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_strings(v)


def _candidate_strings(args: Sequence[str]) -> List[Tuple[str, str]]:
    """``(string, where)`` for every argument value and every string of the ``--config`` files."""
    out = []
    for a in args:
        for part in a.split("=", 1) if a.startswith("--") else [a]:
            out.append((part, "the command line"))
    for path in _config_files(args):
        try:
            import yaml

            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except Exception:  # noqa: BLE001 - the parser reports unreadable configs itself
            continue
        out.extend((s, path) for s in _yaml_strings(data))
    return out


def _class_namespace(path: str) -> Optional[str]:
    """The namespace of the class a dotted path names (imported as jsonargparse would), ``None`` when it names
    no Lightning class, belongs to both packages, or does not import."""
    module, _, name = path.rpartition(".")
    if not module or not name[:1].isupper() or module.split(".")[0] in ("torch", "jsonargparse", "numpy"):
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a typo or a missing module: the parser reports it
        return None
    return namespace_of(obj) if isinstance(obj, type) else None


def detect_namespace(args: Sequence[str]) -> str:
    """The Lightning namespace the CLI is built on for ``args`` (see the module docstring): ``lightning.pytorch``
    when the command line or a ``--config`` file names a class of it (by its path, or a class of your own built
    on it), ``pytorch_lightning`` when they name only its classes or nothing (and it is installed)."""
    votes: Dict[str, List[str]] = {"pytorch_lightning": [], "lightning.pytorch": []}
    for text, where in _candidate_strings(args):
        for ns, regex in (("lightning.pytorch", _LIGHTNING_RE), ("pytorch_lightning", _PL_RE)):
            if regex.search(text):
                votes[ns].append(f"{text.strip()} ({where})")
        if _CLASS_PATH_RE.match(text.strip()) and not _LIGHTNING_RE.search(text) and not _PL_RE.search(text):
            ns = _class_namespace(text.strip())
            if ns is not None:
                votes[ns].append(f"{text.strip()} ({where})")
    installed = available_namespaces()
    chosen = [ns for ns in ("pytorch_lightning", "lightning.pytorch") if votes[ns]]
    if len(chosen) == 2:
        raise ValueError(
            "The command line and config name classes of both Lightning packages, and a Trainer takes one "
            f"package's classes: pytorch_lightning: {', '.join(votes['pytorch_lightning'][:3])}; lightning.pytorch: "
            f"{', '.join(votes['lightning.pytorch'][:3])}. Name them all from one package (every "
            "pytorch_lightning.X has a lightning.pytorch.X twin; lightning_mia.lightning.ImageClassifier is the "
            "lightning.pytorch ImageClassifier)")
    if chosen:
        ns = chosen[0]
        if ns not in installed:
            pip = "lightning" if ns == "lightning.pytorch" else "pytorch-lightning"
            raise ValueError(f"{votes[ns][0]} needs {ns}, which is not installed (pip install {pip})")
        return ns
    return default_namespace()


def build_cli(args: Optional[List[str]] = None, run: bool = True, namespace: Optional[str] = None,
              **kwargs: Any) -> Any:
    """Build (and by default run) the CLI; ``args`` as on the command line, ``None`` = ``sys.argv``.

    ``namespace``: ``pytorch_lightning`` or ``lightning.pytorch``; default :func:`detect_namespace` of the args."""
    import sys

    if namespace is None:
        namespace = detect_namespace(sys.argv[1:] if args is None else args)
    from lightning_mia.compat import _check_namespace

    namespace = _check_namespace(namespace)
    ns = importlib.import_module(namespace)
    return cli_class(namespace)(
        ns.LightningModule,
        ns.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(namespace),
        # resuming into an existing logger version re-saves config.yaml: allow it (users resume with --ckpt_path
        # and a fixed logger version)
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
        **kwargs,
    )
