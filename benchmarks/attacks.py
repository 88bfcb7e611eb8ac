"""Attack cost: fit + score time per attack, and its share of a LeNet Fashion-MNIST training epoch.

For an audit pool of n rows (default 10k) and d features (10 = a confidence vector, 100 = a wide
intermediate layer), each registered attack (default options) is fitted on 80% and scores the other
20%, as the protocol does every audited epoch; one full ``protocol.evaluate`` call (3 slices, 3 eval
ratios, baselines) is timed for the cheap attacks.  The reference epoch is LeNet trained for one epoch
on 60k synthetic 28x28 images (Fashion-MNIST's size; pixel values do not change the cost), batch 64.

    python benchmarks/attacks.py            # n = 10k rows, 60k-image epoch
    python benchmarks/attacks.py --quick    # n = 4k rows, 12k-image epoch scaled to 60k
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mia.attacks import build_attack, evaluate  # noqa: E402

ATTACK_SPECS = {
    "threshold": {"name": "threshold", "column": 0},
    "logistic_regression": "logistic_regression",
    "mlp": "mlp",
    "random_forest": "random_forest",
    "xgboost": "xgboost",
}


def _pool(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.5
    X = rng.normal(size=(n, d)) + 0.3 * member[:, None]
    correct = rng.random(n) < np.where(member, 0.95, 0.85)
    return X, member, correct


def time_attacks(n: int, dims, repeats: int):
    """Best-of-``repeats`` seconds of fit(80%) + score(20%) per attack and feature width."""
    out = {}
    Xw, yw, _ = _pool(200, 3)
    available = {}
    for name, spec in ATTACK_SPECS.items():  # warm-up: imports and first-call setup are not per-epoch costs
        try:
            build_attack(spec).fit(Xw, yw).score(Xw)
            available[name] = spec
        except ImportError as err:
            print(f"({name}: {err}; skipped)")
    for d in dims:
        X, y, _ = _pool(n, d)
        k = int(0.8 * n)
        for name, spec in available.items():
            best = float("inf")
            for r in range(repeats):
                t = time.perf_counter()
                attack = build_attack(spec, seed=r).fit(X[:k], y[:k])
                attack.score(X[k:])
                attack.predict(X[k:])
                best = min(best, time.perf_counter() - t)
            out[(name, d)] = best
    return out


def time_protocol(n: int, d: int, attack: str, repeats: int) -> float:
    X, member, correct = _pool(n, d)
    spec = ATTACK_SPECS[attack]
    best = float("inf")
    for r in range(repeats):
        t = time.perf_counter()
        evaluate(X, member, correct, None, spec, seed=r)
        best = min(best, time.perf_counter() - t)
    return best


def _lenet():
    try:
        from lightning_mia.models import build_model

        return build_model("lenet", num_classes=10, input_shape=(1, 28, 28)), "lightning_mia.models lenet"
    except Exception as err:  # models package not available: same architecture, local copy
        print(f"(build_model('lenet') unavailable: {err.__class__.__name__}: {err}; using a local LeNet)")
        model = nn.Sequential(
            nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 3), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )
        return model, "local LeNet copy"


def lenet_epoch_seconds(n_images: int, batch_size: int = 64) -> tuple:
    """Seconds for one training epoch over ``n_images`` synthetic 28x28 images (forward, backward, step)."""
    torch.manual_seed(0)
    model, source = _lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.rand(n_images, 1, 28, 28)
    y_all = torch.randint(0, 10, (n_images,))
    model.train()
    # Warm-up batch so one-time allocation does not count.
    loss = nn.functional.cross_entropy(model(x_all[:batch_size]), y_all[:batch_size])
    loss.backward()
    opt.zero_grad()
    t = time.perf_counter()
    perm = torch.randperm(n_images)
    for i in range(0, n_images, batch_size):
        idx = perm[i : i + batch_size]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
    return time.perf_counter() - t, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller pool and epoch (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (best of)")
    args = parser.parse_args()
    n = 4000 if args.quick else 10000
    repeats = args.repeats or (1 if args.quick else 2)
    epoch_images = 12000 if args.quick else 60000

    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    times = time_attacks(n, (10, 100), repeats)
    epoch, source = lenet_epoch_seconds(epoch_images)
    epoch_60k = epoch * 60000 / epoch_images
    print(f"\nLeNet epoch ({source}): {epoch:.2f} s for {epoch_images} images"
          + (f" -> {epoch_60k:.2f} s per 60k-image Fashion-MNIST epoch (scaled)" if epoch_images != 60000 else ""))

    print(f"\nfit (80%) + score (20%) of a {n}-row pool, default options, best of {repeats}:")
    print(f"{'attack':<22}{'d=10 [s]':>10}{'share':>9}{'d=100 [s]':>11}{'share':>9}")
    for name in ATTACK_SPECS:
        if (name, 10) not in times:
            continue
        t10, t100 = times[(name, 10)], times[(name, 100)]
        print(f"{name:<22}{t10:>10.3f}{t10 / epoch_60k:>9.1%}{t100:>11.3f}{t100 / epoch_60k:>9.1%}")

    print(f"\nfull protocol.evaluate (3 slices, ratios 5/1/0.2, baselines, 1 repeat) on {n} rows:")
    for attack in ("threshold", "logistic_regression"):
        for d in ((1,) if attack == "threshold" else (10, 100)):
            t = time_protocol(n, d, attack, repeats)
            print(f"  {attack:<20} d={d:<4} {t:.3f} s  ({t / epoch_60k:.1%} of a 60k LeNet epoch)")

    print(f"\none audited epoch, every attack on a 10-d and a 1-d feature ({n} rows), sequential vs threads:")
    seq = time_epoch_fit(n, n_jobs=1)
    par = time_epoch_fit(n, n_jobs=2)
    print(f"  n_jobs=1: {seq:.2f} s   n_jobs=2: {par:.2f} s   speed-up {seq / par:.2f}x "
          f"(epoch fit {seq / epoch_60k:.0%} -> {par / epoch_60k:.0%} of a 60k LeNet epoch)")


def time_epoch_fit(n: int, n_jobs: int) -> float:
    """Wall time of one monitor audit's attack work (``auditor.audit_arrays``) for all attacks."""
    from lightning_mia.auditor import audit_arrays
    from lightning_mia.protocols import StandardProtocol

    X, member, correct = _pool(n, 10)
    labels = np.random.default_rng(1).integers(0, 10, n)
    feats = {"confidence": X, "loss": X[:, :1]}
    specs = ["threshold", "logistic_regression", "mlp", "random_forest", "xgboost"]
    t0 = time.perf_counter()
    audit_arrays(feats, member, correct, labels, specs, StandardProtocol(repeats=1), n_jobs=n_jobs)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
