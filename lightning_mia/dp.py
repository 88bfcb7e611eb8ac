"""DP-SGD training with Opacus: :class:`DPConfig` (the options) and :class:`DPSGD` (the machinery of one run).

:class:`~lightning_mia.module.ImageClassifier` takes ``dp=DPConfig(...)`` (in YAML ``model.init_args.dp``) and
then trains with DP-SGD (Abadi et al., CCS 2016, arXiv:1607.00133): per-sample gradients clipped to
``max_grad_norm``, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` added to their sum,
batches drawn by Poisson sampling, and the privacy spent tracked by an Opacus accountant (RDP or PRV) and logged
as ``privacy/epsilon`` once per epoch. In YAML::

    model:
      class_path: lightning_mia.module.ImageClassifier
      init_args:
        model: lenet
        dp: {noise_multiplier: 1.0, max_grad_norm: 1.0}

Opacus (``pip install opacus``, or the ``dp`` extra: ``pip install 'lightning-mia[dp]'``) is imported only when
DP training starts (or ``fix_modules`` rewrites a network); this module, the options and loading a DP checkpoint
for inference work without it.

The pieces are Opacus's own, assembled as its ``PrivacyEngine.make_private`` assembles them (opacus 1.5 and 1.6,
``opacus/privacy_engine.py``): a ``GradSampleModule``'s hooks for the per-sample gradients, a ``DPOptimizer``
around the configured optimizer (``expected_batch_size = int(N * sample_rate)``), ``sample_rate = 1 /
len(train_loader)``, a ``DPDataLoader`` for Poisson sampling and the accountant fed by an optimizer step hook.
They are assembled by hand rather than through ``make_private`` because Lightning, not the module, owns the train
loader (so the datamodule asks the module for the Poisson loader, see
:meth:`~lightning_mia.module.ImageClassifier.prepare_train_dataloader`) and because the hooks are attached
only around each optimizer step: outside training steps the network is a plain module, so the monitor's
``torch.func`` feature extraction never meets Opacus's backward hooks, and checkpoints keep their plain keys.

Example:
    >>> cfg = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0)
    >>> cfg.accountant, cfg.poisson_sampling, cfg.resolve_delta(10_000)
    ('rdp', True, 1e-05)
    >>> DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="moments")
    Traceback (most recent call last):
    ...
    ValueError: accountant must be one of ['rdp', 'prv'], got 'moments'
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_mia.validation import check_bool, check_choice, coerce_config

__all__ = ["ACCOUNTANTS", "DPConfig", "DPSGD", "check_dp_compatible", "require_opacus"]

ACCOUNTANTS = ("rdp", "prv")
INSTALL_HINT = "pip install opacus (or the dp extra: pip install 'lightning-mia[dp]')"


def require_opacus() -> Any:
    """Import and return ``opacus``, or raise an ImportError that says how to install it."""
    try:
        import opacus
    except ImportError as err:
        raise ImportError(f"DP-SGD training (ImageClassifier(dp=...)) needs Opacus: {INSTALL_HINT}") from err
    return opacus


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD options of :class:`~lightning_mia.module.ImageClassifier` (``dp=``), validated at construction.

    Args:
        noise_multiplier: sigma, the noise standard deviation in units of ``max_grad_norm`` (>= 0; 0 = clipping
            only, epsilon infinite).
        max_grad_norm: C, the L2 norm every per-sample gradient is clipped to (> 0).
        poisson_sampling: draw each batch by including every training sample independently with probability
            ``1 / len(train_loader)`` (Opacus's ``DPDataLoader``), the sampling the accountants assume.
            ``False`` keeps the datamodule's shuffled fixed-size batches and accounts them as if they were Poisson
            samples, as Opacus does with ``poisson_sampling=False`` (an approximation, not a guarantee).
        accountant: ``rdp`` (Renyi DP of the subsampled Gaussian, Mironov et al. 2019, arXiv:1908.10530) or
            ``prv`` (privacy random variables, Gopi et al. 2021, arXiv:2106.02848; tighter, slower).
        delta: the delta of the reported (epsilon, delta); ``None`` = ``1 / (10 N)`` with N the training-set
            size (a delta must stay well below 1/N: a mechanism that publishes one random record is (0, 1/N)-DP;
            for N = 10,000 this is 1e-5, the delta Abadi et al. used for MNIST).
        secure_mode: Opacus's cryptographically safe noise and sampling (needs the ``torchcsprng`` package).
        fix_modules: replace layers Opacus cannot train privately (BatchNorm -> GroupNorm, ...) with
            ``opacus.validators.ModuleValidator.fix`` when the network is built; ``False`` = such a network is
            an error that names them.

    Example:
        >>> DPConfig(noise_multiplier=0.8, max_grad_norm=1.0, accountant="prv").to_dict()["accountant"]
        'prv'
        >>> DPConfig.coerce({"noise_multiplier": 1.0, "max_grad_norm": 0.5}).max_grad_norm
        0.5
    """

    noise_multiplier: float
    max_grad_norm: float
    poisson_sampling: bool = True
    accountant: Literal["rdp", "prv"] = "rdp"
    delta: Optional[float] = None
    secure_mode: bool = False
    fix_modules: bool = False

    def __post_init__(self) -> None:
        for name, minimum, strict in (("noise_multiplier", 0.0, False), ("max_grad_norm", 0.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= minimum if strict else value < minimum):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_bool("poisson_sampling", self.poisson_sampling)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        if self.delta is not None:
            if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
                raise ValueError(f"delta must be a number in (0, 1) or None (= 1/(10 N)), got {self.delta!r}")
            object.__setattr__(self, "delta", float(self.delta))
        check_bool("secure_mode", self.secure_mode)
        check_bool("fix_modules", self.fix_modules)

    @classmethod
    def coerce(cls, value: Union["DPConfig", Mapping[str, Any], None]) -> Optional["DPConfig"]:
        """``None``, a :class:`DPConfig`, or a mapping of its fields (what checkpoints store) -> a DPConfig or None."""
        return coerce_config(cls, value, "DP", "{'noise_multiplier': 1.0, 'max_grad_norm': 1.0}")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain types (what the module's hyper-parameters and checkpoints hold)."""
        return dataclasses.asdict(self)

    def resolve_delta(self, n_train: int) -> float:
        """``delta``, or ``1 / (10 n_train)`` when it was left ``None``."""
        if self.delta is not None:
            return self.delta
        if n_train < 1:
            raise ValueError(f"the training set is empty (n_train={n_train}): no default delta")
        return 1.0 / (10.0 * n_train)


def check_dp_compatible(net: nn.Module, fix: bool = False) -> nn.Module:
    """``net`` if DP-SGD can train it; with ``fix`` the network Opacus's ``ModuleValidator.fix`` makes of it
    (BatchNorm -> GroupNorm, ...); otherwise a ValueError that names the layers and the ways out.

    BatchNorm is refused without Opacus installed (so a DP checkpoint loads for inference anywhere); Opacus's own
    validator runs too when Opacus is there (and again when training starts).

    Example:
        >>> check_dp_compatible(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        Traceback (most recent call last):
        ...
        ValueError: DP-SGD cannot train this network: BatchNorm layer(s) ['1']. Use a model without BatchNorm ...
        >>> type(check_dp_compatible(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), fix=True)[1]).__name__
        'GroupNorm'
    """
    if fix:
        require_opacus()
        from opacus.validators import ModuleValidator

        fixed = ModuleValidator.fix(net)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if remaining:
            raise ValueError(f"DP-SGD cannot train this network even after ModuleValidator.fix: "
                             f"{'; '.join(str(e) for e in remaining)}")
        return fixed
    # BatchNorm mixes the samples of a batch, so a sample's gradient depends on the others and per-sample
    # clipping bounds nothing (Opacus FAQ, "What is the problem with BatchNorm?").
    problems = [f"BatchNorm layer(s) {[n for n, m in net.named_modules() if isinstance(m, _BATCHNORM)]}"] if any(
        isinstance(m, _BATCHNORM) for m in net.modules()) else []
    if importlib.util.find_spec("opacus") is not None and not problems:
        from opacus.validators import ModuleValidator

        problems = [str(e) for e in ModuleValidator.validate(net, strict=False)]
    if problems:
        raise ValueError(
            f"DP-SGD cannot train this network: {'; '.join(problems)}. Use a model without BatchNorm (model: "
            f"lenet), or set dp.fix_modules: true to swap BatchNorm for GroupNorm with "
            f"opacus.validators.ModuleValidator.fix (or build the network with GroupNorm yourself)")
    return net


_BATCHNORM = nn.modules.batchnorm._BatchNorm


class DPSGD:
    """The DP-SGD machinery of one training run: per-sample-gradient hooks, the ``DPOptimizer``, the accountant.

    :class:`~lightning_mia.module.ImageClassifier` drives it; it is usable with any training loop:

    1. ``loader = dpsgd.poisson_loader(loader)`` (when ``poisson_sampling``),
    2. ``optimizer = dpsgd.attach(net, optimizer, loader)``,
    3. each step inside ``with dpsgd.per_sample_gradients(): optimizer.zero_grad(); loss.backward(); optimizer.step()``,
    4. ``dpsgd.epsilon()`` whenever wanted; ``state_dict()`` / ``load_state_dict()`` carry the accountant across a
       resume (plain lists and floats: ``torch.load(weights_only=True)`` reads them).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> dpsgd = DPSGD(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
        >>> net = nn.Linear(4, 2)
        >>> loader = dpsgd.poisson_loader(DataLoader(data, batch_size=8))
        >>> opt = dpsgd.attach(net, torch.optim.SGD(net.parameters(), lr=0.1), loader)
        >>> for x, y in loader:
        ...     with dpsgd.per_sample_gradients():
        ...         opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward(); opt.step()
        >>> dpsgd.sample_rate, dpsgd.steps, round(dpsgd.epsilon(1e-5), 2)
        (0.25, 4, 4.87)
    """

    def __init__(self, config: Union[DPConfig, Mapping[str, Any]]) -> None:
        cfg = DPConfig.coerce(config)
        if cfg is None:
            raise ValueError("DPSGD needs a DPConfig")
        require_opacus()
        from opacus.accountants import create_accountant

        self.config = cfg
        self.accountant = create_accountant(mechanism=cfg.accountant)
        self.secure_rng: Optional[torch.Generator] = None
        if cfg.secure_mode:
            # The same generator PrivacyEngine(secure_mode=True) builds (opacus/privacy_engine.py).
            try:
                import torchcsprng as csprng
            except ImportError as err:
                raise ImportError("dp.secure_mode needs the torchcsprng package (github.com/pytorch/csprng)") from err
            self.secure_rng = csprng.create_random_device_generator("/dev/urandom")
        self.sample_rate: Optional[float] = None
        self.delta: Optional[float] = None
        self.n_train: Optional[int] = None
        self.optimizer: Optional[Any] = None
        self._grad_sampler: Optional[Any] = None

    # --- setting up ------------------------------------------------------------------------------------
    def poisson_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        """``loader`` as an Opacus ``DPDataLoader``: Poisson sampling at rate ``1 / len(loader)`` (so the mean batch
        size stays the loader's), same dataset, workers and collate. Its sampler draws from ``loader.generator``
        (the datamodule's seeded one); after a resume from a generator seeded with that seed and the steps taken;
        with ``secure_mode`` from the secure generator."""
        from opacus.data_loader import DPDataLoader

        if isinstance(loader, DPDataLoader):
            return loader
        generator = self.secure_rng
        if generator is None and self.steps > 0 and loader.generator is not None:
            # A resumed run (the accountant already counts steps): the datamodule's generator starts again from its
            # seed, which would replay the first epochs' batches; the accountant assumes fresh, independent draws.
            seed = np.random.SeedSequence([int(loader.generator.initial_seed()), self.steps]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
        if generator is not None:
            return DPDataLoader.from_data_loader(loader, generator=generator)
        return DPDataLoader.from_data_loader(loader)

    def attach(self, net: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> Any:
        """Wrap ``optimizer`` in an Opacus ``DPOptimizer`` for ``net`` trained on ``loader`` (the loader the training
        loop iterates: a ``DPDataLoader`` when ``poisson_sampling``) and attach the accountant to its steps."""
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        cfg = self.config
        if isinstance(loader, DPDataLoader):
            sample_rate = float(loader.sample_rate)
        elif cfg.poisson_sampling:
            raise ValueError(
                "dp.poisson_sampling is on but the training loader is a plain DataLoader: let the datamodule hand "
                "its loader to the module (lightning_mia datamodules call model.prepare_train_dataloader(loader) in "
                "train_dataloader; a datamodule of your own can do the same, or return "
                "opacus.data_loader.DPDataLoader.from_data_loader(loader)), or set dp.poisson_sampling: false")
        else:
            if len(loader) < 1:
                raise ValueError("the training loader is empty")
            sample_rate = 1.0 / len(loader)  # what make_private uses without Poisson sampling
        n_train = len(loader.dataset)
        # PrivacyEngine.make_private: expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        expected_batch_size = max(1, int(n_train * sample_rate))
        if self._grad_sampler is not None:
            self._grad_sampler.remove_hooks()
        # Opacus's hooks go on net's own layers; the wrapper is kept out of the module tree (state_dict keys stay
        # the plain network's) and the hooks are removed again until the first step (per_sample_gradients).
        self._grad_sampler = GradSampleModule(net, batch_first=True, loss_reduction="mean", strict=True)
        self._grad_sampler.remove_hooks()
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=cfg.noise_multiplier,
                                   max_grad_norm=cfg.max_grad_norm, expected_batch_size=expected_batch_size,
                                   loss_reduction="mean", generator=self.secure_rng, secure_mode=cfg.secure_mode)
        dp_optimizer.attach_step_hook(self._account_step)
        self.sample_rate, self.n_train = sample_rate, n_train
        self.delta = cfg.resolve_delta(n_train)
        self.optimizer = dp_optimizer
        return dp_optimizer

    def _account_step(self, optimizer: Any) -> None:
        # called by DPOptimizer.pre_step after the noise was added, i.e. once per private step taken
        self.accountant.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=float(self.sample_rate))

    @contextlib.contextmanager
    def per_sample_gradients(self) -> Iterator[None]:
        """Opacus's per-sample-gradient hooks on the network for the ``with`` block (one forward, backward, step)."""
        if self._grad_sampler is None:
            raise RuntimeError("DPSGD.attach() must run before the first training step")
        self._grad_sampler.add_hooks(loss_reduction="mean", batch_first=True)
        try:
            with warnings.catch_warnings():
                # PyTorch warns when a full backward hook sits on the first layer (its input needs no gradient);
                # Opacus only needs the gradient with respect to the layer's output there.
                warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
                yield
        finally:
            self._grad_sampler.remove_hooks()

    # --- the privacy spent -----------------------------------------------------------------------------
    @property
    def history(self) -> List[List[float]]:
        """The accountant's history, ``[[noise_multiplier, sample_rate, steps], ...]``."""
        return [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]

    @property
    def steps(self) -> int:
        """Private optimizer steps taken (over every resumed segment of the run)."""
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self, delta: Optional[float] = None) -> float:
        """The accountant's epsilon at ``delta`` (default: the resolved ``config.delta``); 0 before any step."""
        if delta is None:
            delta = self.delta if self.delta is not None else self.config.delta
        if delta is None:
            raise ValueError("delta is not known before attach() (it defaults to 1/(10 N)): pass one")
        if self.steps == 0:
            return 0.0
        if any(s == 0 for s, _, _ in self.accountant.history):
            return math.inf  # no noise: no finite epsilon (the accountants would divide by zero)
        return float(self.accountant.get_epsilon(delta=float(delta)))

    def state_dict(self) -> Dict[str, Any]:
        """Plain types only: the accountant's mechanism and history, the sample rate and delta."""
        return {"accountant": self.config.accountant, "history": self.history, "sample_rate": self.sample_rate,
                "delta": self.delta, "n_train": self.n_train}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the accounting of a saved run (any mechanism's history: they share one format). The saved sample
        rate and delta stand until :meth:`attach` sets those of the run that continues."""
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]
        for key in ("sample_rate", "delta", "n_train"):
            if state.get(key) is not None:
                setattr(self, key, state[key])
