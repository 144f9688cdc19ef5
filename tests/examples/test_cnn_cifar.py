"""Smoke test of examples/cnn_cifar.py on tiny settings (digits: no files needed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "cnn_cifar.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("cnn_cifar_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_its_records_and_refuses_to_overwrite(example, tmp_path):
    out = tmp_path / "run"
    args = [str(out), "--dataset", "digits", "--n", "300", "--test-n", "50", "--agop-n", "40",
            "--epochs", "1", "--width", "2", "--threads", "1"]
    assert example.main(args) == 0
    for name in ("collapse.csv", "nfa.csv", "training.csv", "summary.json", "model.pt",
                 "figures/collapse.png", "figures/nfa.png", "figures/nfa_matrices.png"):
        assert (out / name).is_file(), name
    with open(out / "nfa.csv", newline="") as fh:
        nfa = list(csv.DictReader(fh))
    assert [r["layer"] for r in nfa] == example.NFA_LAYERS * 2  # at init and after training
    assert all(-1.0 <= float(r["nfa"]) <= 1.0 + 1e-12 for r in nfa)
    assert {r["agop_dim"] for r in nfa if r["layer"] == "block1.conv"} == {"9"}  # 1 channel, 3×3
    with open(out / "collapse.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    layers = {(r["layer"], r["features"]) for r in rows}
    assert ("input", "flat") in layers and ("block2", "pooled") in layers
    assert all(math.isfinite(float(r["nc1"])) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["nfa"]) == set(example.NFA_LAYERS)
    with pytest.raises(SystemExit, match="nothing is overwritten"):
        example.main(args)
