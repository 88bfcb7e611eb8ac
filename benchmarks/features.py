"""Cost of the white-box features, measured side by side in one run on LeNet (28x28x1), ResNet-20 (32x32x3),
ResNet-20 with GroupNorm in place of BatchNorm and a small Transformer text classifier (token ids).

Targets (each printed as one ``summary`` line at the end, ``... NN.NNx (target >= X.Xx)``):
  * per-sample gradient norms (``gradient_norms``: 7 statistics of dL/dw and dL/dx; dL/dw only on token ids) at
    least 5x the throughput of a naive loop (one ``torch.autograd.grad`` per sample + numpy/scipy statistics) and
    at least 0.4x the throughput of one plain forward + backward over the same batch;
  * ``gradient_norms(wrt="weights")`` at least 1.0x the throughput of Opacus' ``GradSampleModule`` computing the
    per-sample gradients and then their L2 norm (same model and weights, batch 256, same labels), on LeNet,
    ResNet-20-GroupNorm and the Transformer (Opacus cannot run ResNet-20 itself: eval-mode BatchNorm), with the
    largest relative difference between the two L2 norms and the peak memory of each. Opacus is imported only
    here and skipped with a note when it is not installed (``pip install -e ".[bench]"``);
  * ``boundary_distance`` batched at least 20x the throughput of calling it one sample at a time, with the
    largest difference between the two;
  * for reference, the paper preset of ``boundary_distance`` (0.001-steps, as the authors) on a few samples,
    batched and one sample at a time as the authors' code runs: its speed and how far the fast preset's
    distances are from it;
  * the bounds batching works against on this device: "plain/naive" (a batched forward+backward vs one sample
    at a time) caps ours/naive at (ours/plain) x (plain/naive), and the "model-cost ratio" (one boundary step
    for a batch vs batch 1, per sample) caps batched/loop for the same algorithm -- on a 2-core CPU these are
    ~6x and ~3-5x for ResNet-20, so the 5x / 20x targets there need an accelerator;
  * peak memory of each (CPU: growth of the process's resident set above its level before the call, sampled
    every millisecond; CUDA: ``torch.cuda.max_memory_allocated``).

Ours and Opacus are timed alternately (best of ``repeats`` each) so that load from other processes on a shared
CPU hits both alike. Models are untrained (random initialisation; BatchNorm in eval mode with its initial
running statistics) on random inputs in [0, 1] / random token ids: throughput does not depend on training,
boundary walks are of typical length. ``--quick`` caps sizes and repeats, runs on one thread (stable under
load), keeps the naive / plain gradient rows to LeNet and ResNet-20, and once its time budget (``--budget``,
default 360 s) is spent cuts repeats and skips the remaining rows -- the paper-preset rows come last -- so that
it finishes within ~10 minutes on a busy 2-core CPU.

    python benchmarks/features.py [--quick] [--device cpu|cuda] [--models lenet resnet20 resnet20gn text]
                                  [--threads N] [--budget SECONDS]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import math
import os
import sys
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mia.features import BoundaryDistance, GradientNorms  # noqa: E402
from lightning_mia.models import build_model  # noqa: E402

SHAPES = {"lenet": (1, 28, 28), "resnet20": (3, 32, 32), "resnet20gn": (3, 32, 32)}
MODELS = ("lenet", "resnet20", "resnet20gn", "text")
OPACUS_MODELS = ("lenet", "resnet20gn", "text")  # Opacus has no per-sample rule for eval-mode BatchNorm
BOUNDARY_MODELS = ("lenet", "resnet20")  # image models whose boundary walks the README reports
TEXT = dict(vocab=1000, dim=64, heads=4, ff=128, layers=2, tokens=32)


# ------------------------------------------------------------------------------------------------ models
class TextClassifier(nn.Module):
    """Embedding -> 2 ``nn.TransformerEncoderLayer`` (batch first, no dropout) -> mean over tokens -> Linear."""

    def __init__(self, num_classes: int = 10, vocab: int = 1000, dim: int = 64, heads: int = 4, ff: int = 128,
                 layers: int = 2, **_) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
                                       for _ in range(layers)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _groupnorm_resnet20() -> nn.Module:
    """ResNet-20 with every BatchNorm2d replaced by GroupNorm(gcd(32, C), C), as Opacus' ModuleValidator.fix
    converts it."""
    model = build_model("resnet20", num_classes=10, input_shape=SHAPES["resnet20"])

    def swap(mod: nn.Module) -> None:
        for name, child in mod.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, name, nn.GroupNorm(math.gcd(32, child.num_features), child.num_features))
            else:
                swap(child)

    swap(model)
    return model


def make_model(name: str) -> nn.Module:
    if name == "text":
        return TextClassifier(**TEXT)
    if name == "resnet20gn":
        return _groupnorm_resnet20()
    return build_model(name, num_classes=10, input_shape=SHAPES[name])


def make_inputs(name: str, n: int, device: torch.device) -> torch.Tensor:
    if name == "text":
        return torch.randint(0, TEXT["vocab"], (n, TEXT["tokens"]), device=device)
    return torch.rand(n, *SHAPES[name], device=device)


class _LinearAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no masks) as four ``nn.Linear`` layers around
    ``scaled_dot_product_attention``, with its weights: Opacus' own layout for attention (DPMultiheadAttention),
    which Opacus 1.6.0 gets wrong in batch-first mode (it reshapes the ``(n*heads, L, d)`` attention output to
    ``(n, L, E)`` without moving the heads back: another function), so it is not used here."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, True
        self.in_proj_bias, self._qkv_same_embed_dim = None, False  # keeps TransformerEncoderLayer off its fast path
        self.q, self.k, self.v = (nn.Linear(e, e) for _ in range(3))
        self.out_proj = nn.Linear(e, e)
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("masks are not used in this benchmark")
        n, t, e = query.shape
        heads = [z.reshape(n, -1, self.num_heads, e // self.num_heads).transpose(1, 2)
                 for z in (self.q(query), self.k(key), self.v(value))]
        o = F.scaled_dot_product_attention(*heads)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, e)), None


def opacus_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights and function) that Opacus' GradSampleModule accepts."""
    model = copy.deepcopy(model)

    def swap(mod: nn.Module) -> None:
        for name, child in mod.named_children():
            if type(child) is nn.MultiheadAttention:
                setattr(mod, name, _LinearAttention(child))
            else:
                swap(child)

    swap(model)
    return model


# ------------------------------------------------------------------------------------------ measurement
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS so far (never decreases, so deltas may read 0)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    # Hand freed heap pages back to the OS so that each measurement starts from a low resident set.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory growth (bytes) while the ``with`` block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        self._t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim()
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, _rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.seconds = time.perf_counter() - self._t0
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss_bytes()) - self._base
        self.seconds = time.perf_counter() - self._t0


def _timed(fn: Callable[[], object], device: torch.device) -> Tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


_RUN: Optional["Run"] = None  # the run whose time budget measure() / measure_pair() respect


def _affordable(seconds_per_call: float, repeats: int) -> int:
    """How many of ``repeats`` further calls of ``seconds_per_call`` fit the time budget that is left."""
    if _RUN is None or _RUN.budget is None:
        return repeats
    return max(0, min(repeats, int(_RUN.left() / max(seconds_per_call, 1e-9))))


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> Tuple[float, int, object]:
    """(best wall time of the runs, peak memory growth of one run, last result), after a warm-up call (one-time
    library initialisation is neither timed nor counted as memory). The memory run is timed too; with
    ``repeats=0``, or when the time budget affords no more, the first call is the only one and is timed."""
    with PeakMemory(device) as mem:
        out = fn()
    if repeats == 0 or _affordable(mem.seconds, 1) == 0:
        return mem.seconds, mem.peak, out
    with PeakMemory(device) as mem:  # after the warm-up
        out = fn()
    times = [mem.seconds]
    for _ in range(_affordable(mem.seconds, repeats - 1)):
        t, out = _timed(fn, device)
        times.append(t)
    return min(times), mem.peak, out


def measure_pair(fns: Tuple[Callable[[], object], Callable[[], object]], device: torch.device, repeats: int
                 ) -> List[Tuple[float, int, object]]:
    """:func:`measure` for two functions, their further timed runs alternating (a load burst from other
    processes then slows both rather than one)."""
    outs, peaks, times = [], [], []
    for fn in fns:
        fn()  # warm-up
        with PeakMemory(device) as mem:
            outs.append(fn())
        peaks.append(mem.peak)
        times.append([mem.seconds])
    for _ in range(_affordable(sum(t[0] for t in times), repeats - 1)):
        for i, fn in enumerate(fns):
            t, outs[i] = _timed(fn, device)
            times[i].append(t)
    return [(min(times[i]), peaks[i], outs[i]) for i in range(2)]


# --------------------------------------------------------------------------------------- naive references
def naive_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """One autograd call per sample, statistics with numpy/scipy (the authors' ``return_norm_metrics``); input
    statistics only for float inputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    with_x = x.is_floating_point()
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True) if with_x else x[i:i + 1]
        grads = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), params + ([xi] if with_x else []))
        gw = torch.cat([t.reshape(-1) for t in grads[:len(params)]])
        row = []
        for g in [gw] + ([grads[-1].reshape(-1)] if with_x else []):
            g = g.double().cpu().numpy()
            row += [np.linalg.norm(g, 1), np.linalg.norm(g), np.abs(g).min(), np.abs(g).max(), g.mean(),
                    stats.skew(g), stats.kurtosis(g)]
        rows.append(row)
    return np.array(rows)


def plain_forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def opacus_l2_norms(gsm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Opacus: one forward + backward of the summed loss through GradSampleModule's hooks, then the L2 norm of
    each sample's per-sample gradient over all parameters."""
    gsm.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    sq = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for p in gsm.parameters():
        if p.requires_grad:
            sq += p.grad_sample.reshape(len(x), -1).double().pow(2).sum(dim=1)
    gsm.zero_grad(set_to_none=True)
    return sq.sqrt()


# ------------------------------------------------------------------------------------------------- runs
class Run:
    """Rows, summary lines and the time budget of one benchmark run."""

    def __init__(self, budget: Optional[float]) -> None:
        self.rows: List[Dict[str, object]] = []
        self.summary: List[str] = []
        self.budget = budget
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - (time.perf_counter() - self.t0)

    def skip(self, model: str, params: int, what: str) -> bool:
        """Whether the budget is spent (then a row says what was skipped)."""
        if self.left() > 0:
            return False
        self.rows.append(dict(model=model, params=params, what=what, n=0, per_s=float("nan"),
                              peak_mb=float("nan"), note="skipped: time budget spent"))
        return True

    def target(self, model: str, what: str, value: float, target: float) -> str:
        self.summary.append(f"summary  {model:10} {what:52} {value:8.2f}x (target >= {target:.1f}x)")
        return f"{value:.2f}x (target >= {target:.1f}x)"


def bench_gradients(run: Run, name: str, model: nn.Module, device: torch.device, sizes: Dict[str, object],
                    repeats: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    x, y = make_inputs(name, sizes["grad"], device), torch.randint(0, 10, (sizes["grad"],), device=device)
    tokens = not x.is_floating_point()
    # dL/dx of token ids is undefined: weight statistics only there.
    feat = GradientNorms(wrt="weights") if tokens else GradientNorms()
    t_ours, m_ours, ours = measure(lambda: feat.extract(model, x, y), device, repeats)
    k = sizes["naive"]
    t_naive, m_naive, naive = measure(lambda: naive_gradient_norms(model, x[:k], y[:k]), device, 1)
    t_plain, m_plain, _ = measure(lambda: plain_forward_backward(model, x, y), device, repeats)
    # Accuracy against a float64 copy of the model (the float32 naive loop is itself off by up to ~1e-2 of a
    # column's scale on ResNet-20's input-gradient statistics).
    k64 = min(k, 8)
    model64 = copy.deepcopy(model).double().eval()
    x64 = x[:k64] if tokens else x[:k64].double()
    exact = naive_gradient_norms(model64, x64, y[:k64])
    scale = np.abs(exact).max(axis=0) + 1e-30
    gn_err = float(np.max(np.abs(np.asarray(ours[:k64].double().cpu()) - exact) / scale))
    naive_err = float(np.max(np.abs(naive[:k64] - exact) / scale))
    n = len(x)
    what = "gradient_norms (w, 7 stats)" if tokens else "gradient_norms (w+x, 7 stats each)"
    run.rows.append(dict(model=name, params=n_params, what=what, n=n, per_s=n / t_ours, peak_mb=m_ours / 2 ** 20,
                         note=f"max |err| / column scale vs float64: {gn_err:.1e}"))
    ratio = (n / t_ours) / (k / t_naive)
    run.rows.append(dict(model=name, params=n_params, what="  naive per-sample loop + scipy", n=k,
                         per_s=k / t_naive, peak_mb=m_naive / 2 ** 20,
                         note=f"ours/naive = {run.target(name, 'gradient_norms / naive per-sample loop', ratio, 5.0)}"
                              f"; its error {naive_err:.1e}"))
    ratio = (n / t_ours) / (n / t_plain)
    run.rows.append(dict(model=name, params=n_params, what="  plain forward+backward (batch)", n=n,
                         per_s=n / t_plain, peak_mb=m_plain / 2 ** 20,
                         note=f"ours/plain = {run.target(name, 'gradient_norms / plain forward+backward', ratio, 0.4)}"
                              f"; plain/naive = {(n / t_plain) / (k / t_naive):.1f}x"))


def bench_opacus(run: Run, name: str, model: nn.Module, device: torch.device, repeats: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    if importlib.util.find_spec("opacus") is None:
        run.rows.append(dict(model=name, params=n_params, what="  Opacus GradSampleModule", n=0,
                             per_s=float("nan"), peak_mb=float("nan"),
                             note='skipped: opacus is not installed (pip install -e ".[bench]")'))
        return
    from opacus import GradSampleModule

    n = 256
    torch.manual_seed(1)
    x, y = make_inputs(name, n, device), torch.randint(0, 10, (n,), device=device)
    gsm = GradSampleModule(opacus_copy(model), loss_reduction="sum")
    gsm.eval()
    # Opacus' hooks record only in training mode: the parameterised layers are put in it (none of these behaves
    # differently there: no BatchNorm, no dropout), everything else stays in eval mode.
    for m in gsm.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            m.train()
    ours_feat = GradientNorms(wrt="weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notes about its hooks
        (t_ours, m_ours, ours), (t_op, m_op, op) = measure_pair(
            (lambda: ours_feat.extract(model, x, y), lambda: opacus_l2_norms(gsm, x, y)), device, repeats)
    rel = float(((ours[:, 1].double() - op) / op).abs().max())
    run.rows.append(dict(model=name, params=n_params, what="gradient_norms (w, 7 stats) vs Opacus", n=n,
                         per_s=n / t_ours, peak_mb=m_ours / 2 ** 20,
                         note=f"max rel. L2-norm diff vs Opacus {rel:.1e}"))
    ratio = (n / t_ours) / (n / t_op)
    run.rows.append(dict(model=name, params=n_params, what="  Opacus GradSampleModule + L2 norms", n=n,
                         per_s=n / t_op, peak_mb=m_op / 2 ** 20,
                         note=f"ours/Opacus = {run.target(name, 'gradient_norms(wrt=weights) / Opacus', ratio, 1.0)}"))
    del gsm


def bench_boundary(run: Run, name: str, model: nn.Module, device: torch.device, sizes: Dict[str, object],
                   repeats: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
    n_params = sum(p.numel() for p in model.parameters())
    xb = make_inputs(name, sizes["boundary"], device)
    bd = BoundaryDistance(clamp=(0.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_b, m_b, dist = measure(lambda: bd.extract(model, xb, None), device, repeats)
        fails = bd.last_failures
        kb = sizes["boundary_loop"]
        t_l, m_l, loop = measure(
            lambda: torch.cat([bd.extract(model, xb[i:i + 1], None) for i in range(kb)]), device, 1)
    diff = (dist[:kb] - loop).abs()
    max_diff = float(diff[torch.isfinite(diff)].max()) if torch.isfinite(diff).any() else float("nan")
    mean_d = float(dist[torch.isfinite(dist)].mean()) if torch.isfinite(dist).any() else float("nan")
    run.rows.append(dict(model=name, params=n_params, what="boundary_distance (fast, batched)", n=len(xb),
                         per_s=len(xb) / t_b, peak_mb=m_b / 2 ** 20,
                         note=f"mean distance {mean_d:.3f}, {fails} failures"))
    ratio = run.target(name, "boundary_distance batched / per-sample loop", (len(xb) / t_b) / (kb / t_l), 20.0)
    run.rows.append(dict(model=name, params=n_params, what="  per-sample loop", n=kb, per_s=kb / t_l,
                         peak_mb=m_l / 2 ** 20, note=f"batched/loop = {ratio}; max |diff| {max_diff:.1e}"))
    if run.skip(name, n_params, "  one direction step, batch vs batch 1"):
        return xb, dist, t_b
    # Upper bound of batched/loop for this algorithm: both make the same model evaluations (the batched walk
    # evaluates only its still-active samples), so batching can gain at most the per-sample cost ratio of one
    # direction evaluation (forward + input gradient) at batch 1 vs. the whole batch.
    c0 = bd._predict(model, xb)
    t1, _, _ = measure(lambda: bd._direction(model, xb[:1], c0[:1]), device, 5)
    tn, _, _ = measure(lambda: bd._direction(model, xb, c0), device, repeats)
    run.rows.append(dict(model=name, params=n_params, what="  one direction step, batch vs batch 1", n=len(xb),
                         per_s=len(xb) / tn, peak_mb=float("nan"),
                         note=f"model-cost ratio (bound on batching gain of the evaluations) "
                              f"{(len(xb) / tn) / (1 / t1):.1f}x (batch-1: {1 / t1:.0f}/s)"))
    return xb, dist, t_b


def bench_paper(run: Run, name: str, model: nn.Module, device: torch.device, sizes: Dict[str, object],
                boundary: Tuple[torch.Tensor, torch.Tensor, float]) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    xb, dist, t_b = boundary
    kl = sizes["paper_loop"].get(name, 0)
    if kl and not run.skip(name, n_params, "  paper preset, per-sample loop (authors)"):
        # What a user gains over the authors' code: their algorithm (0.001-steps) one sample at a time.
        paper1 = BoundaryDistance(preset="paper")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_pl, m_pl, dist_pl = measure(
                lambda: torch.cat([paper1.extract(model, xb[i:i + 1], None) for i in range(kl)]), device, 0)
        rel = ((dist[:kl] - dist_pl) / dist_pl).abs()
        ok = torch.isfinite(rel)
        run.rows.append(dict(model=name, params=n_params, what="  paper preset, per-sample loop (authors)", n=kl,
                             per_s=kl / t_pl, peak_mb=m_pl / 2 ** 20,
                             note=f"fast batched / authors' loop = {(len(xb) / t_b) / (kl / t_pl):.0f}x; max rel "
                                  f"diff {float(rel[ok].max()) if ok.any() else float('nan'):.1%}"))
    kp = sizes["paper"]
    if kp and not run.skip(name, n_params, "  paper preset (batched)"):
        paper = BoundaryDistance(preset="paper")  # clamp (0, 1) as the authors; inputs are in [0, 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_p, m_p, dist_p = measure(lambda: paper.extract(model, xb[:kp], None), device, 0)
        rel = ((dist[:kp] - dist_p) / dist_p).abs()
        ok = torch.isfinite(rel)
        run.rows.append(dict(model=name, params=n_params, what="  paper preset (batched)", n=kp, per_s=kp / t_p,
                             peak_mb=m_p / 2 ** 20,
                             note=f"fast/paper = {(len(xb) / t_b) / (kp / t_p):.0f}x; fast vs paper distance: "
                                  f"mean rel diff {float(rel[ok].mean()) if ok.any() else float('nan'):.1%}, "
                                  f"max {float(rel[ok].max()) if ok.any() else float('nan'):.1%} "
                                  f"({paper.last_failures} paper failures)"))


def main() -> None:
    global _RUN
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 1 thread and a time budget (at most ~10 minutes on a busy 2-core CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (best kept)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the remaining rows are skipped and repeats cut (default: 360 "
                             "with --quick, none otherwise)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --quick, else torch's). On a CPU shared with other "
                             "busy processes, 1 gives stable numbers: multi-threaded kernels then wait a scheduler "
                             "time slice per op.")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; nothing measured.")
        return
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.quick:
        # Gradient norms at the batch the monitor extracts with (512; quick: 256, as the Opacus comparison).
        # Boundary: 64 samples, walked in the working set of max_rows (32 on CPU) that is refilled as samples
        # finish. The naive / plain gradient rows only for the models of the README (LeNet, ResNet-20).
        sizes = dict(grad=256, naive=8, boundary=64, boundary_loop=4, paper=2,
                     paper_loop={"lenet": 1, "resnet20": 1}, grad_models=("lenet", "resnet20"))
    else:
        sizes = dict(grad=512, naive=64, boundary=256, boundary_loop=32, paper=16,
                     paper_loop={"lenet": 8, "resnet20": 2}, grad_models=MODELS)
    repeats = args.repeats or (2 if args.quick else 3)
    budget = args.budget if args.budget is not None else (360.0 if args.quick else None)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, sizes {sizes}, "
          f"repeats {repeats}, budget {budget if budget is not None else 'none'} s", flush=True)
    run = _RUN = Run(budget)
    models: Dict[str, nn.Module] = {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = make_model(name).to(device).eval()
    # The Opacus comparison and gradient rows first; boundary walks next; the slow paper-preset rows last.
    for name, model in models.items():
        n_params = sum(p.numel() for p in model.parameters())
        if name in OPACUS_MODELS and not run.skip(name, n_params, "Opacus comparison"):
            bench_opacus(run, name, model, device, repeats)
        if name in sizes["grad_models"] and not run.skip(name, n_params, "gradient_norms rows"):
            bench_gradients(run, name, model, device, sizes, repeats)
        print(f"  {name}: gradient rows done at {time.perf_counter() - run.t0:.0f} s", flush=True)
    walks = {}
    for name in (m for m in models if m in BOUNDARY_MODELS):
        if not run.skip(name, sum(p.numel() for p in models[name].parameters()), "boundary_distance rows"):
            walks[name] = bench_boundary(run, name, models[name], device, sizes, repeats)
            print(f"  {name}: boundary rows done at {time.perf_counter() - run.t0:.0f} s", flush=True)
    for name, walk in walks.items():
        bench_paper(run, name, models[name], device, sizes, walk)
    header = f"{'model':10} {'params':>8}  {'what':38} {'n':>4} {'samples/s':>10} {'peak MB':>8}  note"
    print(header)
    print("-" * len(header))
    for r in sorted(run.rows, key=lambda r: list(models).index(r["model"])):
        print(f"{r['model']:10} {r['params']:>8}  {r['what']:38} {r['n']:>4} {r['per_s']:>10.1f} "
              f"{r['peak_mb']:>8.1f}  {r['note']}")
    print(f"total {time.perf_counter() - run.t0:.0f} s")
    for line in run.summary:
        print(line)


if __name__ == "__main__":
    main()
