"""The sizes of each scale of ``agop reproduce``: a constant, imported by the plan, the page
(which marks each run with the scale its settings belong to) and the CLI (without torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["PAPER_DATASETS", "SCALES"]

#: Sizes of each scale, in one place; "<kind>:<dataset>" entries override a kind's sizes for one
#: dataset. ``n`` and ``test_n`` are capped at what a dataset's files hold.
#: quick: 3-7 minutes on 2 CPU cores with digits, MNIST and CIFAR-10 (timings in
#: docs/report.md). Deep RFM at Figure 2's setting (2,000 points, 20 layers). The
#: MLP's lr 1e-3 at N = 1,000 keeps lr × Adam steps near the paper's (2e-5 × 391 steps per epoch
#: at N = 50,000 ≈ 1e-3 × 8): with 2e-5 the 1,000-point network stays on its initial plateau
#: for all 250 epochs (docs/mlp.md, "Scale"); digits' 64 small inputs need 2e-3 to leave it.
#: paper: Appendix C (first 50,000 points, 20 layers, 250 epochs, measured every 10; the MLP at
#: lr 2e-5, gain 0.01, width 512, 5 layers, batch 128: the "paper" preset). Deep RFM runs exact
#: where that fits in memory, else Nyström with 4,000 centers (docs/scaling.md); where it is
#: Nyström, "rfm-check" adds an exact run on the first 10,000 points as a cross-check.
#: ``agop reproduce --scale paper --dry-run`` prints each run's estimated time on this machine.
#: tiny: seconds, for the end-to-end test; shows the pipeline, not the paper's numbers.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "rfm": {"n": 200, "test_n": 100, "depth": 3, "width": 128},
        "mlp": {"n": 200, "test_n": 100, "epochs": 6, "measure_every": 3, "width": 64,
                "depth": 3, "lr": 1e-3},
    },
    "quick": {
        "rfm": {"n": 2000, "test_n": 1000, "depth": 20},
        "mlp": {"n": 1000, "test_n": 1000, "epochs": 250, "measure_every": 10, "lr": 1e-3},
        "mlp:digits": {"lr": 2e-3},
    },
    "paper": {
        "rfm": {"n": 50000, "depth": 20, "centers": 4000},
        "mlp": {"n": 50000, "epochs": 250, "measure_every": 10, "preset": "paper"},
        "rfm-check": {"n": 10000, "depth": 20, "solver": "exact"},
    },
}
#: The datasets of the paper; ``reproduce`` runs each one found on disk, plus digits.
PAPER_DATASETS = ("mnist", "cifar10", "svhn")
