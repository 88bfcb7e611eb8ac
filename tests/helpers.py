"""Small builders shared by the Lightning-level tests."""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tiny_trainer(tmp_path, callbacks, max_epochs=2, **kwargs):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version=kwargs.pop("version", 0))
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=kwargs.pop("devices", 1), logger=logger,
                      callbacks=callbacks, enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=True, **kwargs)


def scalars(log_dir):
    """{tag: [(step, value), ...]} of every scalar in a TensorBoard run directory."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def balanced_accuracy_from_counts(y, p):
    y, p = np.asarray(y, bool), np.asarray(p, bool)
    return 0.5 * (np.mean(p[y]) + np.mean(~p[~y]))
