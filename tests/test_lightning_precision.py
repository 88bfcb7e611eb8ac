"""The audit runs the model in the trainer's precision: every precision Lightning offers on CPU."""
import copy
import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_mia import compat
from lightning_mia.features import extract_features
from lightning_mia.protocols import StandardProtocol
from tests.test_lightning_namespaces import NAMESPACES, _dm, flavour

# 16-mixed: AMP with float16 is GPU-only; on CPU Lightning runs it as bf16-mixed (and warns), which is what is tested
PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"]
ON_CPU = {"16-mixed": "bf16-mixed"}
FEATURES = ["confidence", "loss", {"name": "intermediate", "layers": [-1]}, "gradient_norms"]


def _fit(tmp_path, ns, precision, features=FEATURES, **monitor_kwargs):
    pkg, ImageClassifier, Monitor = flavour(ns)
    monitor = Monitor(features=features, attacks=["threshold"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                      verbose=False, report_at_end=False, exposed_top_k=0, **monitor_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on CPU: "Using bf16-mixed instead"
        trainer = pkg.Trainer(max_epochs=1, accelerator="cpu", logger=False, precision=precision,
                              callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    # plain SGD: float16-true training with Adam's eps=1e-8 (0 in float16) diverges, which is not what is tested here
    model = ImageClassifier("lenet", optimizer="sgd", lr=0.05, momentum=0.0)
    dm = _dm()
    trainer.fit(model, datamodule=dm)
    return trainer, model, monitor, dm


def _members(monitor, dm):
    d = monitor.last_result.data
    m = np.flatnonzero(d.is_member & (d.source == 0))
    m = m[np.argsort(d.position[m])]
    ds = dm.member_dataset()
    x = torch.stack([ds[int(p)][0] for p in d.position[m]])
    y = torch.stack([ds[int(p)][1] for p in d.position[m]])
    return d, m, x, y


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("ns", NAMESPACES)
def test_audit_runs_in_the_trainers_precision(tmp_path, ns, precision):
    trainer, model, monitor, dm = _fit(tmp_path, ns, precision)
    plugin = trainer.precision_plugin
    assert plugin.precision == ON_CPU.get(precision, precision)
    d, m, x, y = _members(monitor, dm)
    # the audit's losses are the model's as the trainer runs it: converted inputs, its forward context
    model.eval()
    with torch.no_grad():
        with plugin.forward_context():
            logits = model(plugin.convert_input(x)).float()
        plain = model(x.to(next(model.parameters()).dtype)).float()
    ref = F.cross_entropy(logits, y, reduction="none").numpy()
    np.testing.assert_allclose(d.loss[m], ref, rtol=1e-5, atol=1e-6)
    if plugin.precision.endswith("-mixed"):  # autocast really was on: float32 gives other numbers
        assert not np.allclose(ref, F.cross_entropy(plain, y, reduction="none").numpy(), rtol=1e-6, atol=0)
    for tag, values in d.features.items():
        assert np.isfinite(values).all(), tag
    if plugin.precision in ("bf16-true", "16-true"):
        # autograd features on the float32 copy of the half-precision weights, with the float32 inputs
        twin = copy.deepcopy(model).float()
        want = extract_features(twin, "gradient_norms", (x, y))
        np.testing.assert_allclose(d.features["gradient_norms"][m], want, rtol=1e-4, atol=1e-6)
        assert all(p.dtype == getattr(torch, "bfloat16" if precision == "bf16-true" else "float16")
                   for p in model.parameters())  # the model itself is untouched


@pytest.mark.parametrize("ns", NAMESPACES)
def test_boundary_walk_on_a_bf16_true_model_runs_in_float32(tmp_path, ns):
    feats = [{"name": "boundary_distance", "preset": "fast", "max_steps": 50}]
    trainer, model, monitor, dm = _fit(tmp_path, ns, "bf16-true", features=feats, n_members=8, n_nonmembers=8)
    d, m, x, y = _members(monitor, dm)
    twin = copy.deepcopy(model).float()
    want = extract_features(twin, feats[0], (x, y))
    np.testing.assert_allclose(d.features["boundary_distance"][m], want, rtol=1e-4)


def test_audit_forward_describes_each_precision():
    pl = importlib.import_module(compat.default_namespace())
    for precision, grad_float32, grad_in_context in [("32-true", False, True), ("bf16-mixed", False, False),
                                                     ("bf16-true", True, False), ("64-true", False, True)]:
        trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False)
        f = compat.audit_forward(trainer, torch.nn.Linear(2, 2))
        assert f.float32_grad_model is grad_float32, precision
        assert (f.grad_context == f.context) is grad_in_context, precision
