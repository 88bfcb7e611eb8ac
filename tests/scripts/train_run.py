"""A small training run driven by the DDP and kill/resume tests (run as a subprocess).

    python tests/scripts/train_run.py --out DIR [--strategy ddp|ddp_spawn --devices 2] [--epochs N] [--lr LR]
                                      [--resume] [--sleep S]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_mia.callbacks import EarlyStoppingComparison, MembershipInferenceMonitor  # noqa: E402
from lightning_mia.data import SyntheticDataModule  # noqa: E402
from lightning_mia.module import ImageClassifier  # noqa: E402
from lightning_mia.protocols import StandardProtocol  # noqa: E402


class Sleep(pl.Callback):
    """Slows epochs down so a test can kill the process mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--features", default="confidence,loss")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = SyntheticDataModule(input_shape=(1, 8, 8), num_classes=3, n_train=101, n_heldout=67, signal=1.0,
                             batch_size=16, seed=0)
    model = ImageClassifier("lenet", num_classes=3, input_shape=(1, 8, 8), optimizer="sgd", lr=args.lr)
    monitor = MembershipInferenceMonitor(features=args.features.split(","), attacks=["threshold", "logistic_regression"],
                                         protocol=StandardProtocol(repeats=2), ratio=1.5, save_predictions=True, verbose=False,
                                         report_at_end=False)
    ckpt = ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_last=True, every_n_epochs=1, save_top_k=-1)
    callbacks = [monitor, EarlyStoppingComparison(monitor="val_loss", patience=[1, 2]), ckpt]
    if args.sleep:
        callbacks.append(Sleep(args.sleep))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                         logger=TensorBoardLogger(args.out, name="run", version=0), callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True)
    last = os.path.join(args.out, "ckpt", "last.ckpt")
    trainer.fit(model, datamodule=dm, ckpt_path=last if args.resume and os.path.exists(last) else None)


if __name__ == "__main__":
    main()
