"""Distance to the decision boundary (Rezaei & Liu 2021, Sec. 4, Algorithm 1, Table 6).

Algorithm 1 walks from the input ``x0`` along the normalised input gradient of the loss with fixed FGM steps
of size ``eps`` until the predicted class changes, then bisects between the last point still predicted as
the original class and the first one that is not, until the model's two largest confidences differ by less
than ``theta``; the feature is the L2 distance from ``x0`` to that point.

What exactly is computed here
-----------------------------
* Loss: ``sum_k (softmax_k(x) - onehot(c)_k)^2`` with ``c`` the class **predicted** at ``x0`` (as in the
  authors' ``attacks/distance_to_boundary.py``; they use the ground-truth label there, which is the same
  class for correctly classified samples; for misclassified ones their walk stops at its first step, consistent
  with the ~0.01 distances their Table 6 reports for misclassified MNIST samples. We measure the boundary of
  the region the sample is actually in).
* Direction: the input gradient, normalised per sample (``norm="l2"``: ``g / ||g||_2``, Algorithm 1;
  ``norm="linf"``: ``sign(g)``). The authors' code divides by ``sqrt(sum(g**2, axis=0))`` over the batch axis
  of a single-sample batch, i.e. by ``|g|`` elementwise, which is ``sign(g)``: ``norm="linf"`` with
  ``preset="paper"`` reproduces their released code, ``norm="l2"`` their Algorithm 1.
  The softmax part of the gradient is taken in float64 and rescaled per sample before back-propagating through
  the model (scaling one sample's loss does not change its direction), so a saturated float32 softmax does not
  zero the direction; if it still underflows, the direction of the margin ``z_r - z_c`` to the runner-up
  class ``r`` (the limit of the loss gradient) is used.
* Walk: every sample moves by its own step, ``x <- clip(x + s * dir)``; a sample stops when its predicted
  class changes (whole batch at once, per-sample masks, no Python loop over samples). Samples walk in a
  working set of ``max_rows`` slots refilled from the batch as walks finish, so model calls stay full while
  walks of very different lengths end; on CPU the input gradient of stride-1 convolutions is computed as a
  flipped-kernel forward convolution (``conv_backward.py``; ~2x faster steps on LeNet).
  ``preset="paper"``: ``s = 0.001`` fixed, at most 8000 steps, the gradient refreshed every 10 steps, inputs
  clipped to ``[0, 1]``, at most 500 halvings, ``theta = 1e-4`` -- all values from the authors'
  ``dist_to_boundary`` (``eps_step=0.001, fgsm_max_steps=8000, boundary_steps=500``, threshold ``0.0001``,
  ``np.clip(adv_x, 0, 1)``, ``if i % 10 == 0`` gradient refresh).
  ``preset="fast"`` (default): adaptive steps along the same path. A sample's step starts at ``step`` and is
  multiplied by ``growth`` after each accepted step over which the direction turned by less than
  ``max_turn / 2``; a step is rejected and retried from the same point with ``s / shrink`` when it changes the
  class while longer than ``min_step`` (after which the step no longer grows) or when the direction at its end
  differs from the one at its start by more than ``max_turn`` degrees (unless it is already ``min_step``).
  So the final crossing segment is at most ``min_step`` long, as in the paper, and the path's curvature is
  followed, but in tens instead of thousands of model evaluations. Measured on untrained LeNet and ResNet-20
  (``benchmarks/features.py``): ~40-60 model evaluations per sample instead of ~900-4000, distances within
  ~1% of the paper preset on average and ~3% at most; equal on linear models (tests). A plain geometric growth
  without the turn check overshoots the curved paths of ReLU networks (up to 2x longer distances on
  ResNet-20), which is why the check exists.
* Bisection: between the last unflipped point ``lo`` and the flipped point ``hi``; the midpoint replaces
  ``lo`` when it is still predicted as ``c`` and ``hi`` otherwise (a third class also counts as "flipped":
  the boundary of ``c``'s region is crossed). It stops when the top-two confidence gap at the midpoint is at
  most ``theta`` (the paper's text; the authors' code compares the top confidence at the two bracket ends,
  which converges to the same point) or after ``max_bisections`` halvings; the distance is measured to the
  final midpoint. Failures (no class change within ``max_steps``, or a sample stuck against the clip range)
  are NaN, counted in :attr:`BoundaryDistance.last_failures` and reported with a warning.

``label_only=True`` uses only predicted labels (no gradients, no confidences): ``n_directions`` random unit
directions (seeded, the same for every sample of a given input shape, so results do not depend on batching)
are searched by doubling the radius from ``step`` until the label changes, then bisected on the label change
to a relative precision of ``1e-6``; the feature is the smallest distance over the directions. It is an upper
bound of the true distance (exact when a direction hits the boundary normal); in high dimensions random
directions are nearly orthogonal to the normal, so it is roughly proportional to the true distance rather than
equal to it -- the "noise robustness" label-only signal of Choquette-Choo et al. (2021).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])); _ = model.bias.zero_()
    >>> d = BoundaryDistance().extract(model, torch.tensor([[0.3, 0.0]]), None)  # boundary at x_0 = 0
    >>> round(d.item(), 3)
    0.3
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_mia.features.base import (
    FEATURES,
    Feature,
    autograd_input,
    autograd_on,
    check_choice,
    check_positive,
    eval_mode,
    iter_chunks,
)
from lightning_mia.features.conv_backward import fast_conv_input_grad

__all__ = ["BoundaryDistance", "PRESETS", "NORMS"]

NORMS = ("l2", "linf")

PRESETS: Dict[str, Dict[str, Any]] = {
    # shrezaei/MI-Attack attacks/distance_to_boundary.py: dist_to_boundary(eps_step=0.001, fgsm_max_steps=8000,
    # boundary_steps=500), conf_difference_threshold = 0.0001, np.clip(adv_x, 0, 1), gradient every 10 steps.
    "paper": dict(step=1e-3, growth=1.0, shrink=1.0, min_step=1e-3, max_turn=None, max_steps=8000,
                  grad_every=10, theta=1e-4, max_bisections=500, clamp=(0.0, 1.0)),
    # Same final resolution (crossing segment <= 0.001, theta 1e-4); adaptive steps on the same gradient path.
    # Tuned on LeNet and ResNet-20 against the paper preset (benchmarks/features.py): max_turn 45 stays above
    # the 20-30 degree direction jitter of ReLU networks between nearby points (30 made ResNet-20 walks 10x
    # longer); growth 1.25 rather than 2 keeps the coarse path from overshooting bends (+1-10% distances).
    "fast": dict(step=1e-3, growth=1.25, shrink=2.0, min_step=1e-3, max_turn=45.0, max_steps=1000,
                 grad_every=1, theta=1e-4, max_bisections=40, clamp=None),
}

_Clamp = Optional[Tuple[float, float]]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def _softmax64(z: Tensor) -> Tensor:
    # Written out: the CPU softmax kernel always enters a parallel region, which costs a scheduler time
    # slice (~10 ms) per call on a busy machine -- and the paper preset makes thousands of calls.
    z = z.detach().double()
    e = (z - z.amax(dim=1, keepdim=True)).exp()
    return e / e.sum(dim=1, keepdim=True)


@FEATURES.register("boundary_distance")
class BoundaryDistance(Feature):
    """L2 distance from each sample to the model's decision boundary (one column; NaN where not found).

    Args:
        preset: ``"fast"`` (default, adaptive steps) or ``"paper"`` (the authors' fixed 0.001 steps); it supplies
            every parameter below left at ``None``.
        step: first step size (fixed step for ``"paper"``), in input units (L2 length for ``norm="l2"``,
            per-coordinate for ``"linf"``). For ``label_only``: the first radius.
        growth: factor applied to a sample's step after a step that does not change its class (1 = fixed).
        shrink: factor dividing the step when a step longer than ``min_step`` is rejected (it changes the
            class, or the direction turns by more than ``max_turn``).
        max_turn: largest angle in degrees between the directions at the start and the end of an accepted
            step longer than ``min_step`` (``"fast"``: 45; 180 switches the check off); steps only grow while
            the direction turns by less than half of it. Keeps the adaptive walk on the gradient path.
        min_step: longest crossing segment handed to the bisection.
        max_steps: maximum number of steps per sample before giving up (NaN).
        grad_every: recompute the gradient direction every this many steps.
        theta: stop the bisection when the top-two confidence gap is at most this.
        max_bisections: maximum number of halvings.
        clamp: ``(min, max)`` valid input range to clip every point to, ``None`` for no clipping, or
            ``"preset"`` for the preset's choice (``"paper"``: ``(0, 1)``, the authors' pixel range; pass your
            range, or ``None``, for normalised inputs).
        norm: ``"l2"`` (normalised gradient, Algorithm 1) or ``"linf"`` (sign of the gradient, the authors'
            code; see the module docstring).
        label_only: use predicted labels only, along ``n_directions`` random directions.
        n_directions: number of random directions for ``label_only``.
        seed: seed of the random directions.
        max_rows: most samples walked at once (a working set refilled as samples finish, so that model calls
            stay full). ``None``: 32 on CPU -- per sample, batches of 16-64 run LeNet and ResNet-20 fastest
            here (larger ones fall out of cache) and a small working set shortens the tail of long walks --
            and 1024 on other devices.

    Example:
        >>> import torch
        >>> feat = BoundaryDistance(preset="paper", clamp=None)
        >>> feat.extract(torch.nn.Linear(3, 2), torch.randn(4, 3), None).shape
        torch.Size([4, 1])
    """

    name = "boundary_distance"

    def __init__(
        self,
        preset: Literal["fast", "paper"] = "fast",
        step: Optional[float] = None,
        growth: Optional[float] = None,
        shrink: Optional[float] = None,
        min_step: Optional[float] = None,
        max_turn: Optional[float] = None,
        max_steps: Optional[int] = None,
        grad_every: Optional[int] = None,
        theta: Optional[float] = None,
        max_bisections: Optional[int] = None,
        clamp: Union[str, None, Sequence[float]] = "preset",
        norm: str = "l2",
        label_only: bool = False,
        n_directions: int = 32,
        seed: int = 0,
        max_rows: Optional[int] = None,
    ) -> None:
        check_choice("preset", preset, tuple(PRESETS))
        cfg = dict(PRESETS[preset])
        given = dict(step=step, growth=growth, shrink=shrink, min_step=min_step, max_turn=max_turn,
                     max_steps=max_steps,
                     grad_every=grad_every, theta=theta, max_bisections=max_bisections)
        cfg.update({k: v for k, v in given.items() if v is not None})
        self.preset = preset
        self.step = float(check_positive("step", cfg["step"]))
        self.growth = float(check_positive("growth", cfg["growth"]))
        self.shrink = float(check_positive("shrink", cfg["shrink"]))
        if self.growth < 1.0 or self.shrink < 1.0:
            raise ValueError(f"growth and shrink must be >= 1, got {self.growth} and {self.shrink}")
        self.min_step = float(check_positive("min_step", cfg["min_step"]))
        turn = cfg["max_turn"]
        if turn is not None and (isinstance(turn, bool) or not isinstance(turn, (int, float)) or not 0 < turn <= 180):
            raise ValueError(f"max_turn must be None or an angle in (0, 180] degrees, got {turn!r}")
        self.max_turn = None if turn is None else float(turn)
        self.max_steps = check_positive("max_steps", cfg["max_steps"], integer=True)
        self.grad_every = check_positive("grad_every", cfg["grad_every"], integer=True)
        self.theta = float(check_positive("theta", cfg["theta"], allow_zero=True))
        self.max_bisections = check_positive("max_bisections", cfg["max_bisections"], integer=True, allow_zero=True)
        self.clamp = self._check_clamp(cfg["clamp"] if isinstance(clamp, str) and clamp == "preset" else clamp)
        self.norm = check_choice("norm", norm, NORMS)
        if not isinstance(label_only, bool):
            raise ValueError(f"label_only must be a bool, got {label_only!r}")
        self.label_only = label_only
        self.n_directions = check_positive("n_directions", n_directions, integer=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if max_rows is not None:
            check_positive("max_rows", max_rows, integer=True)
        self.max_rows = max_rows
        self.last_failures = 0
        self.total_failures = 0
        self._directions: Dict[Tuple[Any, ...], Tensor] = {}

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return not self.label_only

    @staticmethod
    def _check_clamp(clamp: Any) -> _Clamp:
        if clamp is None:
            return None
        if isinstance(clamp, str) or len(clamp) != 2:
            raise ValueError(f"clamp must be None, 'preset' or a (min, max) pair, got {clamp!r}")
        lo, hi = float(clamp[0]), float(clamp[1])
        if not lo < hi:
            raise ValueError(f"clamp must satisfy min < max, got {clamp!r}")
        return (lo, hi)

    # ------------------------------------------------------------------ helpers
    def _clip(self, x: Tensor) -> Tensor:
        return x if self.clamp is None else x.clamp(self.clamp[0], self.clamp[1])

    def _direction(self, model: nn.Module, x: Tensor, c: Tensor, fresh: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor]:
        """(predicted class at x, normalised ascent direction of sum_k (p_k - onehot(c)_k)^2 at x); where
        ``fresh`` is set, ``c`` is the class predicted at x."""
        x = x.detach().requires_grad_(True)
        z = model(x)
        pred = z.detach().argmax(dim=1)
        if fresh is not None:
            c = torch.where(fresh, pred, c)
        with torch.no_grad():
            p = _softmax64(z)
            a = 2.0 * (p - torch.nn.functional.one_hot(c, p.shape[1]).double())  # dL/dp
            v = p * (a - (p * a).sum(dim=1, keepdim=True))  # dL/dz through the softmax Jacobian
            scale = v.abs().amax(dim=1, keepdim=True)
            dead = scale[:, 0] == 0
            if dead.any():  # softmax saturated even in float64: use the margin to the runner-up class
                zd = z.detach().double()[dead]
                runner = zd.scatter(1, c[dead, None], float("-inf")).argmax(dim=1)
                fallback = torch.zeros_like(zd)
                fallback.scatter_(1, runner[:, None], 1.0)
                fallback.scatter_(1, c[dead, None], -1.0)
                v[dead] = fallback
                scale[dead] = 1.0
            v = (v / scale).to(z.dtype)
        (g,) = torch.autograd.grad(z, x, grad_outputs=v)
        with torch.no_grad():
            if self.norm == "linf":
                d = g.sign()
            else:
                n = g.flatten(1).norm(dim=1)
                d = g / _bcast(torch.where(n > 0, n, torch.ones_like(n)), g)
        return pred, d.detach()

    def _rows(self, x: Tensor) -> int:
        if self.max_rows is not None:
            return self.max_rows
        return 32 if x.device.type == "cpu" else 1024

    @torch.no_grad()
    def _predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x).argmax(dim=1)

    # ------------------------------------------------------------------ main
    def extract(self, model: nn.Module, x: Tensor, y: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        with torch.inference_mode(False):
            x0 = autograd_input(x)
        if self.clamp is not None and len(x0) and (x0.min() < self.clamp[0] - 1e-6 or x0.max() > self.clamp[1] + 1e-6):
            warnings.warn(
                f"boundary_distance: inputs lie outside clamp={self.clamp}; pass clamp=None or the valid range "
                "of your (normalised) inputs",
                stacklevel=2,
            )
        with eval_mode(model):
            if self.label_only:
                dist = self._label_only(model, x0)
            else:
                with autograd_on(), fast_conv_input_grad(model):
                    dist = self._gradient_walk(model, x0)
        failures = int(torch.isnan(dist).sum())
        self.last_failures = failures
        self.total_failures += failures
        if failures:
            warnings.warn(
                f"boundary_distance: {failures} of {len(x0)} samples did not reach the decision boundary "
                f"(max_steps={self.max_steps}, clamp={self.clamp}); their distance is NaN",
                stacklevel=2,
            )
        return dist[:, None].float()

    def _gradient_walk(self, model: nn.Module, x0: Tensor) -> Tensor:
        """Walk every sample to its class's boundary; return the L2 distances (NaN where not found).

        Samples walk in a working set of at most ``max_rows`` slots that is refilled from the queue as samples
        finish, so every model call stays full until the queue is empty (walk lengths differ ~10x between
        samples; without refilling, the long tail would run at a few rows per call). A slot's first evaluation
        is at the sample itself and gives its class ``c`` and first direction; each later one is a step.
        """
        n, dev = len(x0), x0.device
        rows = min(n, self._rows(x0))
        c = torch.zeros(n, dtype=torch.long, device=dev)  # class predicted at each sample (set on its first call)
        lo, hi = x0.clone(), x0.clone()
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        # Slot state.
        sid = torch.full((rows,), -1, dtype=torch.long, device=dev)  # sample in the slot, -1: free
        x = torch.empty((rows,) + x0.shape[1:], dtype=x0.dtype, device=dev)
        d = torch.zeros_like(x)
        s = torch.zeros(rows, dtype=x0.dtype, device=dev)
        steps = torch.zeros(rows, dtype=torch.long, device=dev)
        growing = torch.ones(rows, dtype=torch.bool, device=dev)
        fresh = torch.zeros(rows, dtype=torch.bool, device=dev)
        tol = self.min_step * (1 + 1e-6)
        cos_reject = None if self.max_turn is None else math.cos(math.radians(self.max_turn))
        cos_grow = None if self.max_turn is None else math.cos(math.radians(self.max_turn / 2))
        queued = 0
        while True:
            free = (sid < 0).nonzero().squeeze(1)
            k = min(free.numel(), n - queued)
            if k:
                f, ids = free[:k], torch.arange(queued, queued + k, device=dev)
                queued += k
                sid[f], x[f], s[f], steps[f] = ids, x0[ids], self.step, 0
                growing[f], fresh[f] = True, True
            idx = (sid >= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            fr = fresh[idx]
            xa, sa, da, ca = x[idx], s[idx], d[idx], c[sid[idx]]
            x_new = torch.where(_bcast(fr, xa), xa, self._clip(xa + _bcast(sa, xa) * da))
            refresh = fr | ((steps[idx] + 1) % self.grad_every == 0)
            if refresh.all():
                pred, d_new = self._direction(model, x_new, ca, fr)
            else:  # paper preset: directions every grad_every steps, forward passes in between
                pred, d_new = torch.empty_like(ca), torch.zeros_like(xa)
                ri, pi = refresh.nonzero().squeeze(1), (~refresh).nonzero().squeeze(1)
                if ri.numel():
                    pred[ri], d_new[ri] = self._direction(model, x_new[ri], ca[ri], fr[ri])
                pred[pi] = self._predict(model, x_new[pi])
            # First evaluation of a slot: the sample's class and direction; no step taken.
            if fr.any():
                fi = idx[fr]
                c[sid[fi]], d[fi] = pred[fr], d_new[fr]
                fresh[fi] = False
            stepped = ~fr
            flipped = stepped & (pred != ca)
            done = flipped & (sa <= tol)
            reject = flipped & ~done
            smooth = torch.ones_like(flipped)
            if cos_reject is not None:
                cos = _cosine(da, d_new)
                # The path bends too much over this step: redo it shorter (down to min_step).
                reject |= stepped & refresh & ~flipped & (cos < cos_reject) & (sa > tol)
                smooth = ~refresh | (cos >= cos_grow)
            moved = stepped & ~flipped & ~reject
            # A step that does not move the point (clipped against the input range) will never flip.
            stuck = moved & (x_new == xa).flatten(1).all(dim=1)
            if done.any():
                di = sid[idx[done]]
                lo[di], hi[di] = xa[done], x_new[done]
                found[di] = True
            if reject.any():
                ri = idx[reject]
                s[ri] = torch.clamp(sa[reject] / self.shrink, min=self.min_step)
                growing[idx[flipped & reject]] = False  # near the boundary: approach it without growing again
            if moved.any():
                mi = idx[moved]
                x[mi] = x_new[moved]
                upd = moved & refresh
                d[idx[upd]] = d_new[upd]
                grow = growing[mi] & smooth[moved]
                s[mi] = torch.where(grow, sa[moved] * self.growth, sa[moved])
            steps[idx[stepped]] += 1
            finished = done | stuck | (stepped & (steps[idx] >= self.max_steps))
            sid[idx[finished]] = -1
        dist = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        fi = found.nonzero().squeeze(1)
        if fi.numel():
            point = self._bisect(model, lo[fi], hi[fi], c[fi])
            dist[fi] = (point - x0[fi]).double().flatten(1).norm(dim=1)
        return dist

    @torch.no_grad()
    def _bisect(self, model: nn.Module, lo: Tensor, hi: Tensor, c: Tensor) -> Tensor:
        """Point between ``lo`` (class c) and ``hi`` (another class) where the top-two gap is <= theta."""
        result = (lo + hi) / 2
        active = torch.ones(len(lo), dtype=torch.bool, device=lo.device)
        for _ in range(self.max_bisections):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            la, ha = lo[idx], hi[idx]
            mid = (la + ha) / 2
            p = _softmax64(model(mid))
            top = p.topk(2, dim=1)
            conv = (top.values[:, 0] - top.values[:, 1]) <= self.theta
            # Float resolution reached: the bracket cannot shrink any more.
            conv |= (mid == la).flatten(1).all(dim=1) | (mid == ha).flatten(1).all(dim=1)
            same = top.indices[:, 0] == c[idx]
            lo[idx[same]] = mid[same]
            hi[idx[~same]] = mid[~same]
            result[idx] = torch.where(_bcast(conv, mid), mid, (lo[idx] + hi[idx]) / 2)
            active[idx[conv]] = False
        return result

    # ------------------------------------------------------------------ label-only
    def directions(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The seeded unit directions ``(n_directions, *shape)`` used by ``label_only``."""
        key = (tuple(shape), str(device), dtype)
        if key not in self._directions:
            gen = torch.Generator().manual_seed(self.seed)
            u = torch.randn((self.n_directions,) + tuple(shape), generator=gen, dtype=torch.float64)
            u = u / _bcast(u.flatten(1).norm(dim=1), u)
            self._directions[key] = u.to(device=device, dtype=dtype)
        return self._directions[key]

    @torch.no_grad()
    def _label_only(self, model: nn.Module, x0: Tensor) -> Tensor:
        n = len(x0)
        dist = torch.full((n,), float("nan"), dtype=torch.float64, device=x0.device)
        if n == 0:
            return dist
        u = self.directions(tuple(x0.shape[1:]), x0.device, x0.dtype)
        k = self.n_directions
        c_all = self._predict(model, x0)
        # At most ~4096 (sample, direction) rows per forward pass.
        for sl in iter_chunks(n, max(1, 4096 // k)):
            xs, cs = x0[sl], c_all[sl]
            m = len(xs)
            base = xs.repeat_interleave(k, dim=0)
            dirs = u.repeat(m, *([1] * (u.dim() - 1)))
            c = cs.repeat_interleave(k)
            rows = m * k
            r_lo = torch.zeros(rows, dtype=torch.float64, device=x0.device)
            r_hi = torch.full((rows,), self.step, dtype=torch.float64, device=x0.device)
            found = torch.zeros(rows, dtype=torch.bool, device=x0.device)
            # Doubling search for a radius with another label (at most 64 doublings, ~1e19 x step).
            for _ in range(min(self.max_steps, 64)):
                idx = (~found).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                pts = self._clip(base[idx] + _bcast(r_hi[idx], base[idx]).to(base.dtype) * dirs[idx])
                flip = self._predict(model, pts) != c[idx]
                found[idx[flip]] = True
                grow = idx[~flip]
                r_lo[grow] = r_hi[grow]
                r_hi[grow] = r_hi[grow] * 2.0
            fi = found.nonzero().squeeze(1)
            for _ in range(self.max_bisections):
                if fi.numel() == 0:
                    break
                mid = (r_lo[fi] + r_hi[fi]) / 2
                pts = self._clip(base[fi] + _bcast(mid, base[fi]).to(base.dtype) * dirs[fi])
                same = self._predict(model, pts) == c[fi]
                r_lo[fi[same]] = mid[same]
                r_hi[fi[~same]] = mid[~same]
                fi = fi[(r_hi[fi] - r_lo[fi]) > 1e-6 * r_hi[fi]]
            radius = (r_lo + r_hi) / 2
            pts = self._clip(base + _bcast(radius, base).to(base.dtype) * dirs)
            d = (pts - base).double().flatten(1).norm(dim=1)
            d = torch.where(found, d, torch.full_like(d, math.inf)).reshape(m, k).amin(dim=1)
            dist[sl] = torch.where(torch.isinf(d), torch.full_like(d, float("nan")), d)
        return dist
