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


# CI runs hypothesis derandomized (the same examples every run, checked before landing); local runs
# explore new random examples each time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
