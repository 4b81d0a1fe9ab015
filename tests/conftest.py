"""Every test starts from the same random state, so none depends on which tests ran before it."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

# a torchrun rank script (tests/test_compress_distributed.py launches it), not a test module:
# importing it for doctests would run it
collect_ignore = ["distributed_ranks.py"]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-matrix tests (a second only adds contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
