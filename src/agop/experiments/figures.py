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
_RFM_STAGE_LABELS = {"input": "input X_l", "agop": "agop X_l M_l^{1/2}",
                     "features": "features σ(X_l M_l^{1/2} W_lᵀ)"}


def _rfm_series(rows: Iterable[dict], stage: str, key: str) -> tuple[list[int], list[float]]:
    """(layers, values) of one metric at one Deep RFM stage, by layer; None becomes NaN."""
    pts = sorted((r["layer"], r[key]) for r in rows if r["stage"] == stage)
    return [l for l, _ in pts], [float("nan") if v is None else float(v) for _, v in pts]


def rfm_collapse(rows: list[dict], path: str | os.PathLike, *, title: str | None = None,
                 pdf: bool = False) -> list[Path]:
    """Figures 3 and 6: NC1 (log scale) and NC2 of Deep RFM per layer at its three stages.

    ``rows``: ``agop rfm`` metrics rows (layer, stage, nc1, nc2); the last layer (the final
    solve) has the input stage only.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")  # no overlaps
    for ax, key, label in ((axes[0], "nc1", "NC1 = tr Σ_W / tr Σ_B"),
                           (axes[1], "nc2", "NC2 = ‖H̄H̄ᵀ − Σ_ETF‖_F / K²")):
        for stage, name in _RFM_STAGE_LABELS.items():
            ax.plot(*_rfm_series(rows, stage, key), color=STAGE_COLORS[stage], marker=".",
                    label=name)
        ax.set_xlabel("layer l")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Neural collapse in Deep RFM" + (f" ({title})" if title else ""))
    return save(fig, path, pdf)


def rfm_gram(grams: list[tuple], path: str | os.PathLike, *,
             classes: list[str] | None = None, title: str | None = None,
             pdf: bool = False) -> list[Path]:
    """Figure 2: Gram matrices of the centered, normalized layer inputs, samples by class.

    ``grams``: (layer, G, labels) with G (n × n) ordered by class and ``labels`` in G's order;
    thin lines mark the class blocks. Collapse shows as blocks of 1 on the diagonal and
    −1/(K−1) elsewhere.
    """
    import numpy as np

    fig, axes = plt.subplots(1, len(grams), figsize=(2.7 * len(grams) + 0.8, 3.0), squeeze=False)
    image = None
    for ax, (layer, G, labels) in zip(axes[0], grams):
        labels = np.asarray(labels)
        image = ax.imshow(G, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        first = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]  # first sample of each block
        for e in first[1:] - 0.5:
            ax.axhline(e, color="k", lw=0.3)
            ax.axvline(e, color="k", lw=0.3)
        centers = (first + np.r_[first[1:], len(labels)] - 1) / 2
        names = [str(classes[c]) if classes else str(c) for c in labels[first]]
        ax.set_xticks(centers, names, fontsize=5, rotation=90)
        ax.set_yticks(centers, names if ax is axes[0][0] else [], fontsize=5)
        ax.set_title(f"layer {layer}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle("Gram matrix of centered, normalized X_l" + (f" ({title})" if title else ""),
                 y=1.02)
    return save(fig, path, pdf)



#: Colors of the steps of a Deep RFM layer (Algorithm 1's work), then of the measurement
#: (test predictions, collapse metrics: grays); a step not listed takes a color of Dark2.
RFM_STEP_COLORS = {"kernel": "tab:blue", "solve": "tab:orange", "agop": "tab:green",
                   "sqrt": "tab:red", "features": "tab:purple", "predict": "silver",
                   "metrics": "dimgray"}


def rfm_step_seconds(rows: list[dict], path: str | os.PathLike, *, title: str | None = None,
                     pdf: bool = False) -> list[Path]:
    """Where the time of a Deep RFM run went: seconds per step, stacked, for every layer.

    ``rows``: ``agop rfm`` metrics rows with ``seconds_<step>`` columns (each stage row of a
    layer carries the layer's times; missing or None: 0). Steps as
    :func:`agop.experiments.rfm.layer_step_seconds` reads them, in that order from the bottom;
    a step that took no time in any layer is left out. The last layer (the final solve) has
    no AGOP, M^{1/2} or features step.
    """
    from agop.experiments.rfm import layer_step_seconds

    per_layer = layer_step_seconds(rows)
    layers = list(per_layer)
    steps = list(next(iter(per_layer.values()), {}))
    steps = [k for k in steps if any(per_layer[l][k] > 0 for l in layers)]
    spare = iter(plt.cm.Dark2.colors)  # for steps not in RFM_STEP_COLORS
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bottom = [0.0] * len(layers)
    for k in steps:
        heights = [per_layer[l][k] for l in layers]
        ax.bar(layers, heights, bottom=bottom, width=0.8, label=k,
               color=RFM_STEP_COLORS.get(k) or next(spare, "black"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer l")
    ax.set_ylabel("seconds")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.set_axisbelow(True)
    if steps:
        handles, labels = ax.get_legend_handles_labels()  # top of the stack first
        ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Deep RFM: seconds per step and layer" + (f" ({title})" if title else ""),
                 fontsize=10)
    return save(fig, path, pdf)


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
    fig.suptitle("NC1 through each layer's SVD components" + (f" ({title})" if title else ""),
                 y=1.04)
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
    a1.set_title("Neural Feature Ansatz")
    a1.set_ylabel("Pearson correlation with WᵀW")
    handles, labels = a1.get_legend_handles_labels()
    a1.legend(handles + [Line2D([], [], color="gray"), Line2D([], [], color="gray", ls="--")],
              labels + ["ρ(WᵀW, AGOP^½)", "ρ(WᵀW, AGOP)"], fontsize=7)
    a2.set_yscale("log")
    a2.set_title("train loss (MSE)")
    for ax in (a0, a1, a2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, y=1.04)
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


# ============================================================================ report figures
# (cross-run figures of `agop reproduce` / `agop report`) -- owned by the report work
def report_rfm_nc1(curves: list[dict], path: str | os.PathLike, *,
                   pdf: bool = False) -> list[Path]:
    """Figures 3 and 6 side by side: NC1 per layer of every Deep RFM run, log scale.

    ``curves``: dicts with ``label``, ``layers`` (the layers with an input row), ``input`` and
    ``agop`` (NC1 at those layers; NaN where a layer has no agop stage, e.g. the final solve).
    Solid: the layer input X_l; dashed: the agop stage X_l M_l^{1/2}; one color per run.
    """
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.cm.tab10.colors
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        ax.plot(c["layers"], c["input"], color=color, marker="o", ms=3, label=c["label"])
        ax.plot(c["layers"], c["agop"], color=color, ls="--", marker="x", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("layer l")
    ax.set_ylabel("NC1 = tr Σ_W / tr Σ_B")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    style = [Line2D([], [], color="gray", marker="o", ms=3),
             Line2D([], [], color="gray", ls="--", marker="x", ms=3)]
    first = ax.legend(fontsize=8, title="dataset", title_fontsize=8, loc="lower left")
    ax.add_artist(first)
    ax.legend(style, ["input X_l", "agop X_l M_l^{1/2}"], fontsize=8, loc="upper right")
    ax.set_title("Deep RFM: NC1 per layer, every dataset")
    return save(fig, path, pdf)


def report_mlp_final(curves: list[dict], path: str | os.PathLike, *,
                     pdf: bool = False) -> list[Path]:
    """Figures 1, 7 and 8 at the last epoch of every MLP run.

    ``curves``: dicts with ``label``, ``epoch`` and ``layers``, a list of dicts with ``layer``,
    ``nc1_input``, ``nc1_right``, ``nc1_output``, ``nfa_sqrt``, ``nfa``. Left: NC1 along the
    network, input → S Vᵀ → output for layer 1, then S Vᵀ → output for each next layer (a
    layer's output is the next one's input), log scale. Right: ρ(WᵀW, AGOP^½) (solid) and
    ρ(WᵀW, AGOP) (dashed) per layer.
    """
    from matplotlib.lines import Line2D

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2),
                                      gridspec_kw={"width_ratios": [1.7, 1]})
    colors = plt.cm.tab10.colors
    ticks: list[str] = []
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        layers = c["layers"]
        values = [layers[0]["nc1_input"]] if layers else []
        names = ["in 1"] if layers else []
        for lay in layers:
            values += [lay["nc1_right"], lay["nc1_output"]]
            names += [f"SVᵀ {lay['layer']}", f"out {lay['layer']}"]
        if len(names) > len(ticks):
            ticks = names
        x = list(range(len(values)))
        left.plot(x, values, color=color, lw=1, label=f"{c['label']} (epoch {c['epoch']})")
        left.plot(x[1::2], values[1::2], ls="", marker="v", ms=6, color=color)  # S Vᵀ points
        left.plot(x[0::2], values[0::2], ls="", marker="o", ms=4, color=color)
        ids = [lay["layer"] for lay in layers]
        right.plot(ids, [lay["nfa_sqrt"] for lay in layers], color=color, marker="o", ms=4,
                   label=c["label"])
        right.plot(ids, [lay["nfa"] for lay in layers], color=color, ls="--", marker="x", ms=4)
    left.set_xticks(range(len(ticks)), ticks, rotation=45, fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("NC1 = tr Σ_W / tr Σ_B")
    left.set_title("NC1 along the network (▼: after S Vᵀ, ●: layer input/output)")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    right.set_xlabel("layer l")
    right.set_ylabel("Pearson correlation with W_lᵀW_l")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_title("Neural Feature Ansatz at the last epoch")
    right.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    right.legend(handles + [Line2D([], [], color="gray", marker="o", ms=4),
                            Line2D([], [], color="gray", ls="--", marker="x", ms=4)],
                 labels + ["ρ(WᵀW, AGOP^½)", "ρ(WᵀW, AGOP)"], fontsize=8)
    return save(fig, path, pdf)
