"""Shared pytest setup: the tests directory on ``sys.path`` (for ``registry``), a deterministic
seed before every test, the ``float64`` fixture and ``perturb`` helper of the mathematical tests, and hypothesis profiles ("default": quick; ``--hypothesis-profile=thorough``)."""
import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    """Tests that check mathematics run in float64; the default dtype is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def perturb(module, std, seed=0):
    """Add ``std * N(0, 1)`` noise (fixed seed) to every parameter, in place; returns ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module
