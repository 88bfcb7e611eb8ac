"""Does training run slower right after an audit? A cost the monitor leaves behind (busy BLAS workers, a polluted
allocator or cache, a background thread) would land in the training steps that follow it, outside the monitor's
timers.

One process, plain PyTorch (LeNet, Adam, Fashion-MNIST or synthetic 28x28 data): ``--reps`` repetitions in a seeded
random order of "audit" (the monitor's audit pass over a 10k pool -- ``extract_pass`` of members and non-members
-- and a logistic-regression attack through ``audit_arrays``) or "nothing", each between two timed chunks of
``--steps`` training steps. Per repetition: (chunk after) / (chunk before), so the machine's load drift, slower than
one repetition (about 3 s), cancels. Prints the median of that ratio with and without the audit and their ratio
(target: 1.00, i.e. no after-effect).

    python benchmarks/audit_after_effect.py               # 1 thread, 25 + 25 repetitions
    python benchmarks/audit_after_effect.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_mia.auditor import audit_arrays  # noqa: E402
from lightning_mia.data import MNISTDataModule, SyntheticDataModule  # noqa: E402
from lightning_mia.extraction import extract_pass  # noqa: E402
from lightning_mia.features import FEATURES  # noqa: E402
from lightning_mia.models import build_model  # noqa: E402


def datamodule():
    try:
        dm = MNISTDataModule(dataset="fashion_mnist", batch_size=64)
        dm.setup("fit")
        return dm, "Fashion-MNIST"
    except Exception as err:  # no data installed: same shapes, synthetic
        print(f"(Fashion-MNIST not available: {err.__class__.__name__}; using synthetic 28x28 data)")
        dm = SyntheticDataModule(input_shape=(1, 28, 28), num_classes=10, n_train=60000, n_heldout=10000,
                                 batch_size=64)
        dm.setup("fit")
        return dm, "synthetic"


class Trainer:
    """The training steps, endlessly over a shuffled loader."""

    def __init__(self, model: torch.nn.Module, dataset) -> None:
        self.model, self.opt = model, torch.optim.Adam(model.parameters(), 1e-3)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
        self.it = iter(self.loader)

    def steps(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            try:
                x, y, _ = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                x, y, _ = next(self.it)
            self.opt.zero_grad()
            torch.nn.functional.cross_entropy(self.model(x), y).backward()
            self.opt.step()
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=25, help="repetitions of each arm (default 25)")
    p.add_argument("--steps", type=int, default=150, help="training steps per timed chunk (default 150)")
    p.add_argument("--pool", type=int, default=10000, help="audit pool size (5:1 members:non-members)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dm, name = datamodule()
    members, nonmembers = dm.member_dataset(), dm.nonmember_dataset()
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, input_shape=(1, 28, 28))
    trainer = Trainer(model, dm.train_dataset())
    features = {s.tag: FEATURES.build(s) for s in FEATURES.resolve_all(["confidence"])}
    rng = np.random.default_rng(0)
    pos_m = rng.choice(len(members), min(len(members), args.pool * 5 // 6), replace=False)
    pos_n = rng.choice(len(nonmembers), min(len(nonmembers), args.pool // 6), replace=False)

    def audit() -> float:
        t = time.perf_counter()
        a = extract_pass(model, members, pos_m, features, is_member=True)
        b = extract_pass(model, nonmembers, pos_n, features)
        audit_arrays({"confidence": np.concatenate([a.features["confidence"], b.features["confidence"]])},
                     np.concatenate([a.is_member, b.is_member]), np.concatenate([a.correct, b.correct]),
                     np.concatenate([a.label, b.label]), attacks=["logistic_regression"])
        return time.perf_counter() - t

    trainer.steps(200)  # warm-up, and one audit so first-call costs (imports, allocations) are paid
    audit()
    order = [True, False] * args.reps
    random.Random(1).shuffle(order)
    ratios = {True: [], False: []}
    audit_s = []
    for do_audit in order:
        before = trainer.steps(args.steps)
        if do_audit:
            audit_s.append(audit())
        ratios[do_audit].append(trainer.steps(args.steps) / before)
    with_a, without = statistics.median(ratios[True]), statistics.median(ratios[False])
    print(f"data: {name}, LeNet, threads={torch.get_num_threads()}, {args.reps} + {args.reps} repetitions of "
          f"{args.steps} + {args.steps} steps; audit {statistics.median(audit_s):.2f} s (pool {args.pool})")
    print(f"median (steps after) / (steps before): after an audit {with_a:.3f}, after nothing {without:.3f}")
    print(f"after-effect of an audit on training: {with_a / without:.3f}x (target 1.00x)")


if __name__ == "__main__":
    main()
