import os
import warnings

import pytest
import torch

# Two cores shared by everything: keep torch from oversubscribing them in tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _quiet_lightning_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        yield
