"""Figures of the paper, drawn from run records (``metrics.csv`` rows) with matplotlib.

Every function takes plain data (lists of row dicts or arrays), draws one figure, saves it
(PNG, and PDF when ``pdf=True``) and returns the paths written. Matplotlib's non-interactive
Agg backend is used, so figures work on machines with no display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLORS = {
    # Deep RFM stages (Figure 3)
    "input": "tab:blue",
    "agop": "tab:orange",
    "features": "tab:green",
    # MLP stages (Figures 1 and 7)
    "right": "tab:orange",
    "output": "tab:green",
}


def save(fig: "plt.Figure", path: str | os.PathLike, pdf: bool = False) -> list[Path]:
    """Save ``fig`` to ``path`` (.png) and, with ``pdf``, beside it as .pdf; close it."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    out = [path]
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        out.append(path.with_suffix(".pdf"))
    plt.close(fig)
    return out


# ============================================================================ Deep RFM figures
# (Figures 2, 3, 6) -- owned by the Deep RFM work


# ============================================================================ MLP figures
# (Figures 1, 7, 8) -- owned by the MLP work


_MLP_STAGE_LABELS = {"input": "input Φ(X)", "right": "right S Vᵀ Φ(X)",
                     "output": "output σ(U S Vᵀ Φ(X))"}


def _mlp_series(rows: Iterable[dict], layer: int, stage: str, key: str
                ) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metric of one layer and stage, by epoch; None becomes NaN."""
    pts = sorted((r["epoch"], r[key]) for r in rows if r["layer"] == layer and r["stage"] == stage)
    return [e for e, _ in pts], [float("nan") if v is None else float(v) for _, v in pts]


def mlp_nc1_stages(rows: list[dict], path: str | os.PathLike, *, title: str | None = None,
                   pdf: bool = False) -> list[Path]:
    """Figures 1 and 7: NC1 of each hidden layer's input, S Vᵀ stage and output over training.

    ``rows``: ``agop mlp`` metrics rows (epoch, layer, stage, nc1). One panel per layer, NC1 on a
    log scale, one line per stage.
    """
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(layers), figsize=(2.8 * len(layers) + 0.6, 3.0),
                             sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for stage, label in _MLP_STAGE_LABELS.items():
            ax.plot(*_mlp_series(rows, layer, stage, "nc1"), color=STAGE_COLORS[stage],
                    marker=".", label=label)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("NC1 = tr Σ_W / tr Σ_B")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("NC1 through each layer's SVD components" + (f" ({title})" if title else ""))
    return save(fig, path, pdf)


def mlp_training(rows: list[dict], path: str | os.PathLike, *, title: str | None = None,
                 pdf: bool = False) -> list[Path]:
    """Figure 8: variability shares, NFA correlations and train loss over training.

    Left: tr Σ_W/tr Σ_T (solid) and tr Σ_B/tr Σ_T (dashed) of each layer's output features.
    Middle: ρ(W_lᵀW_l, AGOP_l^{1/2}) (solid) and ρ(W_lᵀW_l, AGOP_l) (dashed) per layer.
    Right: the training MSE.
    """
    from matplotlib.lines import Line2D

    layers = sorted({r["layer"] for r in rows})
    colors = plt.cm.viridis([i / max(len(layers), 1) for i in range(len(layers))])
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(13.5, 3.6))
    for color, layer in zip(colors, layers):
        a0.plot(*_mlp_series(rows, layer, "output", "within_total"), color=color)
        a0.plot(*_mlp_series(rows, layer, "output", "between_total"), color=color, ls="--")
        a1.plot(*_mlp_series(rows, layer, "input", "nfa_sqrt"), color=color,
                label=f"layer {layer}")
        a1.plot(*_mlp_series(rows, layer, "input", "nfa"), color=color, ls="--")
    a2.plot(*_mlp_series(rows, layers[0], "input", "loss"), color="black", marker=".")
    a0.set_title("variability of layer outputs")
    a0.set_ylabel("share of tr Σ_T")
    a0.legend([Line2D([], [], color="gray"), Line2D([], [], color="gray", ls="--")],
              ["tr Σ_W / tr Σ_T", "tr Σ_B / tr Σ_T"], fontsize=7)
    a1.set_title("NFA: ρ(WᵀW, AGOP^½) solid, ρ(WᵀW, AGOP) dashed")
    a1.set_ylabel("Pearson correlation")
    a1.legend(fontsize=7)
    a2.set_yscale("log")
    a2.set_title("train loss (MSE)")
    for ax in (a0, a1, a2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, path, pdf)



# ============================================================================ theory figures
# (Figure 4, Theorem 5.4, Theorem 5.5) -- owned by the theory work
def theory_relu_distance(dist, theory, ratio, simulated, simulated_se, path, *,
                         D: int | None = None, pdf: bool = False) -> list[Path]:
    """Figure 4: E‖σ(Wx) − σ(Wy)‖ against ‖x − y‖ (left) and their ratio (right).

    ``dist``, ``theory`` (large-D limit), ``ratio`` (theory / dist), ``simulated`` and its
    standard error ``simulated_se``: arrays of one length. The linear interpolation is the
    chord from (0, 0) to (2, √2).
    """
    import numpy as np

    dist, theory, ratio = np.asarray(dist), np.asarray(theory), np.asarray(ratio)
    simulated, simulated_se = np.asarray(simulated), np.asarray(simulated_se)
    sim_label = "simulation" + (f" (D = {D})" if D else "")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.errorbar(dist, simulated, yerr=simulated_se, fmt="o", ms=3, color="tab:blue",
                  label=sim_label)
    left.plot(dist, theory, color="tab:orange", label="theory (D → ∞)")
    left.plot([0, 2], [0, 2**0.5], color="tab:green", label="linear interpolation")
    left.set(xlabel="‖x − y‖", ylabel="E‖σ(Wx) − σ(Wy)‖", title="feature distance")
    left.legend()
    pos = dist > 0
    right.errorbar(dist[pos], simulated[pos] / dist[pos], yerr=simulated_se[pos] / dist[pos],
                   fmt="o", ms=3, color="tab:blue", label=sim_label)
    right.plot(dist, ratio, color="tab:orange", label="theory (D → ∞)")
    for level in (1.0, 2**-0.5):
        right.axhline(level, color="gray", lw=0.8, ls=":")
    right.set(xlabel="‖x − y‖", ylabel="E‖σ(Wx) − σ(Wy)‖ / ‖x − y‖", title="ratio",
              ylim=(0.65, 1.05))
    right.legend()
    return save(fig, path, pdf)


def theory_contraction(curves, path, *, pdf: bool = False) -> list[Path]:
    """Theorem 5.4: ‖X̃_lᵀX̃_l − yyᵀ‖₂ per layer of linearized Deep RFM, log scale.

    ``curves``: dicts with ``lambda_k``, ``lambda_phi``, ``kappa`` ("exact"/"paper") and
    ``spectral`` (distances for layers 2, 3, …). Curves with the paper's κ are dashed.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in curves:
        d = np.asarray(c["spectral"], dtype=float)
        layers = np.arange(2, len(d) + 2)
        label = f"λ_k = {c['lambda_k']:g}, λ_Φ = {c['lambda_phi']:g}"
        if c["kappa"] == "paper":
            label += " (paper's κ)"
        ax.semilogy(layers, np.maximum(d, 1e-17), marker="o", ms=3,
                    ls="--" if c["kappa"] == "paper" else "-", label=label)
    ax.set(xlabel="layer l", ylabel="‖X̃_lᵀX̃_l − yyᵀ‖₂",
           title="Theorem 5.4: linearized Deep RFM")
    ax.legend(fontsize=8)
    return save(fig, path, pdf)


def theory_krr_bound(records, epsilon_rows, path, *, pdf: bool = False) -> list[Path]:
    """Theorem 5.5: objective / bound against μ for each kernel (left) and the gap
    1 − objective/bound of (k* + εI)/(1 + ε) against ε (right).

    ``records``: dicts with ``kernel``, ``mu``, ``ratio``; ``epsilon_rows``: dicts with
    ``epsilon`` and ``gap``.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    random_labelled = False
    for name in dict.fromkeys(r["kernel"] for r in records):
        rows = sorted((r for r in records if r["kernel"] == name), key=lambda r: r["mu"])
        random = name.startswith("random")
        label = name if not random else None if random_labelled else "random kernels"
        random_labelled |= random
        left.semilogx([r["mu"] for r in rows], [r["ratio"] for r in rows], marker="o", ms=4,
                      lw=0.8 if random else 2, color="lightgray" if random else None,
                      label=label)
    left.axhline(1.0, color="black", lw=0.8, ls=":")
    left.set(xlabel="μ", ylabel="yᵀ(k + μI)⁻¹ky / bound", title="Theorem 5.5: objective / bound")
    left.legend(fontsize=8)
    right.loglog([r["epsilon"] for r in epsilon_rows], [r["gap"] for r in epsilon_rows],
                 marker="o")
    right.set(xlabel="ε", ylabel="1 − objective / bound",
              title="(k* + εI)/(1 + ε) approaches the bound")
    return save(fig, path, pdf)
