"""Cost of training K reference models live beside the target: vectorised (torch.func) vs looped.

LeNet with the repo's recipe (configs/cpu/lenet_fashion_mnist.yaml: Adam lr 1e-3, betas (0.5, 0.99), batch 64, no
augmentation) trains with a Lightning Trainer on ``--n`` Fashion-MNIST training images (Debian's
/usr/share/datasets/fashion-mnist; synthetic 1x28x28 data of the same size when it is not installed). The
population is the target's training set; each of the K references trains on its own random half of it. At the end
of every target epoch, in the same process, three ensembles each train one epoch (in rotating order): vectorised
with the vmap forward, vectorised with the sequential forward, and looped. Then short epochs of the three, in turn
and repeated, compare the paths under the same machine load (long epochs drift with other processes' load).

    python benchmarks/reference_models.py [--n 10000] [--count 8] [--epochs 3] [--threads T] [--quick]

Targets: one reference costs at most 0.50x of a target epoch (the path vectorize="auto" picks); vectorised at least
as fast as looped. Peak memory is the process's peak resident set size (VmHWM, reset before each phase where Linux
allows), which includes torch's native allocations that ``tracemalloc`` does not see.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mia.data import MNISTDataModule, SyntheticDataModule  # noqa: E402
from lightning_mia.module import ImageClassifier  # noqa: E402
from lightning_mia.reference import ReferenceEnsemble  # noqa: E402


def datamodule(n: int):
    try:
        # configs/cpu/lenet_fashion_mnist.yaml: normalize false, batch 64, a seeded train subset
        dm = MNISTDataModule(dataset="fashion_mnist", normalize=False, batch_size=64, train_subset=n,
                             heldout_subset=1000)
        dm.setup("fit")
        return dm, "Fashion-MNIST"
    except Exception as err:  # not installed: same shapes and sizes, synthetic
        print(f"(Fashion-MNIST not available: {err.__class__.__name__}; using synthetic 1x28x28 data, n={n})")
        dm = SyntheticDataModule(input_shape=(1, 28, 28), num_classes=10, n_train=n, n_heldout=1000, batch_size=64)
        dm.setup("fit")
        return dm, "synthetic 1x28x28"


def _rss_mib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SideBySide(pl.Callback):
    """Times the target's training epoch, then trains one epoch of each ensemble at its end."""

    def __init__(self, count: int, batch_size: int) -> None:
        self.count, self.batch_size = count, batch_size
        self.times: Dict[str, List[float]] = {"target": [], "vmap": [], "sequential": [], "looped": []}
        self.cpu: Dict[str, List[float]] = {name: [] for name in self.times}
        self.peak: Dict[str, float] = {}
        self.base_rss: Dict[str, float] = {}
        self.peak_reset = False
        self.ensembles: Dict[str, ReferenceEnsemble] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.rss_at_start = _rss_mib("VmRSS")
        population = trainer.datamodule.member_dataset()  # the target's training set, without augmentation
        self.population_size = len(population)
        for name, vectorize, forward in (("vmap", "always", "vmap"), ("sequential", "always", "sequential"),
                                         ("looped", "never", "auto")):
            ens = ReferenceEnsemble(pl_module, count=self.count, seed=0, vectorize=vectorize,
                                    batch_size=self.batch_size, stacked_forward=forward)
            ens.setup(population, max_epochs=trainer.max_epochs)
            self.ensembles[name] = ens

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times["target"].append(time.perf_counter() - self._t0)
        self.cpu["target"].append(time.process_time() - self._c0)
        epoch = trainer.current_epoch
        names = list(self.ensembles)
        shift = epoch % len(names)  # rotate the order to spread machine noise over the three
        for name in names[shift:] + names[:shift]:
            self.peak_reset = _reset_peak()
            before = _rss_mib("VmRSS") or 0.0
            c0 = time.process_time()
            stats = self.ensembles[name].train_epoch(epoch)
            self.cpu[name].append(time.process_time() - c0)
            self.times[name].append(stats["seconds"])
            peak = _rss_mib("VmHWM")
            if peak is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), peak)
                self.base_rss[name] = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="target training set = population size")
    p.add_argument("--count", type=int, default=8, help="number of reference models K")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--short-n", type=int, default=640,
                   help="population of the interleaved comparison (short epochs of (short_n / 2) / batch steps)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of the interleaved comparison")
    p.add_argument("--quick", action="store_true",
                   help="one epoch, no warm-up epoch, 6 rounds (under a minute on 2 idle cores)")
    args = p.parse_args()
    warmup = 0 if args.quick else 1
    if args.quick:
        args.epochs, args.rounds = 1, 6
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm, data_name = datamodule(args.n)
    probe = SideBySide(args.count, args.batch_size)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        trainer = pl.Trainer(max_epochs=warmup + args.epochs, accelerator="cpu", devices=1, callbacks=[probe],
                             default_root_dir=d, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        target = ImageClassifier("lenet", optimizer="adam", lr=1e-3, betas=(0.5, 0.99))  # the repo's LeNet recipe
        trainer.fit(target, datamodule=dm)
    wall = time.perf_counter() - start

    def steady(series: List[float]) -> float:  # the first epoch pays one-off warm-up costs
        return statistics.median(series[warmup:])

    t = {name: steady(v) for name, v in probe.times.items()}
    c = {name: steady(v) for name, v in probe.cpu.items()}
    auto = ReferenceEnsemble(target, count=args.count)  # what vectorize="auto" picks here
    auto.setup(dm.member_dataset())
    chosen = auto.stacked_forward if auto.vectorized else "looped"
    k, half = args.count, probe.population_size // 2
    print(f"data: {data_name}, LeNet (Adam 1e-3, betas 0.5/0.99, batch {args.batch_size}), K={k} references, "
          f"population {probe.population_size} = the target's training set, {half} per reference; "
          f"threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.epochs} measured epoch(s) after {warmup} warm-up, medians")
    print("times: wall-clock s (process CPU s, both threads; less sensitive to other processes on the machine)")
    print(f"(a) target epoch (Lightning Trainer, {probe.population_size} images): {t['target']:.3f} s "
          f"({c['target']:.2f})")
    print(f"(b) vectorised ensemble epoch, stacked parameters + one optimizer ({k} x {half} images):")
    print(f"      forward by vmap(functional_call) over (K, B, ...): {t['vmap']:.3f} s ({c['vmap']:.2f})")
    print(f"      forward by K functional_calls on unbound slices, one backward: {t['sequential']:.3f} s "
          f"({c['sequential']:.2f})")
    print(f"(c) looped ensemble epoch ({k} modules, {k} optimizers): {t['looped']:.3f} s ({c['looped']:.2f})")
    print(f"    vectorize='auto' picks: {'vectorised, stacked_forward=' + chosen if auto.vectorized else 'looped'}")
    t_vec = t[chosen]
    print(f"(d) per-reference cost vs target epoch {t_vec / k / t['target']:.2f}x (target <= 0.50x)   "
          f"[vmap {t['vmap'] / k / t['target']:.2f}x, sequential {t['sequential'] / k / t['target']:.2f}x, "
          f"looped {t['looped'] / k / t['target']:.2f}x]")
    print(f"(e) vectorised vs looped {t['looped'] / t_vec:.2f}x (target >= 1.0x)   "
          f"[vmap {t['looped'] / t['vmap']:.2f}x, sequential {t['looped'] / t['sequential']:.2f}x]")
    print(f"    from CPU times: per-reference {c[chosen] / k / c['target']:.2f}x, vectorised vs looped "
          f"{c['looped'] / c[chosen]:.2f}x [vmap {c['looped'] / c['vmap']:.2f}x]")
    how = "peak RSS during its epochs (VmHWM reset before each)" if probe.peak_reset else "process peak RSS so far"
    for name in ("vmap", "sequential", "looped"):
        if name in probe.peak:
            print(f"(f) {name}: {how} {probe.peak[name]:.0f} MiB, {probe.peak[name] - probe.base_rss[name]:+.0f} MiB "
                  f"over the RSS before its epoch")
    if probe.peak:
        print(f"(f) RSS when the fit started (data loaded, before the ensembles): {probe.rss_at_start:.0f} MiB; "
              f"peak over the ensembles' epochs {max(probe.peak.values()):.0f} MiB")
    else:
        print(f"(f) process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ws = {name: {r["k"]: r["model"] for r in ens.state_dict()["references"]} for name, ens in probe.ensembles.items()}
    probe_positions = range(min(2000, probe.population_size))
    looped_pred = probe.ensembles["looped"].logits(dm.member_dataset(), probe_positions).argmax(-1)
    for name in ("vmap", "sequential"):
        a, b = ws[name], ws["looped"]
        d = torch.cat([(a[i][n] - b[i][n]).abs().flatten() for i in a for n in a[i]])
        agree = (probe.ensembles[name].logits(dm.member_dataset(), probe_positions).argmax(-1) == looped_pred)
        steps = (warmup + args.epochs) * auto.steps_per_epoch
        print(f"{name} vs looped after {warmup + args.epochs} epoch(s) ({steps} Adam steps, same seeds and "
              f"batches): max |dw| {float(d.max()):.1e}, mean {float(d.mean()):.1e}, "
              f"predictions agree on {100 * float(agree.float().mean()):.2f}% (float32 rounding, grown by training; "
              f"in float64 the paths agree to 1e-15)")
    # Epochs of a few seconds each drift with the machine's load (other processes); short epochs of the three
    # paths in turn, repeated, compare them under the same load.
    short = dm.member_dataset().subset(range(min(args.short_n, probe.population_size)))
    arms = {}
    for name, kw in (("vmap", dict(vectorize="always", stacked_forward="vmap")),
                     ("sequential", dict(vectorize="always", stacked_forward="sequential")),
                     ("looped", dict(vectorize="never"))):
        arms[name] = ReferenceEnsemble(target, count=k, seed=1, batch_size=args.batch_size, **kw)
        arms[name].setup(short)
    rounds: Dict[str, List[float]] = {name: [] for name in arms}
    for r in range(args.rounds + 1):
        names = list(arms)[r % 3:] + list(arms)[:r % 3]
        for name in names:
            seconds = arms[name].train_epoch(r)["seconds"]
            if r > 0:  # round 0 warms up
                rounds[name].append(seconds)
    med = {name: statistics.median(v) for name, v in rounds.items()}
    steps = arms["looped"].steps_per_epoch
    print(f"interleaved: {args.rounds} rounds of one short epoch per path ({k} x {len(short) // 2} images, {steps} "
          f"steps), medians: vmap {med['vmap']:.3f} s, sequential {med['sequential']:.3f} s, "
          f"looped {med['looped']:.3f} s -> vs looped: vmap {med['looped'] / med['vmap']:.2f}x, "
          f"sequential {med['looped'] / med['sequential']:.2f}x")
    m = min(2000, probe.population_size)
    logits = probe.ensembles["sequential"].logits(dm.member_dataset(), range(m))
    labels = dm.member_dataset().tensors()[1][:m]
    print(f"references' mean accuracy on the first {m} population items (IN and OUT): "
          f"{(logits.argmax(-1) == labels).float().mean():.3f}; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
