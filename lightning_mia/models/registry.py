"""The model registry, ``build_model`` and the argument checks every model shares.

Every registered factory is called as ``factory(num_classes=..., input_shape=..., **options)`` and returns a
plain ``nn.Module`` mapping ``(N, C, H, W)`` float images to ``(N, num_classes)`` logits.

Aliases are registry entries that fix some options of a base model (``"resnet20"`` is ``"resnet"`` with
``depth=20``); giving an alias a conflicting value for a fixed option is a ``ValueError``.

Example:
    >>> from lightning_mia.models import MODELS, build_model
    >>> sorted(MODELS)[:3]
    ['alexnet', 'densenet', 'densenet_bc_100']
    >>> model = build_model("resnet", num_classes=10, input_shape=(3, 32, 32), depth=8)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lightning_mia.registry import Registry, parse_spec

__all__ = ["MODELS", "build_model", "register_alias", "check_num_classes", "check_input_shape", "check_forward"]

MODELS = Registry("model")


def build_model(
    name: Union[str, Mapping[str, Any]],
    num_classes: int,
    input_shape: Sequence[int],
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (``"lenet"``, ``"alexnet"``, ``"resnet"``, ``"densenet"`` or an alias such as
            ``"resnet20"``), or a spec ``{"name": ..., **options}``; spec options override ``kwargs``.
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input image.
        **kwargs: model options (e.g. ``depth`` for ResNet / DenseNet).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ValueError: an option the model does not take, or an invalid option value.

    Example:
        >>> build_model({"name": "densenet", "depth": 10}, num_classes=100, input_shape=(3, 32, 32)).fc.out_features
        100
    """
    model_name, options = parse_spec(name, "model")
    factory = MODELS[model_name]
    options = {**kwargs, **options}
    _check_options(model_name, factory, options)
    return factory(num_classes=num_classes, input_shape=input_shape, **options)


def _check_options(name: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    # A typo'd option would otherwise surface as a bare TypeError deep inside a config-driven run.
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n in params if n not in ("num_classes", "input_shape")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}. Allowed options: {allowed}")


def register_alias(alias: str, base: str, **fixed: Any) -> None:
    """Register ``alias`` as ``base`` with the options in ``fixed`` set (e.g. ``resnet20`` = resnet, depth 20)."""
    base_factory = MODELS[base]
    allowed = [n for n in inspect.signature(base_factory).parameters if n not in ("num_classes", "input_shape")]

    def factory(num_classes: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
        for key, value in fixed.items():
            if key in options and options[key] != value:
                raise ValueError(f"Model {alias!r} fixes {key}={value!r}; got {key}={options[key]!r}. "
                                 f"Use {base!r} to choose {key} freely.")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for model {alias!r}. Allowed options: {allowed}")
        return base_factory(num_classes=num_classes, input_shape=input_shape, **{**options, **fixed})

    factory.__name__ = alias
    factory.__doc__ = f"``{base}`` with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    MODELS.register(alias)(factory)


def check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` as int; ``ValueError`` unless it is an integer >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return num_classes


def check_input_shape(input_shape: Sequence[int]) -> Tuple[int, int, int]:
    """Return ``input_shape`` as a ``(C, H, W)`` tuple of positive ints (lists from YAML configs are accepted)."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) with three positive integers, got {input_shape!r}")
    return shape  # type: ignore[return-value]


@torch.no_grad()
def check_forward(model: nn.Module, input_shape: Tuple[int, int, int], what: str,
                  fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Run one zero image through ``fn`` (default: ``model``) with ``model`` in eval mode, so BatchNorm
    statistics stay untouched, and return the output. A shape the architecture cannot handle becomes a
    ``ValueError`` at construction instead of a crash in the first training step."""
    was_training = model.training
    model.eval()
    try:
        return (fn or model)(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise ValueError(f"{what} cannot take inputs of shape {tuple(input_shape)} (C, H, W): {err}") from None
    finally:
        model.train(was_training)
