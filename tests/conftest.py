"""Shared pytest setup: the tests directory on ``sys.path`` (for ``registry``), a deterministic
seed before every test, and hypothesis profiles ("default": quick; ``--hypothesis-profile=thorough``)."""
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
