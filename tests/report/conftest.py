"""Fixtures of the report tests: synthetic run records and one tiny ``agop reproduce``."""

from __future__ import annotations

from pathlib import Path

import pytest

import _records

from agop.cli import main


@pytest.fixture
def rfm_rows() -> list[dict]:
    """Two layers and the final solve, NC1 values chosen so every log is a log of 2.

    layer 1: input 8, agop 2, features 4; layer 2: input 2, agop 0.5, features 1; layer 3
    (final solve): input 1. Total ln 8; agop steps ln 4 + ln 4 = ln 16; features ln(1/2) +
    ln(1/2) = ln(1/4); normalization ln(4/2) + ln(1/1) = ln 2. Shares 4/3, −2/3, 1/3.
    """
    values = [(1, "input", 8, 0.3), (1, "agop", 2, 0.2), (1, "features", 4, 0.25),
              (2, "input", 2, 0.2), (2, "agop", 0.5, 0.1), (2, "features", 1, 0.15),
              (3, "input", 1, 0.05)]
    return [{"layer": l, "stage": s, "nc1": v, "nc2": n2, "train_acc": 1.0, "test_acc": 0.5}
            for l, s, v, n2 in values]


@pytest.fixture
def mlp_rows() -> list[dict]:
    """Two layers, epochs 0 and 10, drops in exact decades (:func:`_records.mlp_rows`)."""
    return _records.mlp_rows()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """``agop reproduce --scale tiny --datasets digits`` through the CLI (a few seconds)."""
    out = tmp_path_factory.mktemp("reproduce")
    empty = tmp_path_factory.mktemp("data")  # hermetic: theory falls back to digits
    assert main(["reproduce", "--scale", "tiny", "--datasets", "digits", "--out", str(out),
                 "--data-dir", str(empty), "--no-progress"]) == 0
    return out
