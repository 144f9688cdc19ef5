"""scripts/results_table.py: the claims of two reports side by side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _claim(run, measured, ok, figure="Fig. 3", **mark):
    return {"figure": figure, "run": run, "paper": "NC1 falls.", "measured": measured,
            "consistent": ok, **mark}


def test_claims_are_matched_by_run_and_the_cross_checks_by_their_dataset():
    t = _module().table(
        {"claims": [_claim("Deep RFM, MNIST (rfm-mnist)", "4.7 → 0.05", True, scale="paper",
                           solver="nystrom"),
                    _claim("Deep RFM, MNIST (rfm-mnist-exact)", "4.7 | 0.01", False,
                           scale="paper", solver="exact"),
                    _claim("Deep RFM, CIFAR-10 (rfm-cifar10)", "13 → 0.06", None)]},
        {"claims": [_claim("Deep RFM, MNIST (rfm-mnist)", "4.5 → 2e-5", True),
                    _claim("Deep RFM, MNIST (rfm-mnist)", "other figure", False,
                           figure="Fig. 6")]}, [])
    rows = t.splitlines()[2:]
    assert len(rows) == 3
    assert "rfm-mnist) (paper; nystrom) | 4.7 → 0.05 | holds | 4.5 → 2e-5 | holds |" in rows[0]
    # the exact cross-check is set beside the quick run of its dataset; a | is escaped
    assert "(paper; exact) | 4.7 \\| 0.01 | **does not hold** | 4.5 → 2e-5 | holds |" in rows[1]
    assert rows[2].endswith("13 → 0.06 | n/a | — | — |")  # no quick counterpart
