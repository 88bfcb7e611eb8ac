"""The ``lightning-mia`` command (and ``train.py``): a LightningCLI with the monitor built in, plus ``report`` /
``compare`` sub-commands that work on finished runs without re-training.

    lightning-mia fit --config configs/quickstart.yaml
    lightning-mia fit --help                       # every model, data, trainer and monitor (--mia.*) option
    lightning-mia report RUN_DIR [--out DIR]
    lightning-mia compare RUN_DIR RUN_DIR ... --out DIR
    lightning-mia study CONFIG ... [--fast] [--out docs/results.md]
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional

from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from jsonargparse import lazy_instance

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
        try:
            from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
        except ImportError:  # pragma: no cover - optional while the package is assembled
            return
        parser.add_lightning_class_args(EarlyStoppingComparison, "es")


def build_cli(args: Optional[List[str]] = None, run: bool = True) -> MIACLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, ``None`` = ``sys.argv``."""
    return MIACLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        # resuming into an existing logger version re-saves config.yaml (DESIGN.md §5)
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )


def main(argv: Optional[List[str]] = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("report", "compare"):
        from lightning_mia import report

        return getattr(report, f"main_{args[0]}")(args[1:])
    if args and args[0] == "study":
        from lightning_mia.study import main_study

        return main_study(args[1:])
    return build_cli(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()
