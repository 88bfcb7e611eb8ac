"""``ImageClassifier``: the target model as a LightningModule (model by name, optimizer and LR schedule from config,
optionally trained with DP-SGD).

The implementation is :class:`ImageClassifierMixin`, which has no Lightning base class; each Lightning package gets
its concrete class (a LightningModule belongs to exactly one package, see :mod:`lightning_mia.compat`):
``lightning_mia.module.ImageClassifier`` here (``pytorch_lightning``, or ``lightning.pytorch`` when only that is
installed) and ``lightning_mia.lightning.ImageClassifier`` (``lightning.pytorch``).
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lightning_mia.compat import namespace, namespace_of
from lightning_mia.dp import DPSGD, DPConfig, check_dp_compatible

pl = namespace()  # the default Lightning package (pytorch_lightning when installed)

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("none", "step", "multistep", "cosine")


class ImageClassifierMixin:
    """A classifier whose network comes from the model registry (the implementation of :class:`ImageClassifier`;
    combine it with a LightningModule base class of either Lightning package).

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
        dp: train with DP-SGD (a :class:`~lightning_mia.dp.DPConfig` or a mapping of its fields; YAML
            ``model.init_args.dp: {noise_multiplier: 1.0, max_grad_norm: 1.0}``): Opacus clips every per-sample
            gradient, adds Gaussian noise and, with ``poisson_sampling``, draws Poisson batches (the lightning_mia
            datamodules ask :meth:`prepare_train_dataloader` for them). The accountant's epsilon is logged at every
            training epoch's end as ``privacy/epsilon`` and kept in :attr:`epsilon_history`; :meth:`get_epsilon`
            gives it at any time, and checkpoints carry the accountant, so a resumed run continues its budget.
            Needs ``pip install opacus`` (imported when training starts, or to apply ``fix_modules``). Single device
            only, no gradient accumulation; networks with BatchNorm need ``fix_modules: true`` or another model.

    Example:
        >>> m = ImageClassifier("lenet", num_classes=10, input_shape=(1, 8, 8), optimizer="adam", lr=1e-3)
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> ImageClassifier("lenet", dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0}).dp.accountant
        'rdp'
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
        dp: Optional[DPConfig] = None,
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
        self.dp: Optional[DPConfig] = DPConfig.coerce(dp)
        self._save_init_hyperparameters(inspect.currentframe(), model=model, model_kwargs=model_kwargs,
                                        num_classes=num_classes, input_shape=input_shape, optimizer=optimizer, lr=lr,
                                        momentum=momentum, weight_decay=weight_decay, betas=betas,
                                        nesterov=nesterov, scheduler=scheduler, step_size=step_size,
                                        milestones=milestones, gamma=gamma, dp=dp)
        # plain types in checkpoints (LightningCLI resumes with torch.load(weights_only=True))
        self.hparams["dp"] = None if self.dp is None else self.dp.to_dict()
        #: the accountant's epsilon at the end of every training epoch (DP-SGD only; kept across resumes)
        self.epsilon_history: List[float] = []
        self._dp_engine: Optional[DPSGD] = None
        self._dp_restored: Optional[Dict[str, Any]] = None
        self.net: Optional[torch.nn.Module] = None
        if num_classes is not None and input_shape is not None:
            self.build_network(num_classes, tuple(input_shape))

    def _save_init_hyperparameters(self, frame: Any, **own: Any) -> None:
        """``save_hyperparameters()`` as Lightning does it, for a mixin: this class's arguments plus those of every
        subclass ``__init__`` on the call stack (Lightning's own frame walk only starts at a subclass of its
        ``HyperparametersMixin``, which this mixin is not)."""
        ns = namespace_of(self) or "pytorch_lightning"
        mixin = importlib.import_module(ns + ".core.mixins").HyperparametersMixin
        collect = importlib.import_module(ns + ".utilities.parsing").collect_init_args
        hparams = dict(own)
        caller = frame.f_back if frame is not None else None
        if caller is not None:
            for args in collect(caller, [], inside=True, classes=(mixin,)):
                hparams.update(args)
        self.save_hyperparameters(hparams)  # type: ignore[attr-defined]
        self._hparams_name = "kwargs"  # as the argument-less call records it (checkpoints load the same way)

    def build_network(self, num_classes: int, input_shape: Tuple[int, int, int]) -> None:
        """Build the network for ``num_classes`` and ``input_shape`` (``setup`` does it from the datamodule)."""
        from lightning_mia.models import build_model

        net = build_model(self.hparams.model, num_classes=num_classes, input_shape=tuple(input_shape),
                          **(self.hparams.model_kwargs or {}))
        if self.dp is not None:
            # checked (or fixed) before an optimizer sees the parameters; only fix_modules needs Opacus here
            net = check_dp_compatible(net, fix=self.dp.fix_modules)
        self.net = net
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
        if x.shape[0] == 0:
            # Poisson sampling can draw an empty batch (probability (1 - q)^N): the private step still runs (its
            # noise is part of the mechanism) on a zero gradient; nothing to log, and a mean over nothing is NaN.
            return logits.sum() * 0.0
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
        if self.dp is not None:
            opt = self._make_private(opt)
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

    # --- DP-SGD -------------------------------------------------------------------------------------------
    @property
    def dp_engine(self) -> Optional[DPSGD]:
        """The run's :class:`~lightning_mia.dp.DPSGD` (accountant, sample rate, delta); ``None`` without ``dp``
        and before training (or :meth:`get_epsilon`) asked for it."""
        return self._dp_engine

    def _engine(self) -> DPSGD:
        # created on first use, so that building or loading a DP model for inference needs no Opacus
        if self._dp_engine is None:
            assert self.dp is not None
            self._dp_engine = DPSGD(self.dp)
            if self._dp_restored is not None:
                self._dp_engine.load_state_dict(self._dp_restored)
        return self._dp_engine

    def prepare_train_dataloader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        """The loader to train on, given the datamodule's: with ``dp.poisson_sampling`` an Opacus ``DPDataLoader``
        (each sample in a batch with probability ``1 / len(loader)``), otherwise ``loader`` itself.

        The lightning_mia datamodules call this from ``train_dataloader``; a datamodule of your own can do the same
        (``return self.trainer.lightning_module.prepare_train_dataloader(loader)``).
        """
        if self.dp is None or not self.dp.poisson_sampling:
            return loader
        return self._engine().poisson_loader(loader)

    def _make_private(self, optimizer: torch.optim.Optimizer) -> Any:
        trainer = self._trainer
        if trainer is None or self.net is None:
            raise RuntimeError("DP-SGD needs the Trainer (fit) to set up the private optimizer")
        engine = self._engine()
        if trainer.world_size > 1:
            raise ValueError(f"DP-SGD (dp=...) trains on one device here, got world_size={trainer.world_size}: "
                             f"Opacus's distributed Poisson sampling and DPDDP are not wired into this module")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"DP-SGD (dp=...) needs accumulate_grad_batches=1 (the sample rate and the accountant "
                             f"count one batch per step), got {trainer.accumulate_grad_batches}")
        # Lightning builds the train loader on request (its documented way for schedulers that need the number of
        # steps); the loader it returns is the one the fit loop iterates.
        _ = trainer.estimated_stepping_batches
        loader = trainer.train_dataloader
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ValueError(f"DP-SGD needs one map-style training DataLoader, got {type(loader).__name__}")
        # Opacus's full validation of the network (buffers, unsupported layers) before its hooks go on
        check_dp_compatible(self.net)
        return engine.attach(self.net, optimizer, loader)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self._dp_engine is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Opacus's per-sample-gradient hooks only around the step's forward/backward (run by the closure)
        with self._dp_engine.per_sample_gradients():
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        return None

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """The privacy spent so far, epsilon at ``delta`` (default: ``dp.delta``, or ``1 / (10 N)``), from the
        accountant (``nan`` without ``dp``). The monitor can read it at any hook; the value logged at an epoch's
        end is this one."""
        if self.dp is None:
            return math.nan
        return self._engine().epsilon(delta)

    def on_train_epoch_end(self) -> None:
        if self.dp is None:
            return
        eps = self.get_epsilon()
        self.epsilon_history.append(eps)
        self.log("privacy/epsilon", eps, on_step=False, on_epoch=True, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self._dp_engine is not None:
            checkpoint["privacy"] = {**self._dp_engine.state_dict(),
                                     "epsilon_history": [float(e) for e in self.epsilon_history]}
        elif self._dp_restored is not None:  # loaded, not trained further: keep what was loaded
            checkpoint["privacy"] = {**self._dp_restored, "epsilon_history": [float(e) for e in self.epsilon_history]}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("privacy")
        if state is None:
            return
        self.epsilon_history = [float(e) for e in state.get("epsilon_history", [])]
        self._dp_restored = dict(state)
        if self._dp_engine is not None:
            self._dp_engine.load_state_dict(state)


class ImageClassifier(ImageClassifierMixin, pl.LightningModule):
    __doc__ = ImageClassifierMixin.__doc__
