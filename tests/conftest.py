"""Shared test setup: headless matplotlib, quiet fastai import, small synthetic stores."""
import os
import warnings

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np
import pytest
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def one_torch_thread():
    "Tiny models: one thread (two threads on a loaded 2-core machine spin-wait ~30x slower)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
