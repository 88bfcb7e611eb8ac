"""Attack-evaluation protocols as typed, frozen objects: how attacks are fitted and scored on an audit pool.

The monitor takes ``protocol=`` one of these. Each is validated once at construction (LightningCLI checks the
``Literal`` choices at parse time and lists them in ``--help``) and evaluates one attack on one feature of a
:class:`~lightning_mia.membership.MembershipData`. A new protocol is one new subclass of
:class:`AttackProtocol`; nothing else needs to change. In YAML::

    mia:
      protocol:
        class_path: lightning_mia.protocols.StandardProtocol
        init_args: {repeats: 5, fit_per_slice: true}

A plain name (``protocol: paper``) still names a protocol with its defaults (:func:`build_protocol`).

Example:
    >>> import numpy as np
    >>> from lightning_mia.membership import MembershipData
    >>> from lightning_mia.registry import Spec
    >>> rng = np.random.default_rng(0)
    >>> member = rng.random(400) < 0.5
    >>> data = MembershipData({"loss": rng.normal(size=400) - member}, member, np.ones(400, bool), np.zeros(400))
    >>> res = StandardProtocol(repeats=2, slices=["all"]).evaluate(data, "loss", Spec("threshold", "threshold"))
    >>> 0.6 < res.rows[0]["balanced_accuracy"] < 0.8
    True
    >>> StandardProtocol(balance="sometimes")
    Traceback (most recent call last):
    ...
    ValueError: balance must be one of ['undersample', 'oversample', 'class_weight', 'none'], got 'sometimes'
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Union

from lightning_mia.attacks.protocol import BALANCE_MODES, check_split_options
from lightning_mia.layout import SLICES
from lightning_mia.membership import MembershipData
from lightning_mia.registry import Spec
from lightning_mia.validation import check_bool, check_choice, check_int

BalanceMode = Literal["undersample", "oversample", "class_weight", "none"]
SliceName = Literal["all", "correct", "misclassified"]
PaperSampling = Literal["none", "undersampling", "oversampling"]


class AttackProtocol:
    """Base class: a frozen, validated set of options plus :meth:`evaluate`.

    Subclasses set ``name`` (what ``protocol: NAME`` in YAML means), validate and store their options in
    ``__init__`` (then call ``self._freeze()``) and implement :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    _frozen = False

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, key: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is frozen: build a new one instead of setting {key!r}")
        object.__setattr__(self, key, value)

    def options(self) -> Dict[str, Any]:
        """The constructor arguments (what ``__repr__`` and the run's hyper-parameters show)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))

    #: The slices this protocol reports (in the order of its rows).
    slices: Tuple[str, ...] = SLICES

    def with_seed(self, seed: int) -> "AttackProtocol":
        """This protocol with ``seed`` filled in where it was left ``None`` (the monitor's seed)."""
        if getattr(self, "seed", 0) is not None:
            return self
        return type(self)(**{**self.options(), "seed": int(seed)})

    def skip_reason(self, attack: Spec, width: int) -> Optional[str]:
        """Why ``attack`` cannot run on a ``width``-column feature under this protocol (``None``: it can)."""
        from lightning_mia.attacks import ATTACKS

        if getattr(ATTACKS[attack.name], "requires_1d", False) and width != 1 and "column" not in attack.options:
            return f"needs a 1-D feature, this one has {width} dims"
        return None

    def evaluate(self, data: MembershipData, feature: str, attack: Spec, kind: Optional[str] = None) -> Any:
        """Fit and score ``attack`` on ``data.features[feature]``; returns a
        :class:`~lightning_mia.attacks.protocol.ProtocolResult`. ``kind`` is the feature's registered name."""
        raise NotImplementedError


class StandardProtocol(AttackProtocol):
    """Repeated stratified splits (:func:`lightning_mia.attacks.protocol.evaluate`).

    Args:
        repeats: seeded attack-train/evaluation splits; metrics are their mean, ``*_std`` their std.
        eval_fraction: share of the pool the attack is scored on (the attacker knows the rest's membership).
        balance: attack training-set balancing.
        slices: subsets reported (``all``, ``correct``, ``misclassified``).
        fit_per_slice: fit separate attacks on each slice (as the paper's tables do).
        per_class: fit one attack per true class.
        eval_ratios: also score each attack with the evaluation set resampled to these member:non-member ratios.
        seed: seeds every split and attack; ``None`` = the monitor's ``seed``.
        folds: k-fold cross-fitting instead of the ``eval_fraction`` hold-out: every pool sample is scored by an
            attack not fitted on it, so TPR at low FPR uses every non-member (``None``: hold-out splits).
        confidence: of the 95% intervals of TPR at low FPR and of the empirical epsilon lower bound.
        delta: the delta of the epsilon lower bound (``eps >= log((TPR - delta) / FPR)``).

    Example:
        >>> StandardProtocol(repeats=5).slices
        ('all', 'correct', 'misclassified')
    """

    name = "standard"

    def __init__(
        self,
        repeats: int = 3,
        eval_fraction: float = 0.2,
        balance: BalanceMode = "undersample",
        slices: Sequence[SliceName] = SLICES,
        fit_per_slice: bool = False,
        per_class: bool = False,
        eval_ratios: Sequence[float] = (),
        seed: Optional[int] = None,
        folds: Optional[int] = None,
        confidence: float = 0.95,
        delta: float = 0.0,
    ) -> None:
        slices, ratios = check_split_options(eval_fraction, repeats, slices, eval_ratios)
        self.repeats, self.eval_fraction = int(repeats), float(eval_fraction)
        self.balance = check_choice("balance", balance, BALANCE_MODES)
        self.slices = slices
        self.fit_per_slice = check_bool("fit_per_slice", fit_per_slice)
        self.per_class = check_bool("per_class", per_class)
        self.eval_ratios = list(ratios)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.folds = check_int("folds", folds, 2, allow_none=True)
        self.confidence, self.delta = check_bound_options(confidence, delta)
        self._freeze()

    def evaluate(self, data: MembershipData, feature: str, attack: Spec, kind: Optional[str] = None) -> Any:
        from lightning_mia.attacks.protocol import evaluate

        opts = self.options()
        opts["seed"] = 0 if opts["seed"] is None else opts["seed"]
        return evaluate(data.features[feature], data.is_member, data.correct, data.label,
                        {"name": attack.name, **attack.options}, **opts)


def check_bound_options(confidence: Any, delta: Any) -> Tuple[float, float]:
    """``confidence`` in (0, 1) and ``delta`` in [0, 1), as floats."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
    return float(confidence), float(delta)


class PaperProtocol(AttackProtocol):
    """The authors' per-class protocol (:func:`lightning_mia.attacks.paper.evaluate_paper`).

    One attack per true class, trained on the first ``attacker_knowledge`` of each side in dataset order, metrics
    averaged over classes; the attack settings follow the feature (confidence, intermediate, distance, gradient)
    and the attacks are the paper's (``mlp``, ``random_forest``, ``xgboost``, ``logistic_regression``: the
    threshold attack is not part of it and is skipped).

    Args:
        sampling: balancing of the attack training rows, as the authors' ``--sampling``.
        attacker_knowledge: share of each side the attacker trains on (the authors' 0.8).
        seed: seeds the attack models and searches; ``None`` = the monitor's ``seed``.

    Example:
        >>> PaperProtocol().slices
        ('all', 'correct', 'misclassified')
    """

    name = "paper"

    def __init__(self, sampling: PaperSampling = "none", attacker_knowledge: float = 0.8,
                 seed: Optional[int] = None) -> None:
        self.sampling = check_choice("sampling", sampling, ("none", "undersampling", "oversampling"))
        if isinstance(attacker_knowledge, bool) or not isinstance(attacker_knowledge, (int, float)) or not (
                0.1 <= attacker_knowledge <= 0.9):
            raise ValueError(f"attacker_knowledge must be in [0.1, 0.9] (as in the authors' code), got "
                             f"{attacker_knowledge!r}")
        self.attacker_knowledge = float(attacker_knowledge)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self._freeze()

    def skip_reason(self, attack: Spec, width: int) -> Optional[str]:
        from lightning_mia.attacks.paper import PAPER_ATTACKS

        if attack.name not in PAPER_ATTACKS:
            return f"not an attack of the paper protocol {PAPER_ATTACKS}"
        return super().skip_reason(attack, width)

    def evaluate(self, data: MembershipData, feature: str, attack: Spec, kind: Optional[str] = None) -> Any:
        from lightning_mia.attacks.paper import evaluate_paper, preset_for_feature

        return evaluate_paper(data.features[feature], data.is_member, data.correct, data.label,
                              preset=preset_for_feature(kind or feature), attack=attack.name,
                              attack_options=dict(attack.options) or None, sampling=self.sampling,
                              attacker_knowledge=self.attacker_knowledge,
                              seed=0 if self.seed is None else self.seed)


#: ``protocol: NAME`` in YAML / Python -> the protocol class (built with its defaults).
PROTOCOLS: Dict[str, type] = {"standard": StandardProtocol, "paper": PaperProtocol}


def build_protocol(protocol: Union[str, AttackProtocol, None]) -> AttackProtocol:
    """An :class:`AttackProtocol` from an instance or a name (``standard``, ``paper``, or a subclass's ``name``)."""
    if protocol is None:
        return StandardProtocol()
    if isinstance(protocol, AttackProtocol):
        return protocol
    if isinstance(protocol, str):
        known = {**PROTOCOLS, **{c.name: c for c in _subclasses(AttackProtocol) if c.name}}
        if protocol not in known:
            raise ValueError(f"protocol must be one of {sorted(known)} or an AttackProtocol, got {protocol!r}")
        return known[protocol]()
    raise TypeError(f"protocol must be a name or an AttackProtocol, got {type(protocol).__name__}")


def _subclasses(cls: type) -> List[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub] + _subclasses(sub)
    return out
