"""Shared fixtures: the real-data root and the GPU skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder named by $AGOP_DATA (the real MNIST / CIFAR-10 files); skip if unset."""
    root = os.environ.get("AGOP_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("set AGOP_DATA to the datasets folder (e.g. AGOP_DATA=../shared/datasets)")
    return Path(root)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (tests seed explicitly anyway)."""
    torch.manual_seed(0)
    yield
