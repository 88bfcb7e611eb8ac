"""Epoch time with the membership-inference monitor vs without, measured side by side in one run.

Target (issue 3): LeNet on Fashion-MNIST, monitor every epoch with confidence + logistic regression on a 10k-sample
audit pool: at most 1.15x. Uses Debian's Fashion-MNIST when installed, else synthetic 28x28 data of the same size.

    python benchmarks/monitor_overhead.py [--epochs 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mia.callbacks import MembershipInferenceMonitor  # noqa: E402
from lightning_mia.data import MNISTDataModule, SyntheticDataModule  # noqa: E402
from lightning_mia.module import ImageClassifier  # noqa: E402
from lightning_mia.protocols import StandardProtocol


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, including validation and every other callback's epoch-end work."""

    def __init__(self) -> None:
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs after the monitor: it is the last callback
        self.times.append(time.perf_counter() - self._t)


def datamodule(quick: bool):
    try:
        dm = MNISTDataModule(dataset="fashion_mnist", batch_size=64, heldout_subset=2000 if quick else None,
                             train_subset=12000 if quick else None)
        dm.setup("fit")
        return dm, "Fashion-MNIST"
    except Exception as err:  # no data installed: same shapes, synthetic
        print(f"(Fashion-MNIST not available: {err.__class__.__name__}; using synthetic 28x28 data)")
        n = 12000 if quick else 60000
        return SyntheticDataModule(input_shape=(1, 28, 28), num_classes=10, n_train=n, n_heldout=10000,
                                   batch_size=64), "synthetic"


def run(epochs: int, quick: bool, monitor: bool):
    torch.manual_seed(0)
    dm, _ = datamodule(quick)
    timer = EpochTimer()
    callbacks = []
    mon = None
    if monitor:
        pool = 2000 if quick else 10000
        callbacks.append(mon := MembershipInferenceMonitor(features=["confidence"], attacks=["logistic_regression"],
                                                    n_members=pool * 5 // 6, n_nonmembers=pool // 6, protocol=StandardProtocol(repeats=1),
                                                    verbose=False, report_at_end=False, log_histograms=False))
    callbacks.append(timer)
    with tempfile.TemporaryDirectory() as d:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                             default_root_dir=d, logger=pl.loggers.TensorBoardLogger(d), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-3, betas=(0.5, 0.99)), datamodule=dm)
    steady = timer.times[1:] or timer.times  # the first epoch pays one-off warm-up costs
    return sum(steady) / len(steady), (mon.timings[1:] or mon.timings) if mon else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="12k training images, 2k audit pool")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    _, name = datamodule(args.quick)
    # alternate to spread machine noise over both arms
    base, _ = run(args.epochs, args.quick, monitor=False)
    with_mon, timings = run(args.epochs, args.quick, monitor=True)
    base2, _ = run(args.epochs, args.quick, monitor=False)
    base = (base + base2) / 2
    print(f"data: {name}, LeNet, {args.epochs} epochs per arm, threads={torch.get_num_threads()}")
    print(f"epoch time without monitor: {base:.2f}s")
    print(f"epoch time with monitor:    {with_mon:.2f}s (confidence + logistic_regression, every epoch)")
    for k in ("extract_s", "attack_s", "write_s"):
        print(f"  monitor {k[:-2]}: {sum(t[k] for t in timings) / len(timings):.2f}s per audit")
    work = sum(sum(t.values()) - t["epoch"] for t in timings) / len(timings)
    print(f"monitor overhead {with_mon / base:.2f}x (target <= 1.15x; epoch times, noisy on a shared machine)")
    print(f"monitor overhead from its own timers {(base + work) / base:.2f}x (epoch without monitor + audit work)")


if __name__ == "__main__":
    main()
