"""The LightningCLI with the monitor built in: :class:`MIACLI` and :func:`build_cli`.

The ``lightning-mia`` command dispatches in :mod:`lightning_mia.commands`; this module only builds the CLI, so the
study (and users' own scripts) can build one without importing the command dispatcher.
"""
from __future__ import annotations

from typing import Any, List, Optional

from jsonargparse import lazy_instance
from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
from lightning_mia.callbacks.monitor import MembershipInferenceMonitor
from lightning_mia.module import ImageClassifier

#: Runs land in ./runs/{name}/version_N, so `tensorboard --logdir runs` shows them all.
TRAINER_DEFAULTS = {
    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "lightning_mia"}},
}


class MIACLI(LightningCLI):
    """LightningCLI whose parser also holds the monitor (``--mia.*``) and the early-stopping comparison (``--es.*``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from lightning_mia.data import DigitsDataModule

        parser.add_lightning_class_args(MembershipInferenceMonitor, "mia")
        # the embedded defaults: LeNet on scikit-learn digits
        parser.set_defaults({"model": lazy_instance(ImageClassifier), "data": lazy_instance(DigitsDataModule)})
        parser.add_lightning_class_args(EarlyStoppingComparison, "es")


def build_cli(args: Optional[List[str]] = None, run: bool = True, **kwargs: Any) -> MIACLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, ``None`` = ``sys.argv``."""
    return MIACLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        # resuming into an existing logger version re-saves config.yaml: allow it (users resume with --ckpt_path
        # and a fixed logger version)
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
        **kwargs,
    )
