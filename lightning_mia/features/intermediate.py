"""Outputs of intermediate layers, captured with forward hooks (Rezaei & Liu 2021, Sec. 4 and Table 5).

Which layer a negative integer means
-----------------------------------
The paper's Table 5 counts "the number of layers we go back from the Softmax layer" and attacks "only the
output of FC or flattened layers". In the authors' code (``attacks/intermediate_layer_attack.py`` of
shrezaei/MI-Attack, Keras) layer ``-1`` is ``model.layers[-2]`` for their LeNet, i.e. the 84-unit hidden FC
layer *feeding* the final ``Dense(10, softmax)`` classifier, ``-2`` is the 120-unit FC layer and ``-3`` the
flattened convolutional features; for their CIFAR CNN ``-1`` is the 128-unit FC layer and ``-2`` the flatten
layer. So ``-1`` is **not** the logits: it is the representation the classifier layer reads.

``index_mode="paper"`` (default) reproduces this on PyTorch models: ``-k`` is the **input of the k-th last
``nn.Linear``** (in forward execution order), flattened. On LeNet: ``-1`` = the 84-d post-ReLU FC features,
``-2`` = the 120-d FC features, ``-3`` = the flattened conv features (input of ``fc1``); on the CIFAR ResNets and
DenseNets (one ``nn.Linear``): ``-1`` = the pooled, flattened features (64-d for ResNet-20). A model with fewer
than ``k`` linear layers raises a ValueError listing them.

``index_mode="leaves"``: ``-k`` is the **output of the k-th last leaf module that owns parameters** (in
forward execution order). Parameter-free leaves (ReLU, pooling, dropout, flatten) are skipped because whether
a model uses a module or a functional call for them is an implementation detail; so ``-1`` is the output of the
last ``nn.Linear`` (the logits), ``-2`` the output of the layer with weights before it (on LeNet ``fc2`` before
its ReLU; on ResNet-20 the last BatchNorm, 64x8x8).

A string selects a module by its path (``model.get_submodule``, e.g. ``"classifier.2"`` or ``"layer3.2.bn2"``)
and captures its **output**. A module called several times in one forward contributes its last call; a tuple
output contributes its first element.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    >>> feat = Intermediate(layers=[-1, "1"])
    >>> feat.extract(model, torch.randn(4, 2, 4), None).shape  # 5 inputs of the classifier + 5 outputs of "1"
    torch.Size([4, 10])
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_mia.features.base import FEATURES, Feature, check_choice, check_positive, eval_mode

__all__ = ["Intermediate", "INDEX_MODES", "resolve_layers"]

INDEX_MODES = ("paper", "leaves")

Layer = Union[int, str]


def _candidates(model: nn.Module, index_mode: str) -> List[Tuple[str, nn.Module]]:
    if index_mode == "paper":
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [
        (n, m)
        for n, m in model.named_modules()
        if next(iter(m.children()), None) is None and next(iter(m.parameters(recurse=False)), None) is not None
    ]


def _execution_order(model: nn.Module, index_mode: str, probe: Tensor) -> List[str]:
    """Names of the candidate modules in the order a forward pass first calls them."""
    order: List[str] = []
    handles = []
    for name, module in _candidates(model, index_mode):
        def hook(mod, args, name=name):
            if name not in order:
                order.append(name)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return order


def resolve_layers(model: nn.Module, layers: Sequence[Layer], index_mode: str, probe: Tensor) -> List[Tuple[str, str]]:
    """``[(module_path, "input" | "output"), ...]`` for ``layers`` on ``model`` (see the module docstring)."""
    order: Optional[List[str]] = None
    resolved: List[Tuple[str, str]] = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                leaves = [n for n, m in model.named_modules() if n and next(iter(m.children()), None) is None]
                raise ValueError(f"Model has no submodule {layer!r}. Leaf modules: {leaves}") from None
            resolved.append((layer, "output"))
            continue
        if order is None:
            order = _execution_order(model, index_mode, probe)
        what = "nn.Linear layers" if index_mode == "paper" else "leaf modules with parameters"
        if -layer > len(order):
            raise ValueError(
                f"layer {layer} needs at least {-layer} {what} but the model runs {len(order)}: {order} "
                f"(index_mode={index_mode!r})"
            )
        resolved.append((order[layer], "input" if index_mode == "paper" else "output"))
    return resolved


@FEATURES.register("intermediate")
class Intermediate(Feature):
    """Flattened, concatenated outputs of intermediate layers.

    Args:
        layers: one layer or a list; each a negative int (see ``index_mode``) or a module path string.
            Default ``-1``: the features the classifier layer reads (the paper's "-1").
        index_mode: ``"paper"`` (``-k`` = input of the k-th last ``nn.Linear``) or ``"leaves"`` (``-k`` =
            output of the k-th last leaf module with parameters; ``-1`` = logits). See the module docstring.
        max_dims: when set and the pool's feature width exceeds it, :meth:`fit_postprocess` projects the
            whole pool onto its first ``max_dims`` principal components (seeded PCA).
        seed: random state of the PCA solver.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> Intermediate(layers=-1, index_mode="leaves").extract(model, torch.zeros(3, 6), None).shape
        torch.Size([3, 2])
    """

    name = "intermediate"

    def __init__(
        self,
        layers: Union[Layer, Sequence[Layer]] = -1,
        index_mode: Literal["paper", "leaves"] = "paper",
        max_dims: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        layer_list = [layers] if isinstance(layers, (int, str)) else list(layers)
        if not layer_list:
            raise ValueError("layers must name at least one layer")
        for layer in layer_list:
            if isinstance(layer, bool) or not isinstance(layer, (int, str)):
                raise ValueError(f"each layer must be a negative int or a module path string, got {layer!r}")
            if isinstance(layer, int) and layer >= 0:
                raise ValueError(f"integer layers count back from the output and must be negative, got {layer}")
            if isinstance(layer, str) and not layer:
                raise ValueError("a module path must be a non-empty string")
        self.layers = layer_list
        self.index_mode = check_choice("index_mode", index_mode, INDEX_MODES)
        if max_dims is not None:
            check_positive("max_dims", max_dims, integer=True)
        self.max_dims = max_dims
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._resolved: "weakref.WeakKeyDictionary[nn.Module, List[Tuple[str, str]]]" = weakref.WeakKeyDictionary()
        self._widths: List[Tuple[str, int]] = []
        self._pca = None

    def __getstate__(self) -> Dict[str, object]:
        # The per-model cache holds weak references, which cannot be pickled (DDP spawn, checkpoints).
        state = dict(self.__dict__)
        state["_resolved"] = None
        return state

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__dict__.update(state)
        self._resolved = weakref.WeakKeyDictionary()

    def resolve(self, model: nn.Module, probe: Tensor) -> List[Tuple[str, str]]:
        """The ``(module_path, "input" | "output")`` pairs captured on ``model`` (cached per model)."""
        if model not in self._resolved:
            self._resolved[model] = resolve_layers(model, self.layers, self.index_mode, probe)
        return self._resolved[model]

    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        targets = self.resolve(model, x[:1])
        captured: Dict[int, Tensor] = {}
        handles = []
        for i, (path, where) in enumerate(targets):
            module = model.get_submodule(path)
            if where == "input":
                def pre_hook(mod, args, i=i):
                    captured[i] = args[0]
                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(mod, args, out, i=i):
                    captured[i] = out[0] if isinstance(out, (tuple, list)) else out
                handles.append(module.register_forward_hook(hook))
        try:
            with eval_mode(model), torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        parts = []
        for i, (path, _) in enumerate(targets):
            if i not in captured:
                raise RuntimeError(f"layer {path!r} was not called during the forward pass")
            parts.append(captured[i].detach().reshape(len(x), -1).float())
        self._widths = [(f"{layer}", p.shape[1]) for layer, p in zip(self.layers, parts)]
        return torch.cat(parts, dim=1)

    def fit_postprocess(self, X: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Fit the PCA cap on the whole pool when it is wider than ``max_dims``; returns the projection (float32),
        which applies to other rows (e.g. out-of-distribution probes) too."""
        X = np.asarray(X, dtype=np.float32)
        if self.max_dims is None or X.ndim != 2 or X.shape[1] <= self.max_dims:
            return _float32
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(self.max_dims, X.shape[0]), random_state=self.seed).fit(X)
        self._pca = pca
        return functools.partial(_project, pca)

    def dim_names(self, d: int) -> List[str]:
        if self.max_dims is not None and d <= self.max_dims and self._pca is not None:
            return [f"pc_{i}" for i in range(d)]
        names = [f"layer[{layer}]_{j}" for layer, w in self._widths for j in range(w)]
        return names if len(names) == d else super().dim_names(d)


def _float32(X: np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=np.float32)


def _project(pca: Any, X: np.ndarray) -> np.ndarray:
    return pca.transform(np.asarray(X, dtype=np.float32)).astype(np.float32)
