"""Inputs that are not one tensor: dict (text-like) batches are moved, fed and audited; input-space features say
they need a float tensor; the overlap check hashes nested inputs by content."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lightning_mia import compat
from lightning_mia.features import extract_features
from lightning_mia.protocols import StandardProtocol
from tests.test_lightning_namespaces import NAMESPACES, flavour

VOCAB, LENGTH, CLASSES = 40, 12, 3


class TokenDataset(Dataset):
    """Random token sequences with random labels (only memorisable), items ``({input_ids, attention_mask}, y, i)``."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.y = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i], torch.tensor(i)


def text_model(base):
    class TextModel(base):
        """Embedding + masked mean-pool + Linear, called as forward(input_ids=..., attention_mask=...)."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.classifier = nn.Linear(16, CLASSES)
            self.transfers = 0

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
            pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
            return self.classifier(pooled)

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            self.transfers += 1
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

        def training_step(self, batch, _):
            inputs, y = batch[0], batch[1]
            return F.cross_entropy(self(**inputs), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=5e-2)

    return TextModel


def _audit_hashes_nested_inputs():
    """Whether the overlap check (lightning_mia.audit) tells dict samples apart (it hashed object pointers)."""
    from lightning_mia.audit import check_nonmembers_unseen

    try:
        return check_nonmembers_unseen(TokenDataset(30, 0), TokenDataset(30, 1), np.arange(30)) == 0
    except ValueError:
        return False


def _fingerprint_reads_nested_inputs():
    from lightning_mia import fingerprint

    try:
        fingerprint.dataset_digest(TokenDataset(4, 0))
    except TypeError:
        return False
    return True


@pytest.fixture
def nested_fingerprint():
    """Until lightning_mia/fingerprint.py hashes nested inputs (the edit proposed to the lead), stand in for it:
    the resume fingerprint is not what these tests are about. A no-op once the edit is in."""
    if _fingerprint_reads_nested_inputs():
        yield
        return
    from lightning_mia import fingerprint

    original = fingerprint._input_bytes

    def _input_bytes(dataset, p):
        x = dataset[int(p)][0]
        if not hasattr(x, "detach") and not isinstance(x, np.ndarray):
            return compat.input_bytes(x)
        return original(dataset, p)

    fingerprint._input_bytes = _input_bytes
    try:
        yield
    finally:
        fingerprint._input_bytes = original


def _fit(tmp_path, ns, features, check_overlap=False, epochs=3):
    pkg, _, Monitor = flavour(ns)
    model = text_model(pkg.LightningModule)()
    train, held = TokenDataset(96, 0), TokenDataset(96, 1)
    monitor = Monitor(member_dataset=train, nonmember_dataset=held, features=features,
                      attacks=["threshold", "logistic_regression"], protocol=StandardProtocol(repeats=1), ratio=1.0,
                      verbose=False, report_at_end=False, exposed_top_k=0, check_overlap=check_overlap,
                      every_n_epochs=epochs)
    trainer = pkg.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[monitor],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=16, shuffle=True))
    return model, monitor


TEXT_FEATURES = ["confidence", "loss", {"name": "intermediate", "layers": [-1]},
                 {"name": "gradient_norms", "wrt": ["weights"]}]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_dict_inputs_audited_with_logit_intermediate_and_weight_gradient_features(tmp_path, ns, nested_fingerprint):
    model, monitor = _fit(tmp_path, ns, TEXT_FEATURES)
    d = monitor.last_result.data
    assert set(d.features) == {"confidence", "loss", "intermediate", "gradient_norms"}
    assert d.features["intermediate"].shape[1] == 16 and d.features["gradient_norms"].shape[1] == 7
    for values in d.features.values():
        assert np.isfinite(values).all()
    assert model.transfers > 0  # the audit moved its batches with the module's own hook
    # the audit's losses are the model's on those samples
    m = np.flatnonzero(d.is_member)
    ds = TokenDataset(96, 0)
    ids = torch.stack([ds[int(p)][0]["input_ids"] for p in d.position[m]])
    mask = torch.stack([ds[int(p)][0]["attention_mask"] for p in d.position[m]])
    with torch.no_grad():
        ref = F.cross_entropy(model.eval()(input_ids=ids, attention_mask=mask), ds.y[d.position[m]], reduction="none")
    np.testing.assert_allclose(d.loss[m], ref.numpy(), rtol=1e-5, atol=1e-6)
    # weight-gradient statistics agree with one sample's own backward
    i = int(m[0])
    model.zero_grad()
    x0 = ds[int(d.position[i])][0]
    F.cross_entropy(model(input_ids=x0["input_ids"][None], attention_mask=x0["attention_mask"][None]),
                    ds.y[d.position[i]][None]).backward()
    l2 = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
    from lightning_mia.features.gradients import STAT_NAMES

    assert d.features["gradient_norms"][i, STAT_NAMES.index("l2")] == pytest.approx(l2, rel=1e-4)
    rows = [r for r in monitor.last_result.rows if r["slice"] == "all" and r["feature"] == "loss"]
    assert rows and all(np.isfinite(r["balanced_accuracy"]) for r in rows)


@pytest.mark.xfail(not _audit_hashes_nested_inputs(), strict=True,
                   reason="needs the audit.py call site of lightning_mia.compat.hash_inputs (see the report)")
@pytest.mark.parametrize("ns", NAMESPACES)
def test_overlap_check_on_dict_inputs(tmp_path, ns, nested_fingerprint):
    model, monitor = _fit(tmp_path, ns, ["loss"], check_overlap=True, epochs=1)
    assert monitor.last_result is not None


@pytest.mark.parametrize("feature", ["gradient_norms", {"name": "gradient_norms", "wrt": "input"},
                                     {"name": "boundary_distance", "preset": "fast"}])
def test_input_space_features_say_they_need_a_float_tensor(tmp_path, feature, nested_fingerprint):
    with pytest.raises(ValueError, match="needs the model's input to be one floating-point tensor.*dict with keys"):
        _fit(tmp_path, compat.default_namespace(), ["loss", feature], epochs=1)


def test_mia_forward_hook_and_plain_script():
    base = text_model(nn.Module)()
    calls = []

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, ids, mask):
            return self.net(ids, mask)

        def mia_forward(self, inputs):
            calls.append(len(inputs["input_ids"]))
            return self(inputs["input_ids"], inputs["attention_mask"])

    ds = TokenDataset(20, 3)
    hooked = extract_features(Hooked(), "loss", ds, batch_size=8)
    plain = extract_features(base, "loss", ds, batch_size=8)  # forward(**inputs)
    np.testing.assert_allclose(hooked, plain, rtol=1e-6)
    assert calls[:3] == [8, 8, 4]
    inter = extract_features(Hooked(), {"name": "intermediate", "layers": ["net.classifier"]}, ds)
    assert inter.shape == (20, CLASSES)


def test_hash_inputs_by_content():
    a, b = TokenDataset(5, 0), TokenDataset(5, 1)
    digests = {compat.hash_inputs(a[i][0]) for i in range(5)}
    assert len(digests) == 5 and not digests & {compat.hash_inputs(b[i][0]) for i in range(5)}
    assert compat.hash_inputs(a[2][0]) == compat.hash_inputs({k: v.clone() for k, v in reversed(a[2][0].items())})
    x = torch.arange(6.0).reshape(2, 3)
    assert compat.input_bytes(x) == x.numpy().tobytes()  # a tensor hashes as its raw bytes, as before
    assert compat.hash_inputs((x, x)) != compat.hash_inputs([x, x]) != compat.hash_inputs({"a": x, "b": x})
    assert compat.hash_inputs({"a": x.to(torch.bfloat16)}) != compat.hash_inputs({"a": x})
    with pytest.raises(TypeError, match="Cannot hash an input of type object"):
        compat.hash_inputs({"a": object()})
