"""Out-of-distribution non-member sources for the false-alarm probe (Hintersdorf, Struppek & Kersting, "Do Not Trust
Prediction Scores for Membership Inference Attacks", 2021: prediction scores are overconfident far from the data,
so an attack calls many inputs that were never near the training set "members").

Each source builds, from the audit's held-out data, a dataset of ``(x, y, index)`` items of the model's input
shape. ``y = -1`` means "no label": features that need a label then use the model's predicted class.

Example:
    >>> import torch
    >>> from lightning_mia.data import IndexedDataset
    >>> from torch.utils.data import TensorDataset
    >>> held = IndexedDataset(TensorDataset(torch.rand(20, 1, 8, 8), torch.zeros(20, dtype=torch.long)))
    >>> ds = build_ood_source("gaussian", held, n=5, seed=0)
    >>> x, y, i = ds[4]
    >>> tuple(x.shape), int(y), int(i)
    ((1, 8, 8), -1, 4)
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_mia.registry import Registry, parse_spec

OOD_SOURCES = Registry("ood source")


class _Indexed(Dataset):
    """``(x, y, index)`` items over stacked tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.float(), y.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], torch.tensor(i, dtype=torch.long)


def _stack(dataset: Dataset, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded samples (all when fewer) of a ``(x, y, index)`` dataset, stacked."""
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    items = [dataset[int(p)] for p in pos]
    return torch.stack([torch.as_tensor(it[0]) for it in items]), torch.stack(
        [torch.as_tensor(it[1]).long().reshape(()) for it in items])


def _check_n(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples of an OOD source) must be an integer >= 1, got {n!r}")
    return n


@OOD_SOURCES.register("gaussian")
def gaussian(heldout: Dataset, n: int = 500, seed: int = 0) -> Dataset:
    """Gaussian noise with the held-out data's per-channel mean and std: "images" of no class at all."""
    x, _ = _stack(heldout, _check_n(n), seed)
    dims = (0, 2, 3)
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n,) + tuple(x.shape[1:]), generator=g) * std + mean
    return _Indexed(noise, torch.full((n,), -1))


@OOD_SOURCES.register("rotated")
def rotated(heldout: Dataset, n: int = 500, seed: int = 0, k: int = 1) -> Dataset:
    """Held-out images rotated by ``k`` x 90 degrees (labels kept: the object is the same, its pose is not)."""
    x, y = _stack(heldout, _check_n(n), seed)
    if x.shape[-1] != x.shape[-2] and k % 2:
        raise ValueError(f"rotating non-square images by 90 degrees changes their shape {tuple(x.shape[1:])}")
    return _Indexed(torch.rot90(x, k, dims=(-2, -1)), y)


@OOD_SOURCES.register("inverted")
def inverted(heldout: Dataset, n: int = 500, seed: int = 0) -> Dataset:
    """Held-out images with intensities reflected within each image (``max + min - x``), labels kept.

    Works in any normalisation: for an image spanning its full range this is the photographic negative.
    """
    x, y = _stack(heldout, _check_n(n), seed)
    flat = x.reshape(len(x), -1)
    hi, lo = flat.max(dim=1).values, flat.min(dim=1).values
    return _Indexed((hi + lo).reshape(-1, 1, 1, 1) - x, y)


@OOD_SOURCES.register("dataset")
def other_dataset(heldout: Dataset, n: int = 500, seed: int = 0, datamodule: Any = None) -> Dataset:
    """Held-out samples of another data set (``datamodule``: a lightning_mia datamodule spec such as
    ``{"name": "fashion_mnist"}``, or an object with ``nonmember_dataset()``), resized to the audited model's
    input shape (bilinear; channels averaged or repeated). Labels are dropped: the classes are unrelated."""
    if datamodule is None:
        raise ValueError("the 'dataset' OOD source needs datamodule: e.g. {name: dataset, datamodule: "
                         "{name: fashion_mnist}}")
    if isinstance(datamodule, (str, Mapping)):
        from lightning_mia.data import build_datamodule

        datamodule = build_datamodule(datamodule)
    other = datamodule.nonmember_dataset()
    x, _ = _stack(other, _check_n(n), seed)
    target, _ = _stack(heldout, 1, seed)
    c, h, w = target.shape[1:]
    if x.shape[1] != c:
        x = x.mean(dim=1, keepdim=True).expand(-1, c, -1, -1) if c != 1 else x.mean(dim=1, keepdim=True)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return _Indexed(x.contiguous(), torch.full((len(x),), -1))


def build_ood_source(spec: Union[str, Mapping[str, Any]], heldout: Dataset, n: int = 500, seed: int = 0
                     ) -> Dataset:
    """Build a source from ``"name"`` or ``{"name": ..., "tag": ..., **options}`` (``tag`` is ignored here)."""
    name, options = parse_spec(spec, "ood source")
    options.pop("tag", None)
    options.setdefault("n", n)
    options.setdefault("seed", seed)
    return OOD_SOURCES[name](heldout, **options)


def ood_far(X_pool: np.ndarray, is_member: np.ndarray, X_ood: np.ndarray, attack_spec: Any, balance: str = "undersample",
            seed: int = 0) -> Tuple[float, np.ndarray, float, int]:
    """Fit an attack on the whole (balanced) audit pool, then call the OOD samples: returns
    ``(far, scores, threshold, n_scored)`` — FAR = share of finite OOD rows predicted "member".

    The attacker here knows the membership of every audit sample: the strongest version of the attack, so the
    OOD FAR is what a deployed attack of this kind would claim about inputs that were never near the data.
    """
    from lightning_mia.attacks import build_attack
    from lightning_mia.attacks.protocol import balance_training_set
    from lightning_mia.membership import finite_rows

    X_pool, X_ood = np.asarray(X_pool, np.float64), np.asarray(X_ood, np.float64)
    X_pool = X_pool.reshape(len(X_pool), -1)
    X_ood = X_ood.reshape(len(X_ood), -1)
    is_member = np.asarray(is_member, bool)
    keep = finite_rows(X_pool)
    Xp, yp = X_pool[keep], is_member[keep]
    idx, weight = balance_training_set(yp, balance, np.random.default_rng(seed))
    attack = build_attack(attack_spec, seed=seed)
    attack.fit(Xp[idx], yp[idx], sample_weight=weight)
    scores = np.asarray(attack.score(X_ood), np.float64)
    ok = finite_rows(X_ood) & np.isfinite(scores)
    pred = np.asarray(attack.predict(X_ood), bool)
    far = float(pred[ok].mean()) if ok.any() else float("nan")
    return far, scores, float(attack.threshold_), int(ok.sum())
