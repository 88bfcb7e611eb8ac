"""The run-directory contract in one place: every file name, predictions-file key, TensorBoard tag and slice name.

Nothing else in the package spells a file name or a tag: the monitor's writer, the report, the study and the
tests all ask this module. A run directory (the logger's ``log_dir``) holds::

    mia/audit.json                    the audit pool (member / non-member positions and indices, seed)
    mia/history.csv                   one row per (epoch, feature, attack, slice), see HISTORY_COLUMNS
    mia/predictions/epoch_NNNN.npz    per-sample scores of an audited epoch (save_predictions)
    mia/exposed/epoch_NNNN.csv|png    the most exposed members and false alarms of an audited epoch
    mia/early_stopping.json           EarlyStoppingComparison's record of the validation metric
    mia/early_stopping.csv            the comparison table written by the report
    mia/report.md, mia/figures/*.png  the report

Example:
    >>> layout = RunLayout("runs/demo/version_0")
    >>> layout.history.endswith("mia/history.csv"), os.path.basename(layout.predictions(3))
    (True, 'epoch_0003.npz')
    >>> metric_tag("loss", "threshold", "all", "far")
    'mia/loss/threshold/all/far'
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, Tuple

#: Audit-sample slices: every sample, those the target model classifies correctly, and the rest.
SLICES: Tuple[str, ...] = ("all", "correct", "misclassified")

MIA_DIR = "mia"
AUDIT_JSON = "audit.json"
HISTORY_CSV = "history.csv"
PREDICTIONS_DIR = "predictions"
EXPOSED_DIR = "exposed"
EARLY_STOPPING_JSON = "early_stopping.json"
EARLY_STOPPING_CSV = "early_stopping.csv"
REPORT_MD = "report.md"
FIGURES_DIR = "figures"
_PREDICTION_RE = re.compile(r"epoch_(\d+)\.npz$")

#: Key columns of history.csv (strings / ints) -- everything else is numeric.
KEY_COLUMNS = ("epoch", "feature", "attack", "slice")
INT_COLUMNS = ("epoch", "n_members", "n_nonmembers", "repeats", "n_dropped")
STR_COLUMNS = ("feature", "attack", "slice")
#: The contracted history.csv columns, in file order; extra metric columns follow, sorted.
HISTORY_COLUMNS = (
    "epoch", "feature", "attack", "slice", "n_members", "n_nonmembers", "repeats",
    "balanced_accuracy", "balanced_accuracy_std", "far", "far_std", "accuracy", "accuracy_std", "tpr", "tpr_std",
    "tnr", "precision_member", "recall_member", "precision_nonmember", "recall_nonmember", "f1", "advantage",
    "auc", "auc_std", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
    "naive_balanced_accuracy", "naive_far", "train_acc", "test_acc", "train_loss", "test_loss",
)
#: Target-model columns repeated on every history row (and logged as ``target/{name}``).
TARGET_COLUMNS = ("train_acc", "test_acc", "train_loss", "test_loss")

#: Per-sample arrays of every predictions file.
PREDICTION_ARRAYS = ("index", "is_member", "correct", "label", "pred", "fold")


class RunLayout:
    """Paths of one run directory's ``mia/`` files."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = str(run_dir)
        self.mia = os.path.join(self.run_dir, MIA_DIR)

    def _p(self, name: str) -> str:
        return os.path.join(self.mia, name)

    @property
    def audit_json(self) -> str:
        return self._p(AUDIT_JSON)

    @property
    def history(self) -> str:
        return self._p(HISTORY_CSV)

    @property
    def early_stopping_json(self) -> str:
        return self._p(EARLY_STOPPING_JSON)

    @property
    def early_stopping_csv(self) -> str:
        return self._p(EARLY_STOPPING_CSV)

    @property
    def report(self) -> str:
        return self._p(REPORT_MD)

    @property
    def figures(self) -> str:
        return self._p(FIGURES_DIR)

    @property
    def predictions_dir(self) -> str:
        return self._p(PREDICTIONS_DIR)

    def predictions(self, epoch: int) -> str:
        return os.path.join(self.predictions_dir, f"epoch_{int(epoch):04d}.npz")

    def exposed(self, epoch: int, ext: str = "csv") -> str:
        """``exposed/epoch_NNNN.csv`` (the most exposed samples) and ``.png`` (their picture)."""
        return os.path.join(self._p(EXPOSED_DIR), f"epoch_{int(epoch):04d}.{ext}")

    def prediction_files(self) -> Dict[int, str]:
        """``{epoch: path}`` of the predictions files present, sorted by epoch."""
        out = {}
        for p in glob.glob(os.path.join(self.predictions_dir, "epoch_*.npz")):
            m = _PREDICTION_RE.match(os.path.basename(p))
            if m:
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))


# ---- predictions-file keys -----------------------------------------------------------------------------------
def score_key(feature: str, attack: str) -> str:
    """Array name of an attack's per-sample scores in a predictions file."""
    return f"score__{feature}__{attack}"


def fold_key(feature: str, attack: str) -> str:
    """Array name of an attack's split (0 attack training, 1 evaluation, -1 dropped)."""
    return f"fold__{feature}__{attack}"


def ood_score_key(source: str, feature: str, attack: str) -> str:
    return f"ood_score__{source}__{feature}__{attack}"


def ood_threshold_key(source: str, feature: str, attack: str) -> str:
    return f"ood_threshold__{source}__{feature}__{attack}"


# ---- TensorBoard / logger tags -------------------------------------------------------------------------------
def metric_tag(feature: str, attack: str, slice_: str, metric: str) -> str:
    """Scalar tag of an attack metric."""
    return f"mia/{feature}/{attack}/{slice_}/{metric}"


def score_tag(feature: str, attack: str, group: str) -> str:
    """Histogram tag of attack scores; ``group`` is ``member`` or ``nonmember``."""
    return f"mia/{feature}/{attack}/scores/{group}"


def target_tag(name: str) -> str:
    """Scalar tag of a target-model metric (``train_acc``, ``test_loss``, ...)."""
    return f"target/{name}"


def early_stopping_text_tag(feature: str, attack: str) -> str:
    return f"mia/{feature}/{attack}/early_stopping"


def exposed_tag(feature: str, attack: str) -> str:
    return f"mia_exposed/{feature}/{attack}"


def roc_tag(slice_: str) -> str:
    return f"mia_roc/{slice_}"


def figure_tag(name: str) -> str:
    return f"mia_figures/{name}"


def hparam_tag(*parts: str) -> str:
    return "hparams/" + "/".join(parts)


#: The short progress-bar name of the headline metric (balanced accuracy on all samples, first feature/attack).
PROGRESS_BAR_METRIC = "mia_bal_acc"
