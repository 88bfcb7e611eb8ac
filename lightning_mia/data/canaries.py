"""Canaries for one-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846): :class:`CanaryConfig` and the seeded draw :func:`draw_canaries`.

``m`` candidate samples are drawn from the training split; each one is included in the training set by an
independent fair coin, the rest of the training split is always trained on. After training, an attack scores
the ``m`` candidates and the audit counts how well the scores guess the coins (``lightning_mia.bounds.one_run_audit``).
The guarantee of the audit needs only that the coins are fair, independent and unknown to whatever produces
the scores.

A datamodule offers one-run auditing by two methods (``MIADataModule`` has both when ``canaries`` is set):

- ``canary_dataset()``: the ``m`` candidates, items ``(x, y, index)``, without augmentation, in a fixed order;
- ``canary_inclusion()``: a bool numpy array of length ``m`` in that order, True = trained on.

and its training data must hold exactly the included candidates (besides its ordinary samples).

Example:
    >>> positions, included = draw_canaries(100, CanaryConfig(count=10, seed=3), default_seed=0)
    >>> len(positions), included.dtype, bool((positions[1:] > positions[:-1]).all())
    (10, dtype('bool'), True)
    >>> bool((draw_canaries(100, CanaryConfig(count=10, seed=3), default_seed=7)[1] == included).all())  # seed given
    True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from lightning_mia.validation import check_int, coerce_config

__all__ = ["CanaryConfig", "draw_canaries"]

# Seed streams of the canary draws, apart from those of MIADataModule (0-2: split, train and held-out subsets).
STREAM_CANARY_CANDIDATES, STREAM_CANARY_COINS = 3, 4


@dataclass(frozen=True)
class CanaryConfig:
    """How many canaries a :class:`~lightning_mia.data.MIADataModule` draws, and from which seed.

    Args:
        count: m, the number of candidates drawn from the training split (>= 1, below the split's size); the
            other n - m samples are always trained on (Steinke et al., Algorithm 1).
        seed: seeds the draw of the candidates and the coin flips; ``None`` = the datamodule's ``seed``.

    Example:
        >>> CanaryConfig.coerce({"count": 1000}).to_dict()
        {'count': 1000, 'seed': None}
        >>> CanaryConfig(count=0)
        Traceback (most recent call last):
        ...
        ValueError: canaries.count must be an integer >= 1, got 0
    """

    count: int
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", check_int("canaries.count", self.count, 1))
        object.__setattr__(self, "seed", check_int("canaries.seed", self.seed, 0, allow_none=True))

    @classmethod
    def coerce(cls, value: Union["CanaryConfig", Mapping[str, Any], None]) -> Optional["CanaryConfig"]:
        """``None``, a :class:`CanaryConfig` or a mapping of its fields -> a CanaryConfig or None."""
        return coerce_config(cls, value, "canaries", "{'count': 1000}")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain types (what the datamodule's checkpoint hyper-parameters hold)."""
        return dataclasses.asdict(self)


def draw_canaries(n_train: int, config: CanaryConfig, default_seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The canaries of a training split of ``n_train`` samples: ``(positions, included)``.

    ``positions`` (sorted, ``config.count`` distinct positions in the split) and ``included`` (bool, one fair coin
    each) depend only on ``(seed, n_train, count)``, so the same seed always gives the same canaries and flips.
    """
    m = config.count
    if m >= n_train:
        raise ValueError(f"canaries.count={m} must be below the {n_train} samples of the training split "
                         f"(the rest is always trained on)")
    seed = default_seed if config.seed is None else config.seed
    positions = np.sort(np.random.default_rng([int(seed), STREAM_CANARY_CANDIDATES]).choice(n_train, m, replace=False))
    included = np.random.default_rng([int(seed), STREAM_CANARY_COINS]).random(m) < 0.5
    return positions.astype(np.int64), included


def canaries_of(datamodule: Any) -> Optional[Tuple[Any, Any]]:
    """``(canary_dataset(), canary_inclusion())`` when the datamodule has one-run canaries, else ``None``: what the
    monitor asks a datamodule (any datamodule with these two methods takes part)."""
    get, coins = getattr(datamodule, "canary_dataset", None), getattr(datamodule, "canary_inclusion", None)
    if not (callable(get) and callable(coins)):
        return None
    try:
        return get(), np.asarray(coins(), dtype=bool)
    except ValueError:  # a datamodule that supports canaries but has none configured
        return None
