"""``ImageClassifier``: the target model as a LightningModule (model by name, optimizer and LR schedule from config)."""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("none", "step", "multistep", "cosine")


class ImageClassifier(pl.LightningModule):
    """A classifier whose network comes from the model registry.

    Logs per epoch ``train_loss``, ``train_acc`` (running, training mode) and ``val_loss``, ``val_acc`` (held-out
    split); the accuracies are ``torchmetrics`` metrics, exact over the epoch and synchronised under DDP.
    ``num_classes`` and ``input_shape`` may be left ``None``: they are then read from the datamodule at ``setup``
    (and stored in the hyper-parameters so checkpoints reload without a datamodule).

    Args:
        model: registered model name (``lenet``, ``alexnet``, ``resnet``, ``densenet``, ...).
        model_kwargs: extra constructor arguments of the model (e.g. ``{"depth": 20}``).
        num_classes: number of classes; ``None`` = from the datamodule.
        input_shape: ``(C, H, W)``; ``None`` = from the datamodule.
        optimizer: ``sgd`` or ``adam``.
        lr, momentum, weight_decay, betas, nesterov: optimizer settings.
        scheduler: ``none``, ``step`` (``step_size``, ``gamma``), ``multistep`` (``milestones``, ``gamma``) or
            ``cosine`` (over ``trainer.max_epochs``); stepped once per epoch.

    Example:
        >>> m = ImageClassifier("lenet", num_classes=10, input_shape=(1, 8, 8), optimizer="adam", lr=1e-3)
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: str = "lenet",
        model_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        input_shape: Optional[Tuple[int, int, int]] = None,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        nesterov: bool = False,
        scheduler: Literal["none", "step", "multistep", "cosine"] = "none",
        step_size: int = 30,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        from lightning_mia.models import MODELS

        if model not in MODELS:
            MODELS[model]  # raises KeyError listing the known names
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if input_shape is not None and len(tuple(input_shape)) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.save_hyperparameters()
        self.net: Optional[torch.nn.Module] = None
        if num_classes is not None and input_shape is not None:
            self.build_network(num_classes, tuple(input_shape))

    def build_network(self, num_classes: int, input_shape: Tuple[int, int, int]) -> None:
        """Build the network for ``num_classes`` and ``input_shape`` (``setup`` does it from the datamodule)."""
        from lightning_mia.models import build_model

        self.net = build_model(self.hparams.model, num_classes=num_classes, input_shape=tuple(input_shape),
                               **(self.hparams.model_kwargs or {}))
        self.hparams.num_classes = int(num_classes)
        self.hparams.input_shape = tuple(int(s) for s in input_shape)
        from torchmetrics.classification import MulticlassAccuracy

        # torchmetrics: the exact accuracy over the epoch, synchronised across DDP ranks by Lightning (a mean of
        # per-batch accuracies would weigh a short last batch like a full one)
        self.accuracy = torch.nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(int(num_classes), average="micro")
                                             for stage in ("train", "val", "test")})

    def setup(self, stage: str) -> None:
        if self.net is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = self.hparams.num_classes or getattr(dm, "num_classes", None)
        input_shape = self.hparams.input_shape or getattr(dm, "input_shape", None)
        if num_classes is None or input_shape is None:
            raise ValueError("ImageClassifier needs num_classes and input_shape: pass them, or use a datamodule "
                             "that exposes `num_classes` and `input_shape` (all lightning_mia datamodules do)")
        self.build_network(int(num_classes), tuple(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("The network is built at setup(); pass num_classes and input_shape to use it before")
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = self.accuracy[f"{stage}_acc"]
        acc(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        h = self.hparams
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay,
                                  nesterov=h.nesterov)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        if h.scheduler == "none":
            return opt
        if h.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=h.step_size, gamma=h.gamma)
        elif h.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(h.milestones), gamma=h.gamma)
        else:
            t_max = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
