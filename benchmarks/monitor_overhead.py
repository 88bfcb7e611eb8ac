"""Epoch time with the membership-inference monitor vs without, arms interleaved, and what the monitor's timers
account for.

LeNet on Fashion-MNIST (Debian's ``dataset-fashion-mnist`` when installed, else synthetic 28x28 data of the same
size), a 10k-sample audit pool, confidence + logistic regression every epoch by default. Each round runs one short
fit per arm (the arms' order alternates between rounds, so drift in the machine's load hits both); epoch 0 of every
fit pays one-off warm-up costs and is not counted. Prints:

- the headline **epoch-time ratio**: median monitored epoch / median baseline epoch (with ``--every k > 1``: one
  audited and ``k - 1`` unaudited monitored epochs per ``k`` baseline epochs, each arm's median);
- the **timer ratio**: (median baseline epoch + the monitor's own timers per epoch) / median baseline epoch;
- their difference: the monitor's cost that its timers do not see (target: within 0.03);
- where each arm's epoch goes (training steps, validation, audit, other), in wall and CPU time, so a cost outside
  the timers shows in the phase it lands in; and the process CPU time per epoch (less noisy under load);
- a **within-fit estimate** of both ratios (``--paired-fits``, every-epoch configurations): monitored fits auditing
  every third epoch, each audited epoch and the one after it compared with the clean epoch next to them. On a shared
  machine whose load swings whole fits by 15-30%, it is the figure that can resolve a few per cent.

    python benchmarks/monitor_overhead.py                       # the issue's configuration, 4 rounds x 3 epochs
    python benchmarks/monitor_overhead.py --threads 1           # on a loaded machine (see the note it prints)
    python benchmarks/monitor_overhead.py --features confidence,loss,gradient_norms --every 5
    python benchmarks/monitor_overhead.py --quick               # 12k training images, 2k audit pool
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_mia.callbacks import MembershipInferenceMonitor  # noqa: E402
from lightning_mia.data import MNISTDataModule, SyntheticDataModule  # noqa: E402
from lightning_mia.module import ImageClassifier  # noqa: E402
from lightning_mia.protocols import StandardProtocol  # noqa: E402

TARGET_RATIO = 1.10  # the target for the default configuration
TARGET_GAP = 0.03  # epoch ratio - timer ratio
QUANTITIES = ("wall", "cpu", "gc", "faults", "ctxsw")


class _GCTimer:
    """Time spent in Python's cyclic garbage collector (all generations), via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total, self._t = 0.0, None

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.total += time.perf_counter() - self._t
            self._t = None


GC = _GCTimer()


def _now() -> Dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter(), "cpu": time.process_time(), "gc": GC.total, "faults": float(ru.ru_minflt),
            "ctxsw": float(ru.ru_nivcsw)}


def _delta(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    return {k: b[k] - a[k] for k in a}


class PhaseTimer(pl.Callback):
    """Wall, process-CPU and GC time of each training epoch and its phases: ``train`` (epoch start to the
    epoch-end validation), ``val`` (validation without the audit), ``audit`` (the monitor's epoch-end hook, between
    the :meth:`around` callbacks) and ``rest`` (to the end of the last callback's ``on_train_epoch_end``). Put it
    first in the callback list, and ``around()``'s two callbacks just before and after the monitor."""

    def __init__(self) -> None:
        self.epochs: List[Dict[str, Any]] = []
        self._m: Dict[str, Dict[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._m = {"start": _now()}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "start" in self._m:
            self._m["val"] = _now()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "start" in self._m:
            self._m["val_end"] = _now()

    def around(self):
        timer = self

        class Before(pl.Callback):
            def on_validation_epoch_end(self, trainer, pl_module) -> None:
                if not trainer.sanity_checking:
                    timer._m["audit"] = _now()

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if "val" not in timer._m:  # no validation: the monitor audits here
                    timer._m["audit"] = _now()

        class After(pl.Callback):
            def on_validation_epoch_end(self, trainer, pl_module) -> None:
                if not trainer.sanity_checking:
                    timer._m["audit_end"] = _now()

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                m, end = timer._m, _now()
                if "val" not in m:
                    m["audit_end"] = end
                train_end = m.get("val", m["audit"])
                audit = _delta(m["audit"], m["audit_end"])
                val = {k: v - audit[k] for k, v in _delta(train_end, m.get("val_end", train_end)).items()} \
                    if "val" in m else {k: 0.0 for k in audit}
                timer.epochs.append({"epoch": trainer.current_epoch, "total": _delta(m["start"], end),
                                     "train": _delta(m["start"], train_end), "val": val, "audit": audit,
                                     "rest": _delta(m.get("val_end", m["audit_end"]), end)})

        return Before(), After()


def datamodule(quick: bool):
    try:
        dm = MNISTDataModule(dataset="fashion_mnist", batch_size=64, heldout_subset=2000 if quick else None,
                             train_subset=12000 if quick else None)
        dm.setup("fit")
        return dm, "Fashion-MNIST"
    except Exception as err:  # no data installed: same shapes, synthetic
        print(f"(Fashion-MNIST not available: {err.__class__.__name__}; using synthetic 28x28 data)")
        n = 12000 if quick else 60000
        return SyntheticDataModule(input_shape=(1, 28, 28), num_classes=10, n_train=n,
                                   n_heldout=2000 if quick else 10000, batch_size=64), "synthetic"


def fit(args, monitor: bool, every: Optional[int] = None, epochs: Optional[int] = None) -> Dict[str, Any]:
    every, epochs = every or args.every, epochs or args.epochs
    torch.manual_seed(0)
    dm, _ = datamodule(args.quick)
    timer = PhaseTimer()
    before, after = timer.around()
    callbacks: List[pl.Callback] = [timer, before]
    mon: Optional[MembershipInferenceMonitor] = None
    if monitor:
        pool = 2000 if args.quick else args.pool
        mon = MembershipInferenceMonitor(
            every_n_epochs=every, features=args.features, attacks=args.attacks,
            n_members=pool * 5 // 6, n_nonmembers=pool // 6, protocol=StandardProtocol(repeats=1),
            verbose=False, report_at_end=False, log_histograms=False, exposed_top_k=args.exposed_top_k)
        callbacks.append(mon)
    callbacks.append(after)
    with tempfile.TemporaryDirectory() as d:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                             default_root_dir=d, logger=pl.loggers.TensorBoardLogger(d), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(ImageClassifier("lenet", optimizer="adam", lr=1e-3, betas=(0.5, 0.99)), datamodule=dm)
    audits = {t["epoch"]: t for t in (mon.timings if mon else [])}
    out = []
    for e in timer.epochs[1:]:  # epoch 0 pays one-off warm-up costs (imports, first audit, data loader start)
        t = audits.get(e["epoch"])
        e["audited"] = t is not None
        e["timers"] = 0.0 if t is None else t["extract_s"] + t["attack_s"] + t["write_s"]
        e["timer_parts"] = {} if t is None else {k: t[k] for k in ("extract_s", "attack_s", "write_s")}
        out.append(e)
    return {"monitor": monitor, "epochs": out}


def med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(args, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    base = [e for r in runs if not r["monitor"] for e in r["epochs"]]
    mon = [e for r in runs if r["monitor"] for e in r["epochs"]]
    aud = [e for e in mon if e["audited"]]
    rest = [e for e in mon if not e["audited"]]
    k = args.every
    b_wall = med([e["total"]["wall"] for e in base])
    b_cpu = med([e["total"]["cpu"] for e in base])

    def arm(key: str, sub: str = "total") -> float:
        """Median monitored epoch over one audit period (k epochs, one audited), per epoch."""
        a = med([e[sub][key] for e in aud])
        if k == 1 or not rest:
            return a
        return (a + (k - 1) * med([e[sub][key] for e in rest])) / k

    m_wall, m_cpu = arm("wall"), arm("cpu")
    timers = med([e["timers"] for e in aud]) / k
    s = {"epoch_ratio": m_wall / b_wall, "timer_ratio": (b_wall + timers) / b_wall,
         "cpu_ratio": m_cpu / b_cpu, "base_epoch_s": b_wall, "monitor_epoch_s": m_wall, "timers_per_epoch_s": timers,
         "n_base": len(base), "n_monitor": len(mon), "n_audited": len(aud)}
    s["gap"] = s["epoch_ratio"] - s["timer_ratio"]
    # the same ratio within each round (a baseline fit and the monitored fit next to it): its spread shows how much
    # of a difference the machine's load drift alone makes
    s["round_ratios"] = []
    for i in range(0, len(runs) - 1, 2):
        pair = {r["monitor"]: r["epochs"] for r in runs[i:i + 2]}
        if len(pair) == 2:
            mw = [e["total"]["wall"] for e in pair[True]]
            bw = [e["total"]["wall"] for e in pair[False]]
            s["round_ratios"].append((sum(mw) / len(mw)) / (sum(bw) / len(bw)))
    s["parts"] = {p: med([e["timer_parts"][p] for e in aud]) for p in ("extract_s", "attack_s", "write_s")}
    s["phases"] = {}
    for ph in ("train", "val", "audit", "rest"):
        s["phases"][ph] = {"base": {q: med([e[ph][q] for e in base]) for q in QUANTITIES},
                           "monitor": {q: arm(q, ph) for q in QUANTITIES}}
    return s


PERIOD = 3  # the within-fit estimate: an audited epoch, the one after it, then a clean one


def paired(args) -> Dict[str, Any]:
    """The drift-robust estimate: monitored fits auditing every third epoch (``PERIOD``). Within each period of three
    consecutive epochs, the audited epoch ``a`` and the next one ``s`` (where a cost the audit leaves behind would
    land) are compared with the clean epoch ``c`` that follows, about 25 s later, so the machine's load drift, which
    swings whole fits by 15-30% here, mostly cancels. Per period: epoch ratio ``(a + s - c) / c`` (what auditing
    every epoch costs), timer ratio ``(c + timers) / c``; medians over the periods."""
    epochs = 3 * PERIOD + PERIOD  # audits at epochs 2, 5, 8, 11 (and 0, not counted): three whole periods
    ratios, timer_ratios = [], []
    for _ in range(args.paired_fits):
        run = fit(args, True, every=PERIOD, epochs=epochs)
        by_epoch = {e["epoch"]: e for e in run["epochs"]}
        for a in range(PERIOD - 1, epochs - PERIOD, PERIOD):
            ta, ts, tc = (by_epoch[a + i]["total"]["wall"] for i in range(3))
            if not (by_epoch[a]["audited"] and not by_epoch[a + 1]["audited"] and not by_epoch[a + 2]["audited"]):
                raise RuntimeError(f"unexpected audit epochs around epoch {a}")
            ratios.append((ta + ts - tc) / tc)
            timer_ratios.append((tc + by_epoch[a]["timers"]) / tc)
    return {"epoch_ratio": med(ratios), "timer_ratio": med(timer_ratios), "gap": med(ratios) - med(timer_ratios),
            "period_ratios": ratios, "period_timer_ratios": timer_ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4,
                   help="fits per arm, interleaved ABBA (default 4; an even count balances the arms' positions)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is not counted (default 3)")
    p.add_argument("--features", default="confidence", help="comma-separated monitor features")
    p.add_argument("--attacks", default="logistic_regression", help="comma-separated monitor attacks")
    p.add_argument("--every", type=int, default=1, help="the monitor's every_n_epochs")
    p.add_argument("--pool", type=int, default=10000, help="audit pool size (5:1 members:non-members)")
    p.add_argument("--exposed-top-k", type=int, default=16, help="the monitor's exposed_top_k (16 = its default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="12k training images, 2k audit pool")
    p.add_argument("--paired-fits", type=int, default=2,
                   help=f"monitored fits of {4 * PERIOD} epochs for the within-fit estimate (0 = skip; default 2)")
    p.add_argument("--json", default=None, help="write every epoch's figures and the summary here")
    args = p.parse_args()
    args.features = [f for f in args.features.split(",") if f]
    args.attacks = [a for a in args.attacks.split(",") if a]
    if args.every > 1 and args.epochs < 3:
        p.error("--every > 1 needs --epochs >= 3 (audited and unaudited epochs after the first)")
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is not counted)")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.callbacks.append(GC)
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: torch's OpenMP threads spin "
              "while they wait for a descheduled peer, which made 2-thread LeNet steps 6-12x slower here (both "
              "arms alike); --threads 1 or OMP_WAIT_POLICY=PASSIVE measure the monitor in minutes, not hours")
    _, name = datamodule(args.quick)
    runs, load = [], []
    for r in range(args.rounds):
        for monitor in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA: linear drift cancels
            load.append(os.getloadavg()[0])
            runs.append(fit(args, monitor))
            load.append(os.getloadavg()[0])
    s = summarise(args, runs)
    if args.paired_fits and args.every == 1:
        load.append(os.getloadavg()[0])
        s["paired"] = paired(args)
        load.append(os.getloadavg()[0])
    s["load_1min"] = [min(load), max(load)]
    what = f"{'+'.join(args.features)} x {'+'.join(args.attacks)}, every {args.every} epoch(s)"
    print(f"data: {name}, LeNet, threads={torch.get_num_threads()}, {args.rounds} rounds x {args.epochs} epochs per "
          f"arm ({s['n_base']} baseline / {s['n_monitor']} monitored epochs counted, {s['n_audited']} audited); "
          f"load average (1 min) {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    print(f"monitor: {what}, pool {2000 if args.quick else args.pool}, exposed_top_k {args.exposed_top_k}")
    print(f"median epoch without monitor: {s['base_epoch_s']:.2f}s   with monitor: {s['monitor_epoch_s']:.2f}s")
    parts = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in s["parts"].items())
    print(f"monitor timers per audit: {parts}  ->  {s['timers_per_epoch_s']:.2f}s per epoch")
    print("phase medians (wall s, CPU s, GC s, minor page faults k, involuntary context switches k):")
    print("           ---- without monitor ----------   |   ---- with monitor -------------")
    for ph, v in s["phases"].items():
        row = [f"{x['wall']:7.2f} {x['cpu']:7.2f} {x['gc']:6.3f} {x['faults'] / 1e3:6.1f} {x['ctxsw'] / 1e3:5.1f}"
               for x in (v["base"], v["monitor"])]
        print(f"  {ph:6s} {row[0]}   |  {row[1]}")
    print(f"process CPU time ratio: {s['cpu_ratio']:.3f}x;   per-round epoch ratios (load drift): "
          + " ".join(f"{x:.3f}" for x in s["round_ratios"]))
    print(f"timer ratio: {s['timer_ratio']:.3f}x (baseline epoch + the monitor's timers)")
    hide = (s["parts"]["attack_s"] + s["parts"]["write_s"]) / args.every / s["base_epoch_s"]
    print(f"overlapping the attack fits and writes with the next epoch could hide at most {100 * hide:.1f}% of an "
          "epoch (their timers; extraction needs the model of its own epoch)")
    print(f"epoch-time ratio: {s['epoch_ratio']:.3f}x   difference epoch - timer: {s['gap']:+.3f} "
          f"(target <= {TARGET_RATIO:.2f}x, difference within {TARGET_GAP})")
    if "paired" in s:
        pr = s["paired"]
        print(f"within-fit estimate ({len(pr['period_ratios'])} periods of audited / next / clean epoch): epoch ratio "
              f"{pr['epoch_ratio']:.3f}x, timer ratio {pr['timer_ratio']:.3f}x, difference {pr['gap']:+.3f}; "
              "per period: " + " ".join(f"{x:.3f}" for x in pr["period_ratios"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "summary": s, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
