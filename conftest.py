"""Settings shared by tests/ and the docstring examples collected from src/spectrakit."""

from __future__ import annotations

import torch
from _pytest.doctest import DoctestItem


def pytest_runtest_setup(item) -> None:
    # docstring examples draw from torch's global generator: seed it so that every run
    # checks the same matrices (an unlucky draw must not fail CI at random)
    if isinstance(item, DoctestItem):
        torch.manual_seed(0)
