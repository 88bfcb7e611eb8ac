"""Every YAML under configs/ is a valid CLI config (parsed and instantiated, nothing trained, no data read), a
misspelt option anywhere is rejected, and the paper configs carry the recipes of their sources:

- LeNet: github.com/shrezaei/MI-Attack ``train_target_model.py`` (Keras Adam lr 1e-3, beta_1 0.5, beta_2 0.99,
  batch 64, inputs only divided by 255).
- AlexNet / ResNet / DenseNet: github.com/bearpaw/pytorch-classification ``TRAINING.md`` and ``cifar.py`` defaults.
"""
import copy
import functools
from pathlib import Path

import pytest
import yaml
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
from lightning_mia.callbacks.monitor import MembershipInferenceMonitor
from lightning_mia.cli import build_cli

# build_cli(args=...) under pytest: Lightning warns that pytest's own argv is also present; it is not used.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))
IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIGS]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CPU = sorted((ROOT / "configs" / "cpu").glob("*.yaml"))

# bearpaw/pytorch-classification TRAINING.md (+ cifar.py defaults: lr 0.1, momentum 0.9, --wd 5e-4, batch 128).
BEARPAW = {
    "alexnet": dict(weight_decay=5e-4, batch_size=128, epochs=164, milestones=[81, 122]),
    "resnet164": dict(weight_decay=1e-4, batch_size=128, epochs=164, milestones=[81, 122]),  # ResNet-110 command
    "densenet_bc_100": dict(weight_decay=1e-4, batch_size=64, epochs=300, milestones=[150, 225]),
}
# The recipe a CPU variant scales down: its model -> the bearpaw recipe it follows.
CPU_RECIPE = {"resnet20": "resnet164", "densenet_bc_40": "densenet_bc_100", "alexnet": "alexnet"}
# Throughputs on the 2-core CPU (docs/design.md §5, img/s while training); inference counted at twice that.
TRAIN_RATE = {"lenet": 12000, "alexnet": 1900, "resnet20": 450, "densenet_bc_40": 70}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever instantiation might write lands in tmp_path


@functools.lru_cache(maxsize=None)
def _cli(path: str):
    return build_cli(["--config", path], run=False)


def _monitor(cli) -> MembershipInferenceMonitor:
    (m,) = [c for c in cli.trainer.callbacks if isinstance(c, MembershipInferenceMonitor)]
    return m


def _es(cli) -> EarlyStoppingComparison:
    (e,) = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStoppingComparison)]
    return e


def test_expected_configs_exist():
    names = {p.name for p in PAPER}
    for model in ("alexnet", "resnet164", "densenet_bc_100"):
        for ds in ("cifar10", "cifar100"):
            assert f"{model}_{ds}.yaml" in names
    assert {"lenet_mnist.yaml", "lenet_fashion_mnist.yaml"} <= names
    assert {p.name for p in CPU} >= {"resnet20_cifar10.yaml", "densenet_bc_40_cifar10.yaml",
                                     "lenet_fashion_mnist.yaml", "alexnet_fashion_mnist.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_instantiates(path):
    cli = _cli(str(path))
    assert cli.model.hparams.model  # a registered name: ImageClassifier checks it at construction
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.trainer.logger.save_dir == "runs"
    _monitor(cli), _es(cli)


def test_logger_names_are_distinct():
    names = [_cli(str(p)).trainer.logger.name for p in CONFIGS]
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("path", PAPER + CPU, ids=[str(p.relative_to(ROOT / "configs")) for p in PAPER + CPU])
def test_monitor_and_early_stopping_settings(path):
    cli = _cli(str(path))
    mon, es = _monitor(cli), _es(cli)
    assert [s.tag for s in mon.features] == ["confidence", "loss"]
    assert [s.tag for s in mon.attacks] == ["threshold", "logistic_regression"]
    assert mon.save_predictions is True
    assert mon.protocol.eval_ratios == [5.0, 1.0, 0.2]
    # Audits spread over the whole run, enough of them for a curve (the last epoch is always audited).
    assert mon.every_n_epochs <= 10 and -(-cli.trainer.max_epochs // mon.every_n_epochs) >= 5
    assert es.monitor == "val_loss" and es.mode == "min" and es.patience == [3, 5, 10]


@pytest.mark.parametrize("path", [p for p in PAPER if p.name.startswith("lenet")], ids=lambda p: p.name)
def test_paper_lenet_recipe(path):
    cli = _cli(str(path))
    h, dm = cli.model.hparams, cli.datamodule
    assert h.model == "lenet" and h.optimizer == "adam" and h.lr == pytest.approx(1e-3)
    assert tuple(h.betas) == pytest.approx((0.5, 0.99)) and h.weight_decay == 0 and h.scheduler == "none"
    assert dm.batch_size == 64 and dm.normalize is False and dm.train_subset is None and dm.heldout_subset is None
    assert _monitor(cli).ratio == 5.0  # the paper's 5:1 members per non-member


@pytest.mark.parametrize("path", [p for p in PAPER if not p.name.startswith("lenet")], ids=lambda p: p.name)
def test_paper_cifar_recipe(path):
    cli = _cli(str(path))
    h, dm = cli.model.hparams, cli.datamodule
    ref = BEARPAW[h.model]
    assert path.stem == f"{h.model}_{dm.dataset}"
    assert (h.optimizer, h.lr, h.momentum, h.nesterov) == ("sgd", 0.1, 0.9, False)
    assert h.weight_decay == pytest.approx(ref["weight_decay"])
    assert h.scheduler == "multistep" and list(h.milestones) == ref["milestones"] and h.gamma == 0.1
    assert cli.trainer.max_epochs == ref["epochs"]
    assert dm.batch_size == ref["batch_size"] and dm.augment is True and dm.normalize is True
    assert dm.train_subset is None and dm.heldout_subset is None  # all 50,000 / 10,000 images
    assert str(dm.data_dir) == "data"
    assert _monitor(cli).ratio == 5.0


@pytest.mark.parametrize("path", CPU, ids=lambda p: p.name)
def test_cpu_variants_scale_the_recipe_and_fit_the_budget(path):
    cli = _cli(str(path))
    h, dm, mon = cli.model.hparams, cli.datamodule, _monitor(cli)
    epochs = cli.trainer.max_epochs
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    if h.model in CPU_RECIPE:  # bearpaw recipe with the LR drops at the same fractions of training
        ref = BEARPAW[CPU_RECIPE[h.model]]
        assert (h.optimizer, h.lr, h.momentum) == ("sgd", 0.1, 0.9)
        assert h.weight_decay == pytest.approx(ref["weight_decay"]) and dm.batch_size == ref["batch_size"]
        for ours, theirs in zip(h.milestones, ref["milestones"], strict=True):
            assert abs(ours - theirs / ref["epochs"] * epochs) <= 1
    else:
        assert h.model == "lenet" and h.optimizer == "adam" and dm.batch_size == 64
    # Rough wall time on 2 cores: training, validation on the held-out set, one audit pass per audited epoch.
    n_train = dm.train_subset
    n_val = dm.heldout_subset or 10_000
    n_pool = (mon.n_members or n_train) + (mon.n_nonmembers or min(n_val, int(n_train / mon.ratio)))
    rate = TRAIN_RATE[h.model]
    audits = -(-epochs // mon.every_n_epochs)
    seconds = epochs * (n_train + n_val / 2) / rate + audits * n_pool / (2 * rate)
    assert seconds <= 20 * 60, f"{path.name}: ~{seconds / 60:.0f} min on 2 CPU cores"


def _key_paths(node, prefix=()):
    """Every mapping key in a parsed YAML, as paths of keys (list items are not descended into)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _key_paths(v, prefix + (k,))


def _misspell(cfg, path):
    cfg = copy.deepcopy(cfg)
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1] + "x"] = node.pop(path[-1])
    return cfg


def _typo_cases():
    """One case per distinct option (per section and class), taken from the first config that uses it."""
    seen, cases = set(), []
    for p in CONFIGS:
        cfg = yaml.safe_load(p.read_text())
        for path in _key_paths(cfg):
            parent = cfg
            for k in path[:-1]:
                parent = parent[k]
            key = (path[:-1], parent.get("class_path") if path[-1] == "init_args" else None, path[-1],
                   cfg.get("data", {}).get("class_path") if path[:1] == ("data",) else None)
            if key not in seen:
                seen.add(key)
                cases.append(pytest.param(p, path, id=f"{p.stem}:{'.'.join(path)}"))
    return cases


@pytest.mark.parametrize("config,path", _typo_cases())
def test_misspelt_option_is_rejected(config, path, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_misspell(yaml.safe_load(config.read_text()), path)))
    with pytest.raises(SystemExit):
        build_cli(["--config", str(bad)], run=False)
    assert path[-1] + "x" in capsys.readouterr().err  # the message names the misspelt option


@pytest.mark.parametrize("old,new", [("[confidence, loss]", "[confidance, loss]"),
                                     ("[threshold, logistic_regression]", "[threshold, logistic_regresion]"),
                                     ("model: resnet20 ", "model: resnet21 "),
                                     ("dataset: cifar10", "dataset: cifar11")])
def test_misspelt_value_is_rejected(old, new, tmp_path):
    src = (ROOT / "configs" / "cpu" / "resnet20_cifar10.yaml").read_text()
    assert old in src
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace(old, new, 1))
    with pytest.raises((SystemExit, ValueError, KeyError)):
        build_cli(["--config", str(bad)], run=False)
