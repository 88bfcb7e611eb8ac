"""Cost of the white-box features, measured side by side in one run on LeNet (28x28x1) and ResNet-20 (32x32x3).

Targets (issue 4):
  * per-sample gradient norms (``gradient_norms``: 7 statistics of dL/dw and dL/dx) at least 5x the throughput of a
    naive loop (one ``torch.autograd.grad`` per sample + numpy/scipy statistics) and at least 0.4x the throughput
    of one plain forward + backward over the same batch;
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

Models are untrained (random initialisation; BatchNorm in eval mode with its initial running statistics) on
random inputs in [0, 1]: throughput does not depend on training, boundary walks are of typical length.

    python benchmarks/features.py [--quick] [--device cpu|cuda] [--models lenet resnet20] [--threads N]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
import warnings
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mia.features import BoundaryDistance, GradientNorms  # noqa: E402
from lightning_mia.models import build_model  # noqa: E402

SHAPES = {"lenet": (1, 28, 28), "resnet20": (3, 32, 32)}


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


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> Tuple[float, int, object]:
    """(best wall time of ``repeats`` runs, peak memory growth of one run, last result), after a warm-up call
    (one-time library initialisation is neither timed nor counted as memory)."""
    if repeats:
        fn()
    with PeakMemory(device) as mem:
        out = fn()
    if repeats == 0:  # too slow to repeat: the measured call is the timed one
        return mem.seconds, mem.peak, out
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), mem.peak, out


# --------------------------------------------------------------------------------------- naive references
def naive_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """One autograd call per sample, statistics with numpy/scipy (the authors' ``return_norm_metrics``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), params + [xi])
        row = []
        for g in (torch.cat([t.reshape(-1) for t in grads[:-1]]), grads[-1].reshape(-1)):
            g = g.double().cpu().numpy()
            row += [np.linalg.norm(g, 1), np.linalg.norm(g), np.abs(g).min(), np.abs(g).max(), g.mean(),
                    stats.skew(g), stats.kurtosis(g)]
        rows.append(row)
    return np.array(rows)


def plain_forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------- runs
def bench_model(name: str, device: torch.device, sizes: Dict[str, int], repeats: int) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=SHAPES[name]).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(sizes["grad"], *SHAPES[name], device=device)
    y = torch.randint(0, 10, (sizes["grad"],), device=device)
    rows: List[Dict[str, object]] = []

    feat = GradientNorms()
    t_ours, m_ours, ours = measure(lambda: feat.extract(model, x, y), device, repeats)
    k = sizes["naive"]
    t_naive, m_naive, naive = measure(lambda: naive_gradient_norms(model, x[:k], y[:k]), device, 1)
    t_plain, m_plain, _ = measure(lambda: plain_forward_backward(model, x, y), device, repeats)
    # Accuracy against a float64 copy of the model (the float32 naive loop is itself off by up to ~1e-2 of a
    # column's scale on ResNet-20's input-gradient statistics).
    k64 = min(k, 8)
    model64 = build_model(name, num_classes=10, input_shape=SHAPES[name]).to(device)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    exact = naive_gradient_norms(model64, x[:k64].double(), y[:k64])
    scale = np.abs(exact).max(axis=0) + 1e-30
    gn_err = float(np.max(np.abs(np.asarray(ours[:k64].double().cpu()) - exact) / scale))
    naive_err = float(np.max(np.abs(naive[:k64] - exact) / scale))
    n = len(x)
    rows.append(dict(model=name, params=n_params, what="gradient_norms (w+x, 7 stats each)", n=n,
                     per_s=n / t_ours, peak_mb=m_ours / 2 ** 20,
                     note=f"max |err| / column scale vs float64: {gn_err:.1e}"))
    rows.append(dict(model=name, params=n_params, what="  naive per-sample loop + scipy", n=k,
                     per_s=k / t_naive, peak_mb=m_naive / 2 ** 20,
                     note=f"ours/naive = {(n / t_ours) / (k / t_naive):.1f}x (target >= 5x); "
                          f"its error {naive_err:.1e}"))
    rows.append(dict(model=name, params=n_params, what="  plain forward+backward (batch)", n=n,
                     per_s=n / t_plain, peak_mb=m_plain / 2 ** 20,
                     note=f"ours/plain = {(n / t_ours) / (n / t_plain):.2f}x (target >= 0.4x); "
                          f"plain/naive = {(n / t_plain) / (k / t_naive):.1f}x"))

    xb = torch.rand(sizes["boundary"], *SHAPES[name], device=device)
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
    rows.append(dict(model=name, params=n_params, what="boundary_distance (fast, batched)", n=len(xb),
                     per_s=len(xb) / t_b, peak_mb=m_b / 2 ** 20,
                     note=f"mean distance {mean_d:.3f}, {fails} failures"))
    rows.append(dict(model=name, params=n_params, what="  per-sample loop", n=kb, per_s=kb / t_l,
                     peak_mb=m_l / 2 ** 20,
                     note=f"batched/loop = {(len(xb) / t_b) / (kb / t_l):.1f}x (target >= 20x); "
                          f"max |diff| {max_diff:.1e}"))
    # Upper bound of batched/loop for this algorithm: both make the same model evaluations (the batched walk
    # evaluates only its still-active samples), so batching can gain at most the per-sample cost ratio of one
    # direction evaluation (forward + input gradient) at batch 1 vs. the whole batch.
    c0 = bd._predict(model, xb)
    t1, _, _ = measure(lambda: bd._direction(model, xb[:1], c0[:1]), device, 5)
    tn, _, _ = measure(lambda: bd._direction(model, xb, c0), device, repeats)
    rows.append(dict(model=name, params=n_params, what="  one direction step, batch vs batch 1", n=len(xb),
                     per_s=len(xb) / tn, peak_mb=float("nan"),
                     note=f"model-cost ratio (bound on batching gain of the evaluations) "
                          f"{(len(xb) / tn) / (1 / t1):.1f}x (batch-1: {1 / t1:.0f}/s)"))
    kl = sizes["paper_loop"].get(name, 0)
    if kl:
        # What a user gains over the authors' code: their algorithm (0.001-steps) one sample at a time.
        paper1 = BoundaryDistance(preset="paper")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_pl, m_pl, dist_pl = measure(
                lambda: torch.cat([paper1.extract(model, xb[i:i + 1], None) for i in range(kl)]), device, 0)
        rel = ((dist[:kl] - dist_pl) / dist_pl).abs()
        ok = torch.isfinite(rel)
        rows.append(dict(model=name, params=n_params, what="  paper preset, per-sample loop (authors)", n=kl,
                         per_s=kl / t_pl, peak_mb=m_pl / 2 ** 20,
                         note=f"fast batched / authors' loop = {(len(xb) / t_b) / (kl / t_pl):.0f}x; max rel "
                              f"diff {float(rel[ok].max()) if ok.any() else float('nan'):.1%}"))
    kp = sizes["paper"]
    if kp:
        paper = BoundaryDistance(preset="paper")  # clamp (0, 1) as the authors; inputs are in [0, 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_p, m_p, dist_p = measure(lambda: paper.extract(model, xb[:kp], None), device, 0)
        rel = ((dist[:kp] - dist_p) / dist_p).abs()
        ok = torch.isfinite(rel)
        rows.append(dict(model=name, params=n_params, what="  paper preset (batched)", n=kp, per_s=kp / t_p,
                         peak_mb=m_p / 2 ** 20,
                         note=f"fast/paper = {(len(xb) / t_b) / (kp / t_p):.0f}x; fast vs paper distance: "
                              f"mean rel diff {float(rel[ok].mean()) if ok.any() else float('nan'):.1%}, "
                              f"max {float(rel[ok].max()) if ok.any() else float('nan'):.1%} "
                              f"({paper.last_failures} paper failures)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute on 2 CPU cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up (best kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a CPU shared with other busy processes, 1 "
                             "gives stable numbers: multi-threaded kernels then wait a scheduler time slice per op.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        # Gradient norms at the batch the monitor extracts with (512; quick: 256). Boundary: 128 samples, walked
        # in the working set of max_rows (32 on CPU) that is refilled as samples finish.
        sizes = dict(grad=256, naive=16, boundary=128, boundary_loop=8, paper=4,
                     paper_loop={"lenet": 2, "resnet20": 1})
    else:
        sizes = dict(grad=512, naive=64, boundary=256, boundary_loop=32, paper=16,
                     paper_loop={"lenet": 8, "resnet20": 2})
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, sizes {sizes}")
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, device, sizes, repeats))
    header = f"{'model':9} {'params':>8}  {'what':38} {'n':>4} {'samples/s':>10} {'peak MB':>8}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:9} {r['params']:>8}  {r['what']:38} {r['n']:>4} {r['per_s']:>10.1f} "
              f"{r['peak_mb']:>8.1f}  {r['note']}")


if __name__ == "__main__":
    main()
