"""Synthetic run records shared by the experiment and report tests."""

from __future__ import annotations


def mlp_rows() -> list[dict]:
    """Two layers, epochs 0 and 10; at epoch 10 the drops are exact decades.

    layer 1: NC1 100 → 10 → 10 (S Vᵀ removes 1 decade, U + ReLU 0); layer 2: 10 → 1 → 0.1
    (1 and 1: a tie).
    """
    rows = []
    for epoch, nc1, nfa, wt in ((0, {1: (5, 5, 5), 2: (5, 5, 5)}, (0.3, 0.2), 0.9),
                                (10, {1: (100, 10, 10), 2: (10, 1, 0.1)}, (0.9, 0.8), 0.1)):
        for layer, stages in nc1.items():
            for stage, v in zip(("input", "right", "output"), stages):
                rows.append({"epoch": epoch, "layer": layer, "stage": stage, "nc1": v,
                             "within_total": wt, "nfa_sqrt": nfa[layer - 1],
                             "nfa": nfa[layer - 1] - 0.1, "loss": 1.0 / (1 + epoch),
                             "train_acc": epoch / 10, "test_acc": None})
    return rows
