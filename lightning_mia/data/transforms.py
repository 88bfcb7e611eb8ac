"""Train-time augmentation in plain torch (no torchvision), one image ``(C, H, W)`` at a time.

Every random transform takes an explicit ``generator`` so that datasets can seed it per worker
(see :class:`lightning_mia.data.IndexedTensorDataset`). The CIFAR recipe is
``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip()])`` applied to images in [0, 1] before
normalisation, as in torchvision-based recipes (bearpaw/pytorch-classification ``cifar.py``).

Example:
    >>> import torch
    >>> aug = Compose([RandomCrop(4, padding=1), RandomHorizontalFlip()])
    >>> aug(torch.rand(3, 4, 4), generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 4, 4])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Compose", "RandomCrop", "RandomHorizontalFlip", "cifar_train_transform", "hflip", "random_crop"]


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror an image (or a batch) left-right: the last axis is width."""
    return x.flip(-1)


def random_crop(
    x: torch.Tensor, size: int, padding: int = 0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Zero-pad ``x`` (C, H, W) by ``padding`` on every side, then cut a random ``size`` x ``size`` window."""
    if x.ndim != 3:
        raise ValueError(f"random_crop expects one image (C, H, W), got shape {tuple(x.shape)}")
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))  # constant 0, like torchvision's default fill
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"crop size {size} is larger than the padded image {h}x{w}")
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    return x[:, top : top + size, left : left + size]


class RandomCrop:
    """Random ``size`` x ``size`` crop after zero padding (torchvision ``RandomCrop(size, padding)``).

    Example:
        >>> import torch
        >>> RandomCrop(32, padding=4)(torch.rand(3, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, size: int, padding: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        self.size = size
        self.padding = padding

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return random_crop(x, self.size, self.padding, generator)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).reshape(1, 2, 2)
        >>> RandomHorizontalFlip(p=1.0)(x).tolist()
        [[[1.0, 0.0], [3.0, 2.0]]]
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Always draw, so the random stream does not depend on p being 0 or 1.
        if float(torch.rand((), generator=generator)) < self.p:
            return hflip(x)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order, passing the same generator to each.

    Example:
        >>> import torch
        >>> Compose([RandomHorizontalFlip(p=1.0), RandomHorizontalFlip(p=1.0)])(torch.eye(2)[None]).tolist()
        [[[1.0, 0.0], [0.0, 1.0]]]
    """

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def cifar_train_transform(size: int = 32) -> Compose:
    """Standard CIFAR augmentation: random crop with 4-pixel zero padding, then a random horizontal flip.

    Source: bearpaw/pytorch-classification ``cifar.py`` (``RandomCrop(32, padding=4)``,
    ``RandomHorizontalFlip()``), the recipe the CIFAR models here follow.
    """
    return Compose([RandomCrop(size, padding=4), RandomHorizontalFlip(p=0.5)])
