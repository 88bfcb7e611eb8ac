"""``ReferenceEnsemble``: the K reference ("shadow") models that LiRA and RMIA compare the target with, trained
live, epoch by epoch, beside the target.

Each reference is a fresh instance of the target's own class and recipe (optimizer, LR schedule, loss), seeded
per ``(seed, k)``, trained on its own seeded random half of a population data set (online LiRA, Carlini et al.,
"Membership Inference Attacks From First Principles", S&P 2022, Sec. IV: every population sample is IN for about
half of the references). Two interchangeable training paths:

* **vectorised** (``torch.func``): the K parameter sets are stacked (``torch.func.stack_module_state``), the K
  losses of one step come from per-reference batches ``(K, B, ...)``, there is one backward pass of their sum and
  ONE optimizer step over the stacked tensors. Exact for element-wise optimizers (``ELEMENTWISE_OPTIMIZERS``):
  element ``k`` of every stacked tensor and of its optimizer state evolves as in an optimizer of model ``k`` alone.
  Recipe from the torch.func "Model ensembling" tutorial (pytorch.org/tutorials/intermediate/ensembling.html).
  The K forward passes run either as one ``vmap(functional_call)`` (``stacked_forward="vmap"``, the default on
  accelerators, where one launch instead of K per kernel should pay; not measured here, our machines have no GPU)
  or as K ``functional_call`` calls on unbound slices of the stacked tensors inside the same autograd graph
  (``"sequential"``, the default on CPUs). On our 2-core CPUs vmap, which turns each convolution into a grouped
  convolution over a K-times larger working set and copies activations between batch layouts, ran LeNet at
  0.4x-2.9x the loop's speed depending on how contended the cores were (fast only when other processes made the
  many small kernels of the loop wait for threads), the sequential forward at 0.99x-1.08x, with results bit for
  bit those of the loop; ``benchmarks/reference_models.py`` prints all three.
* **looped**: K ordinary modules, each with its own optimizer and scheduler from its own ``configure_optimizers()``;
  used where the vectorised path cannot run: BatchNorm running statistics are updated in place, which vmap
  forbids (torch.func "UX Limitations": in-place mutation inside vmap), or the optimizer couples elements.

All paths draw the same batches in the same order and train identically (up to float rounding; the sequential
forward runs the very kernels of the loop and matches it bit for bit), so the path is an implementation detail:
checkpoints written by one load into another.

Population items are ``(x, y, index)``; positions used here are positions in the population data set.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lightning_mia.data.base import IndexedTensorDataset
from lightning_mia.validation import check_choice, check_int

from .optim import (
    ELEMENTWISE_OPTIMIZERS,
    OptimizerRecipe,
    TrainerStandIn,
    merge_optimizer_state,
    parse_optimizers,
    split_optimizer_state,
)

__all__ = ["ReferenceEnsemble", "default_in_mask", "STATE_FORMAT"]

STATE_FORMAT = "lightning_mia.reference_ensemble/1"
VECTORIZE = ("auto", "always", "never")
STACKED_FORWARD = ("auto", "vmap", "sequential")

# Seed streams: one user seed gives independent draws for each random choice, keyed by the GLOBAL reference
# number k, so that an instance holding references r::world (DDP) draws exactly what a single instance would.
_STREAM_INIT, _STREAM_MASK, _STREAM_ORDER, _STREAM_NOISE, _STREAM_NOISE_VMAP = 0, 1, 2, 3, 4


def _derive(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashes them)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 32 | int(words[1])) % (2**63)


def default_in_mask(count: int, n: int, seed: int = 0) -> np.ndarray:
    """The default ``(count, n)`` IN mask: row ``k`` is a random half (``n // 2`` items) of the population.

    Each row is drawn from ``(seed, k)`` alone, so any subset of references can be drawn on its own. Every item is
    then IN for Binomial(count, 1/2) references (online LiRA, Carlini et al. 2022: each sample IN for about half of
    the models), and all IN sets have the same size, so every reference trains the same number of steps per epoch.
    (The LiRA authors' code balances columns instead: each item IN for exactly half; pass such a mask as
    ``in_mask`` if wanted.)

    Example:
        >>> m = default_in_mask(4, 10, seed=0)
        >>> m.shape, m.sum(axis=1).tolist()
        ((4, 10), [5, 5, 5, 5])
    """
    check_int("count", count, 1)
    check_int("n", n, 2)
    check_int("seed", seed, 0)
    mask = np.zeros((count, n), dtype=bool)
    for k in range(count):
        rng = np.random.default_rng([int(seed), _STREAM_MASK, k])
        mask[k, rng.choice(n, size=n // 2, replace=False)] = True
    return mask


class _Source:
    """Batches ``(x, y)`` of a data set at given positions.

    In-memory data sets without a train-time transform (``IndexedTensorDataset`` with ``transform=None``,
    ``TensorDataset``) are indexed as tensors in one go; any other data set is read item by item through its
    ``__getitem__`` (so augmentation is applied, drawn from the data set's own generator) and collated with
    ``default_collate``, as a ``DataLoader`` over a ``Subset`` with ``num_workers=0`` would.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        if isinstance(dataset, IndexedTensorDataset) and dataset.transform is None:
            self.mode = "indexed_tensor"
        elif isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
            self.mode = "tensor"
        else:
            self.mode = "items"

    def get(self, positions: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if self.mode == "indexed_tensor":
            x, y, _ = self.dataset.subset(pos).tensors()  # type: ignore[attr-defined]
            return x, y
        if self.mode == "tensor":
            t = torch.as_tensor(pos)
            tensors = self.dataset.tensors  # type: ignore[attr-defined]
            return tensors[0][t], tensors[1][t]
        batch = default_collate([self.dataset[int(p)] for p in pos])
        return batch[0], torch.as_tensor(batch[1])


def _constructor_kwargs(template: nn.Module) -> Dict[str, Any]:
    """The template's saved hyper-parameters that its constructor accepts (LightningCLI adds bookkeeping keys such
    as ``_class_path`` / ``_instantiator`` to ``hparams``)."""
    import inspect

    hp = dict(getattr(template, "hparams", {}))
    params = inspect.signature(type(template).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in hp.items() if not k.startswith("_")}
    return {k: v for k, v in hp.items() if k in params}


def _reset_parameters(module: nn.Module) -> None:
    """Re-initialise every submodule that has ``reset_parameters()``, children before parents, so that a parent's
    own initialisation (e.g. LeNet's Glorot-uniform) has the last word over its layers' defaults."""
    for child in module.children():
        _reset_parameters(child)
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _detached_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that leaves a LightningModule's Trainer behind (it would be deep-copied with it)."""
    trainer = getattr(module, "_trainer", None) if isinstance(module, pl.LightningModule) else None
    if trainer is not None:
        module._trainer = None
    try:
        return copy.deepcopy(module)
    finally:
        if trainer is not None:
            module._trainer = trainer


def _has_parameters(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is not None


def _running_stat_modules(module: nn.Module) -> List[str]:
    """Names of the norm layers that update running statistics in train mode (in place: vmap cannot)."""
    return [name or type(m).__name__ for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _clone_tree(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor detached and cloned (no aliasing of live state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return obj


class ReferenceEnsemble:
    """K reference models of the target's own architecture and recipe, each trained epoch by epoch on its own
    seeded random half of a population dataset.

    **Models.** Each reference is a fresh instance, never a copy of trained weights: ``type(template)(**hparams)``
    for a LightningModule that called ``save_hyperparameters()``; otherwise a deep copy of the template taken at
    construction (before training) whose submodules are re-initialised with ``reset_parameters()``. A network the
    template builds lazily (``build_network(num_classes, input_shape)``, as :class:`~lightning_mia.module.
    ImageClassifier`) is built from the template's ``hparams.num_classes`` / ``hparams.input_shape``. Reference
    ``k``'s initialisation is seeded by ``(seed, k)``; the global RNGs are left untouched (the target's training
    does not change because references train beside it).

    **Recipe.** The optimizer and LR scheduler are the reference's own ``configure_optimizers()`` (an optimizer, or
    ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "epoch" | "step"}}``); a plain
    ``nn.Module`` needs ``optimizer=`` (a function of the module returning the same). While it runs, a
    LightningModule without a Trainer gets a :class:`~lightning_mia.reference.optim.TrainerStandIn` with
    ``max_epochs`` (from :meth:`setup`, else the template's Trainer) so recipes such as ImageClassifier's cosine
    schedule see the real run length. Epoch schedulers step once per :meth:`train_epoch`, step schedulers after
    every optimizer step, ``ReduceLROnPlateau`` (loop path only) with the reference's epoch train loss. The loss
    is the module's ``mia_loss(logits, y)`` (per sample, averaged over the batch) when it has one, else
    cross-entropy; ``training_step`` is never called (it logs, which needs a Trainer). Trainer-level settings
    (gradient clipping, accumulation, precision) are not applied.

    **Epochs.** Reference ``k`` visits its IN set in an order shuffled by ``(seed, k, epoch)``. An epoch has
    ``ceil(L / batch_size)`` steps, ``L`` the largest IN set over all ``count`` references; a reference with a
    smaller IN set (only with a custom ``in_mask``: the default sets all have ``n // 2`` items) cycles through its
    shuffled order to length ``L``. Both paths use exactly these batches (:meth:`epoch_order`), so they train
    identically; with the default mask an epoch is exactly one pass over each IN set.

    **Paths.** ``vectorize="auto"`` takes the vectorised path when the model and recipe allow it, else the loop;
    ``"always"`` raises a ValueError naming what prevents it; ``"never"`` loops. :attr:`vectorized` says which
    path was chosen and :attr:`fallback_reason` why the loop was. The vectorised path needs: no norm layer with
    running statistics (BatchNorm in train mode updates them in place), an optimizer in
    ``ELEMENTWISE_OPTIMIZERS`` (exact type), no ``ReduceLROnPlateau``, every optimised tensor a parameter of the
    module, and a model that runs functionally (one tiny forward/backward is tried at setup). ``stacked_forward``
    (``"auto"``: ``"sequential"`` on CPU, ``"vmap"`` elsewhere) says how its K forward passes run; the resolved
    choice is :attr:`stacked_forward`. Random layers (dropout) run under ``vmap(randomness="different")``:
    independent masks per reference, reproducible per epoch, but not the draws of the loop path.

    **DDP.** ``indices`` selects which of the ``count`` references this instance holds (e.g. ``range(rank, count,
    world)``); seeds, masks and batch orders depend on the global ``k`` only, so the union of the shards is the
    single-process ensemble, and :meth:`logits` returns this instance's ``(len(indices), n, C)``.

    Args:
        template: the target module (LightningModule or ``nn.Module``); its weights are never read.
        count: number of references K in the whole ensemble.
        seed: seeds initialisation, IN masks, batch orders and dropout noise.
        vectorize: ``"auto"``, ``"always"`` or ``"never"`` (see above).
        batch_size: per-reference training batch size (use the target's).
        device: where the references train; ``None`` = the template's device at :meth:`setup` (CPU if it has no
            parameters yet).
        indices: the global reference numbers held here (default: all ``range(count)``).
        optimizer: ``optimizer(module)`` returning what ``configure_optimizers()`` would; replaces the module's own
            recipe (needed for a plain ``nn.Module``).
        stacked_forward: ``"auto"``, ``"vmap"`` or ``"sequential"``: how the vectorised path runs the K forwards.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_mia.module import ImageClassifier
        >>> population = TensorDataset(torch.randn(40, 1, 8, 8), torch.arange(40) % 3, torch.arange(40))
        >>> target = ImageClassifier("lenet", num_classes=3, input_shape=(1, 8, 8), optimizer="adam", lr=1e-3)
        >>> ens = ReferenceEnsemble(target, count=4, seed=0, batch_size=8)
        >>> ens.setup(population)
        >>> ens.vectorized, ens.in_mask.shape
        (True, (4, 40))
        >>> stats = ens.train_epoch(0)
        >>> sorted(stats)
        ['seconds', 'steps', 'train_acc', 'train_loss']
        >>> ens.logits(population, [0, 1, 2]).shape
        torch.Size([4, 3, 3])
    """

    def __init__(
        self,
        template: nn.Module,
        count: int = 8,
        seed: int = 0,
        vectorize: Literal["auto", "always", "never"] = "auto",
        batch_size: int = 64,
        device: Optional[torch.device] = None,
        indices: Optional[Sequence[int]] = None,
        optimizer: Optional[Callable[[nn.Module], Any]] = None,
        stacked_forward: Literal["auto", "vmap", "sequential"] = "auto",
    ) -> None:
        if not isinstance(template, nn.Module):
            raise ValueError(f"template must be a torch.nn.Module, got {type(template).__name__}")
        self.count = check_int("count", count, 1)
        self.seed = check_int("seed", seed, 0)
        self.vectorize = check_choice("vectorize", vectorize, VECTORIZE)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self._stacked_forward_arg = check_choice("stacked_forward", stacked_forward, STACKED_FORWARD)
        self.stacked_forward: str = ""  # resolved at setup
        if indices is None:
            indices = range(self.count)
        held = [check_int("indices[...]", i, 0) for i in indices]
        if not held:
            raise ValueError("indices must name at least one reference")
        if len(set(held)) != len(held) or max(held) >= self.count:
            raise ValueError(f"indices must be distinct integers in [0, {self.count}), got {held}")
        if optimizer is not None and not callable(optimizer):
            raise ValueError(f"optimizer must be a callable optimizer(module) or None, got {type(optimizer).__name__}")
        self.indices: List[int] = held
        self.template = template
        self._device_arg = None if device is None else torch.device(device)
        self._optimizer_factory = optimizer
        # Re-instantiation from hyper-parameters when the template allows it; otherwise a copy taken now,
        # before the template trains (its weights are re-initialised per reference anyway).
        self._from_hparams = isinstance(template, pl.LightningModule) and len(getattr(template, "hparams", {})) > 0
        self._pristine: Optional[nn.Module] = None if self._from_hparams else _detached_copy(template)

        self.vectorized: bool = False
        self.fallback_reason: str = ""
        self.in_mask: Optional[np.ndarray] = None  # (count, N) bool, set at setup
        self.max_epochs: Optional[int] = None
        self.epochs_trained = 0
        self.last_epoch = -1
        self.device = torch.device("cpu")
        self._population: Optional[Dataset] = None
        self._source: Optional[_Source] = None
        self._pending_state: Optional[Mapping[str, Any]] = None
        # loop path
        self._models: List[nn.Module] = []
        self._recipes: List[OptimizerRecipe] = []
        # vectorised path
        self._base: Optional[nn.Module] = None
        self._params: Dict[str, torch.Tensor] = {}
        self._buffers: Dict[str, torch.Tensor] = {}
        self._recipe: Optional[OptimizerRecipe] = None
        self._model_keys: List[str] = []

    # ----------------------------------------------------------------------------------------------------------
    # set-up
    def setup(self, population: Dataset, in_mask: Optional[np.ndarray] = None,
              max_epochs: Optional[int] = None) -> None:
        """Build the references and their optimizers, draw (or take) the IN mask, choose the path.

        Args:
            population: map-style data set of ``(x, y, index)`` items (or ``(x, y)``); positions ``0..N-1``.
            in_mask: ``(count, N)`` bool, which items each reference trains on (all ``count`` rows, also when this
                instance holds only some); default :func:`default_in_mask` with this ensemble's seed. A state
                loaded earlier with :meth:`load_state_dict` supplies its own mask.
            max_epochs: the run length shown to ``configure_optimizers`` as ``trainer.max_epochs``; default: the
                template's Trainer's ``max_epochs`` when it is attached to one, else ``None``.
        """
        if self._population is not None:
            raise RuntimeError("setup() was already called; build a new ReferenceEnsemble for another population")
        self.device = self._device_arg or self._template_device()
        self.stacked_forward = self._stacked_forward_arg
        if self.stacked_forward == "auto":
            self.stacked_forward = "sequential" if self.device.type == "cpu" else "vmap"
        # Reading items (augmentation) and building models must not move the target's random stream.
        with self._rng(_derive(self.seed, _STREAM_NOISE, self.count)):
            self._setup(population, in_mask, max_epochs)

    def _setup(self, population: Dataset, in_mask: Optional[np.ndarray], max_epochs: Optional[int]) -> None:
        self.vectorized, self.fallback_reason, self._models, self._recipes = False, "", [], []
        try:
            n = len(population)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"population must be a map-style data set with __len__, got {type(population).__name__}"
            ) from None
        if n < 2:
            raise ValueError(f"population needs at least 2 items, got {n}")
        item = population[0]
        if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[0], torch.Tensor):
            raise ValueError("population items must be (x, y, index) tuples with x a tensor")
        check_int("max_epochs", max_epochs, 1, allow_none=True)
        pending = self._pending_state
        if pending is not None:
            state_mask = pending["in_mask"].cpu().numpy().astype(bool)
            if in_mask is not None and not np.array_equal(np.asarray(in_mask, dtype=bool), state_mask):
                raise ValueError("in_mask differs from the mask of the state loaded with load_state_dict()")
            in_mask = state_mask
        if in_mask is None:
            self.in_mask = default_in_mask(self.count, n, self.seed)
        else:
            self.in_mask = self._check_mask(in_mask, n)
        if max_epochs is None:
            trainer = getattr(self.template, "_trainer", None)
            max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
            max_epochs = max_epochs if isinstance(max_epochs, int) and max_epochs > 0 else None
        self.max_epochs = max_epochs
        self._source = _Source(population)

        models = [self._make_reference(k) for k in self.indices]
        blockers = self._static_blockers(models[0])
        if self.vectorize != "never" and not blockers:
            blockers = self._try_vectorize(models)
        if self.vectorize == "always" and blockers:
            raise ValueError("vectorize='always' is impossible for this template: " + "; ".join(blockers))
        if self.vectorize == "never":
            blockers = ["vectorize='never'"]
        if self.vectorized:
            del models
        else:
            self.fallback_reason = "; ".join(blockers)
            self._models = models
            self._recipes = [self._configure(m) for m in models]
        self._population = population  # set up: only now (a failed setup may be retried)
        if pending is not None:
            self._pending_state = None
            self._apply_state(pending)

    def _check_mask(self, in_mask: Any, n: int) -> np.ndarray:
        mask = np.asarray(in_mask)
        if mask.shape != (self.count, n):
            raise ValueError(f"in_mask must have shape (count, N) = {(self.count, n)}, got {mask.shape}")
        if mask.dtype != bool:
            if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
                raise ValueError("in_mask must be boolean (or 0/1)")
            mask = mask.astype(bool)
        empty = [k for k in range(self.count) if not mask[k].any()]
        if empty:
            raise ValueError(f"in_mask gives references {empty} no training item")
        return mask.copy()

    def _template_device(self) -> torch.device:
        p = next(iter(self.template.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _rng(self, seed: int) -> Iterator[None]:
        """Seed the CPU generator (and the training device's CUDA generator) for a block, restoring them after:
        the target's random stream must not depend on whether references train beside it. Only the generators
        used are touched (``torch.manual_seed`` would also queue seeds for every CUDA device)."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for d in cuda:
                torch.cuda.default_generators[d].manual_seed(seed)
            yield

    def _make_reference(self, k: int) -> nn.Module:
        with self._rng(_derive(self.seed, _STREAM_INIT, k)):
            if self._from_hparams:
                try:
                    ref = type(self.template)(**_constructor_kwargs(self.template))
                except Exception as err:
                    raise ValueError(
                        f"cannot re-instantiate {type(self.template).__name__}(**hparams) for a reference model "
                        f"({type(err).__name__}: {err}); its save_hyperparameters() must hold the constructor "
                        f"arguments"
                    ) from err
            else:
                assert self._pristine is not None
                ref = copy.deepcopy(self._pristine)
                _reset_parameters(ref)
            if not _has_parameters(ref) and callable(getattr(ref, "build_network", None)):
                hp = getattr(self.template, "hparams", {})
                num_classes, input_shape = hp.get("num_classes"), hp.get("input_shape")
                if num_classes is None or input_shape is None:
                    raise ValueError(
                        "the template builds its network lazily and has no hparams.num_classes/input_shape yet: "
                        "call template.build_network(num_classes, input_shape) (Lightning's setup does) or pass "
                        "them to its constructor before ReferenceEnsemble.setup()"
                    )
                ref.build_network(int(num_classes), tuple(int(s) for s in input_shape))
        if not _has_parameters(ref):
            raise ValueError(f"the reference model {type(ref).__name__} has no parameters to train")
        # the template's floating dtype too (e.g. a Trainer with precision="64-true" converted it)
        dtype = next((p.dtype for p in self.template.parameters() if p.is_floating_point()), None)
        return ref.to(device=self.device, dtype=dtype).train() if dtype is not None else ref.to(self.device).train()

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per reference and epoch: ``ceil(largest IN set / batch_size)`` (after :meth:`setup`)."""
        if self.in_mask is None:
            raise RuntimeError("call setup(population) first")
        return math.ceil(int(self.in_mask.sum(axis=1).max()) / self.batch_size)

    def _configure(self, module: nn.Module) -> OptimizerRecipe:
        if self._optimizer_factory is not None:
            return parse_optimizers(self._optimizer_factory(module))
        configure = getattr(module, "configure_optimizers", None)
        if not callable(configure):
            raise ValueError(
                f"{type(module).__name__} has no configure_optimizers(); pass optimizer=lambda m: "
                f"torch.optim.SGD(m.parameters(), ...) (or a dict with an lr_scheduler)"
            )
        stand_in = isinstance(module, pl.LightningModule) and module._trainer is None
        if stand_in:
            module._trainer = TrainerStandIn(self.max_epochs, self.steps_per_epoch)  # type: ignore[assignment]
        try:
            return parse_optimizers(configure())
        finally:
            if stand_in:
                module._trainer = None

    def _static_blockers(self, model: nn.Module) -> List[str]:
        if self.vectorize == "never":
            return []
        reasons = []
        norms = _running_stat_modules(model)
        if norms:
            shown = ", ".join(norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
            reasons.append(f"the model has norm layers with running statistics ({shown}), which update buffers in "
                           f"place in train mode and vmap cannot batch that")
        recipe = self._configure(model)
        if type(recipe.optimizer) not in ELEMENTWISE_OPTIMIZERS:
            allowed = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            reasons.append(f"optimizer {type(recipe.optimizer).__name__} is not known to be element-wise "
                           f"(vectorised: {allowed})")
        if recipe.plateau:
            reasons.append("ReduceLROnPlateau steps on a metric, which may differ between references")
        return reasons

    def _try_vectorize(self, models: List[nn.Module]) -> List[str]:
        """Stack the models, point reference 0's optimizer at the stacked tensors, dry-run one vmapped step."""
        from torch.func import stack_module_state

        base = models[0]
        recipe = self._configure(base)
        params, buffers = stack_module_state(models)  # new leaves (K, ...), detached from the modules
        name_of = {id(p): name for name, p in base.named_parameters()}
        optimised = set()
        for group in recipe.optimizer.param_groups:
            stacked = []
            for p in group["params"]:
                name = name_of.get(id(p))
                if name is None:
                    return ["the optimizer holds a tensor that is not a parameter of the module"]
                optimised.add(name)
                stacked.append(params[name])
            group["params"] = stacked
        # Same optimizer class, hyper-parameters and scheduler (it holds this optimizer object), fresh state.
        recipe.optimizer.state = defaultdict(dict)
        for name, t in params.items():
            if name not in optimised:
                t.requires_grad_(False)  # frozen in the recipe: no gradient needed
        self._base, self._params, self._buffers, self._recipe = base, params, buffers, recipe
        self._model_keys = list(base.state_dict().keys())
        self._build_vmapped()
        try:
            self._dry_run()
        except Exception as err:  # any vmap failure (in-place buffer update, data-dependent control flow, .item())
            self._base, self._params, self._buffers, self._recipe = None, {}, {}, None
            how = "torch.func.vmap" if self.stacked_forward == "vmap" else "functional_call on stacked parameters"
            return [f"{how} cannot run the model ({type(err).__name__}: {str(err).splitlines()[0][:300]})"]
        self.vectorized = True
        return []

    def _build_vmapped(self) -> None:
        from torch.func import functional_call, vmap

        base = self._base
        assert base is not None
        hook = getattr(base, "mia_loss", None)
        per_sample = hook if callable(hook) else (lambda out, y: F.cross_entropy(out, y, reduction="none"))

        def train_one(p: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            out = functional_call(base, (p, b), (x,))
            return per_sample(out, y).mean(), (out.argmax(-1) == y).sum()

        def logits_one(p: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (x,))

        if self.stacked_forward == "vmap":
            # randomness="different": each reference draws its own dropout masks, as K separate models would
            # (torch.func.vmap docs, "randomness").
            self._vtrain = vmap(train_one, randomness="different")
            self._vlogits = vmap(logits_one, in_dims=(0, 0, None), randomness="different")
            return

        def slices(store: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
            # unbind: one view per reference, and in backward ONE stack of the K gradients per tensor (indexing
            # t[k] K times would materialise K full-size zero-padded gradients)
            views = {n: t.unbind(0) for n, t in store.items()}
            return [{n: v[j] for n, v in views.items()} for j in range(len(self.indices))]

        def train_sequential(p, b, x, y):
            ps, bs = slices(p), slices(b)
            results = [train_one(ps[j], bs[j], x[j], y[j]) for j in range(len(ps))]
            return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

        def logits_sequential(p, b, x):
            ps, bs = slices(p), slices(b)
            return torch.stack([logits_one(ps[j], bs[j], x) for j in range(len(ps))])

        self._vtrain = train_sequential
        self._vlogits = logits_sequential

    def _dry_run(self) -> None:
        assert self._source is not None
        x, y = self._source.get(np.arange(2))
        k = len(self.indices)
        x = self._to_model(x).unsqueeze(0).expand(k, *x.shape)
        y = y.to(self.device).long().unsqueeze(0).expand(k, -1)
        params = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in self._params.items()}
        buffers = {n: t.detach().clone() for n, t in self._buffers.items()}
        with self._rng(0):
            losses, _ = self._vtrain(params, buffers, x, y)
            trainable = [t for t in params.values() if t.requires_grad]
            torch.autograd.grad(losses.sum(), trainable, allow_unused=True)

    # ----------------------------------------------------------------------------------------------------------
    # training
    def _require_setup(self) -> None:
        if self._population is None:
            raise RuntimeError("call setup(population) first")

    def _dtype(self) -> torch.dtype:
        tensors = self._params.values() if self._params else self._models[0].parameters()
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(self._dtype()) if x.is_floating_point() else x

    def epoch_order(self, k: int, epoch: int) -> np.ndarray:
        """Population positions reference ``k`` (global number) trains on in ``epoch``, in order.

        Its IN set shuffled by ``(seed, k, epoch)``, cycled to the largest IN set's size; batch ``s`` is
        ``order[s * batch_size:(s + 1) * batch_size]``.
        """
        self._require_setup()
        assert self.in_mask is not None
        check_int("epoch", epoch, 0)
        if not 0 <= int(k) < self.count:
            raise ValueError(f"k must be in [0, {self.count}), got {k}")
        length = int(self.in_mask.sum(axis=1).max())
        rng = np.random.default_rng([self.seed, _STREAM_ORDER, int(k), int(epoch)])
        return np.resize(rng.permutation(np.flatnonzero(self.in_mask[int(k)])), length)

    def _per_sample_loss(self, model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hook = getattr(model, "mia_loss", None)
        return hook(out, y) if callable(hook) else F.cross_entropy(out, y, reduction="none")

    def train_epoch(self, epoch: Optional[int] = None) -> Dict[str, float]:
        """One epoch of every held reference (see the class docstring); then epoch schedulers step once.

        ``epoch`` (default: the number of epochs trained so far) keys the batch orders and dropout noise, so a run
        resumed from :meth:`state_dict` continues exactly. Returns ``train_loss`` and ``train_acc`` (means over the
        held references of their epoch means, in train mode, as the target logs them), ``steps`` per reference
        and ``seconds``.
        """
        self._require_setup()
        epoch = self.epochs_trained if epoch is None else check_int("epoch", epoch, 0)
        start = time.perf_counter()
        steps = self.steps_per_epoch
        orders = np.stack([self.epoch_order(k, epoch) for k in self.indices])
        if self.vectorized:
            loss_sum, correct = self._train_vectorized(orders, steps, epoch)
        else:
            loss_sum, correct = self._train_looped(orders, steps, epoch)
        seen = float(orders.shape[1])
        self.epochs_trained += 1
        self.last_epoch = epoch
        return {
            "train_loss": float((loss_sum / seen).mean()),
            "train_acc": float((correct / seen).mean()),
            "steps": float(steps),
            "seconds": time.perf_counter() - start,
        }

    def _batch(self, positions: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        assert self._source is not None
        x, y = self._source.get(positions)
        return self._to_model(x), y.to(self.device, non_blocking=True).long()

    def _train_vectorized(self, orders: np.ndarray, steps: int, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        assert self._base is not None and self._recipe is not None
        k, bs = orders.shape[0], self.batch_size
        opt, recipe = self._recipe.optimizer, self._recipe
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        correct = torch.zeros(k, dtype=torch.float64, device=self.device)
        self._base.train()
        with self._rng(_derive(self.seed, _STREAM_NOISE_VMAP, epoch, *self.indices)):
            for s in range(steps):
                pos = orders[:, s * bs:(s + 1) * bs]
                x, y = self._batch(pos)
                x = x.view(k, pos.shape[1], *x.shape[1:])
                y = y.view(k, pos.shape[1])
                losses, hits = self._vtrain(self._params, self._buffers, x, y)
                opt.zero_grad(set_to_none=True)
                # The K losses depend on disjoint parameter slices: d(sum)/d(theta_k) = d(loss_k)/d(theta_k).
                losses.sum().backward()
                opt.step()
                if recipe.scheduler is not None and recipe.interval == "step":
                    recipe.scheduler.step()
                loss_sum += losses.detach().double() * pos.shape[1]
                correct += hits.double()
        if recipe.scheduler is not None and recipe.interval == "epoch":
            recipe.scheduler.step()
        return loss_sum.cpu().numpy(), correct.cpu().numpy()

    def _train_looped(self, orders: np.ndarray, steps: int, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        bs = self.batch_size
        loss_sum = np.zeros(len(self.indices))
        correct = np.zeros(len(self.indices))
        for j, (k, model, recipe) in enumerate(zip(self.indices, self._models, self._recipes)):
            opt = recipe.optimizer
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            hits = torch.zeros((), dtype=torch.float64, device=self.device)
            model.train()
            with self._rng(_derive(self.seed, _STREAM_NOISE, k, epoch)):
                for s in range(steps):
                    pos = orders[j, s * bs:(s + 1) * bs]
                    x, y = self._batch(pos)
                    out = model(x)
                    loss = self._per_sample_loss(model, out, y).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if recipe.scheduler is not None and recipe.interval == "step" and not recipe.plateau:
                        recipe.scheduler.step()
                    total += loss.detach().double() * len(pos)
                    hits += (out.detach().argmax(-1) == y).sum().double()
            loss_sum[j], correct[j] = float(total), float(hits)
            if recipe.scheduler is not None:
                if recipe.plateau:
                    recipe.scheduler.step(loss_sum[j] / orders.shape[1])
                elif recipe.interval == "epoch":
                    recipe.scheduler.step()
        return loss_sum, correct

    # ----------------------------------------------------------------------------------------------------------
    # inference
    @torch.no_grad()
    def logits(self, dataset: Dataset, positions: Sequence[int], batch_size: int = 512) -> torch.Tensor:
        """Logits of every held reference on ``dataset[positions]``: ``(len(indices), n, C)`` float32 on the CPU,
        computed in eval mode without gradients (the modules' train/eval mode is restored afterwards)."""
        self._require_setup()
        check_int("batch_size", batch_size, 1)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        source = _Source(dataset)
        modules = [self._base] if self.vectorized else self._models
        modes = [m.training for m in modules]  # type: ignore[union-attr]
        for m in modules:
            m.eval()  # type: ignore[union-attr]
        try:
            # a data set that draws random numbers must not move the target's random stream
            with self._rng(_derive(self.seed, _STREAM_NOISE, self.count + 1)):
                chunks = self._logit_chunks(source, pos, batch_size)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)  # type: ignore[union-attr]
        if not chunks:  # no positions: (K, 0, C), C from one forward
            return self.logits(dataset, [0], batch_size)[:, :0]
        return torch.cat(chunks, dim=1)

    def _logit_chunks(self, source: _Source, pos: np.ndarray, batch_size: int) -> List[torch.Tensor]:
        chunks: List[torch.Tensor] = []
        for start in range(0, len(pos), batch_size):
            x, _ = source.get(pos[start:start + batch_size])
            x = self._to_model(x)
            if self.vectorized:
                out = self._vlogits(self._params, self._buffers, x)
            else:
                out = torch.stack([m(x) for m in self._models])
            chunks.append(out.float().cpu())
        return chunks

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume, as tensors and plain Python types (``torch.load(weights_only=True)`` loads
        it). Per held reference ``k``: ``model`` (its ``state_dict()``), ``optimizer`` and ``scheduler`` state in the
        layout of an ordinary per-model optimizer, whichever path trained it; plus ``in_mask`` ``(count, N)`` bool,
        ``seed``, ``count``, ``batch_size``, ``indices``, ``epochs_trained``, ``last_epoch``, ``max_epochs``."""
        self._require_setup()
        assert self.in_mask is not None
        references = []
        if self.vectorized:
            assert self._recipe is not None and self._base is not None
            opt_states = split_optimizer_state(self._recipe.optimizer, len(self.indices))
            sched = self._recipe.scheduler
            sched_state = _clone_tree(sched.state_dict()) if sched is not None else None
            base_state = self._base.state_dict()
            for j, k in enumerate(self.indices):
                model = {}
                for name in self._model_keys:
                    src = self._params.get(name, self._buffers.get(name))
                    model[name] = src[j].detach().clone() if src is not None else _clone_tree(base_state[name])
                references.append({"k": k, "model": model, "optimizer": _clone_tree(opt_states[j]),
                                   "scheduler": _clone_tree(sched_state)})
        else:
            for k, model, recipe in zip(self.indices, self._models, self._recipes):
                references.append({
                    "k": k,
                    "model": _clone_tree(dict(model.state_dict())),
                    "optimizer": _clone_tree(recipe.optimizer.state_dict()),
                    "scheduler": _clone_tree(recipe.scheduler.state_dict()) if recipe.scheduler is not None else None,
                })
        return {
            "format": STATE_FORMAT,
            "count": self.count,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "indices": list(self.indices),
            "epochs_trained": self.epochs_trained,
            "last_epoch": self.last_epoch,
            "max_epochs": self.max_epochs,
            "vectorized": self.vectorized,
            "in_mask": torch.from_numpy(self.in_mask.copy()),
            "references": references,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (of either path; it may hold more references than this instance, e.g.
        the merged shards of all ranks). Before :meth:`setup` it is kept and applied there (its ``in_mask`` is then
        the one used); the ensemble's ``seed`` and ``batch_size`` become the state's."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a ReferenceEnsemble state (expected format {STATE_FORMAT!r})")
        if int(state["count"]) != self.count:
            raise ValueError(f"the state has count={state['count']} references, this ensemble count={self.count}")
        have = {int(r["k"]) for r in state["references"]}
        missing = [k for k in self.indices if k not in have]
        if missing:
            raise ValueError(f"the state lacks references {missing} held by this ensemble (it has {sorted(have)})")
        self.seed = int(state["seed"])
        self.batch_size = int(state["batch_size"])
        if self._population is None:
            self._pending_state = state
            return
        self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self._population is not None
        mask = state["in_mask"].cpu().numpy().astype(bool)
        self.in_mask = self._check_mask(mask, len(self._population))  # type: ignore[arg-type]
        by_k = {int(r["k"]): r for r in state["references"]}
        entries = [by_k[k] for k in self.indices]
        if self.vectorized:
            assert self._recipe is not None
            with torch.no_grad():
                for store in (self._params, self._buffers):
                    for name, t in store.items():
                        if name in entries[0]["model"]:
                            t.copy_(torch.stack([torch.as_tensor(e["model"][name]) for e in entries]).to(t))
            self._recipe.optimizer.load_state_dict(
                merge_optimizer_state(self._recipe.optimizer, [e["optimizer"] for e in entries]))
            if self._recipe.scheduler is not None and entries[0]["scheduler"] is not None:
                self._recipe.scheduler.load_state_dict(entries[0]["scheduler"])
        else:
            for e, model, recipe in zip(entries, self._models, self._recipes):
                model.load_state_dict(e["model"])
                # Optimizer.load_state_dict keeps same-device, same-dtype tensors as they are: clone, or training
                # would mutate the caller's state in place.
                recipe.optimizer.load_state_dict(_clone_tree(e["optimizer"]))
                if recipe.scheduler is not None and e["scheduler"] is not None:
                    recipe.scheduler.load_state_dict(e["scheduler"])
        self.epochs_trained = int(state["epochs_trained"])
        self.last_epoch = int(state["last_epoch"])

    def __repr__(self) -> str:
        path = "unset" if self._population is None else ("vectorised" if self.vectorized else "looped")
        return (f"{type(self).__name__}({type(self.template).__name__}, count={self.count}, held={len(self.indices)}, "
                f"seed={self.seed}, batch_size={self.batch_size}, path={path}, epochs_trained={self.epochs_trained})")
