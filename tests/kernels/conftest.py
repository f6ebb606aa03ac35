"""Fixtures of the kernel tests."""

import numpy as np
import pytest
import torch

# Random inputs come from one fixed seed, not the clock: a failure reproduces as it was seen.
SEED = 20240611


@pytest.fixture
def seed() -> int:
    """torch's generator seeded with SEED (a failure message names it)."""
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture
def rng(seed) -> tuple[np.random.Generator, int]:
    """(a numpy generator, its seed), torch's generator seeded alike."""
    return np.random.default_rng(seed), seed
