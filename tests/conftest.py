"""Shared test setup: headless matplotlib, quiet fastai import, small synthetic stores."""
import os
import warnings

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
