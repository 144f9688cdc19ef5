"""Per-layer neural collapse and the Neural Feature Ansatz in a small CNN trained on CIFAR-10.

A worked example of :func:`agop.layer_collapse`, :func:`agop.layer_agops` and :func:`agop.nfa`
on a network that is not an MLP: a 4-block VGG-style CNN with BatchNorm, trained on the first
10,000 CIFAR-10 training images on 2 CPU cores. Before and after training it measures

- NC1 / NC2 (and every ``agop.collapse`` metric) of each block's output, flattened
  (C·H·W features) and channel-pooled (C features), of the hidden fully connected layer and of
  the logits, over all training images;
- the NFA correlations ρ(WᵀW, AGOP) and ρ(WᵀW, AGOP^{1/2}) of every convolution (filters as
  C_out × C_in·3·3, against the AGOP over input patches) and of the two Linear layers, also
  over the off-diagonal entries alone (two matrices with large diagonals correlate whatever
  else they hold).

Writes into OUT (which must not exist, or be empty): ``collapse.csv``, ``nfa.csv``,
``training.csv``, ``summary.json``, ``model.pt`` (the trained weights, a state_dict) and
``figures/{collapse,nfa,nfa_matrices}.png``. Run from the repository root::

    AGOP_DATA=/path/to/datasets nice -n 10 python examples/cnn_cifar.py runs/cnn_cifar

(``--dataset digits --n 600 --epochs 1 --width 4`` is a seconds-long smoke run that needs no
files.) Not part of the library: it calls the library's functions, writes its files atomically
with ``agop.experiments.records`` and draws with matplotlib. Results of a run: docs/models.md.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import agop
from agop import collapse, datasets
from agop.experiments.records import atomic_write_bytes, atomic_write_json, write_csv
from agop.linalg import psd_power
from agop.models.layers import weight_matrix

#: the metrics written per layer (all of agop.collapse.measure but nc1_pinv)
METRICS = ("nc1", "nc2", "within_total", "between_total", "cdnv", "nc2_squared",
           "nc2_orthogonal", "nc1_authors", "equinorm", "equiangular")


# ----------------------------------------------------------------------------- the network
class VGG4(nn.Module):
    """Four [3×3 conv (no bias), BatchNorm, ReLU] blocks of width w, 2w, 4w, 8w, a 2×2 max-pool
    after each of the first three; global average pooling; Linear(8w, 4w), ReLU; Linear(4w, K).

    Layer names (``named_modules``): ``block1.conv`` … ``block4.conv``, ``block{i}`` (the
    block's output, after the pool), ``fc``, ``fc_act`` (its ReLU) and ``head`` (the logits).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        for i in range(1, 5):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv2d(chans[i - 1], chans[i], 3, padding=1, bias=False))
            block.add_module("bn", nn.BatchNorm2d(chans[i]))
            block.add_module("act", nn.ReLU(inplace=True))
            if i < 4:
                block.add_module("pool", nn.MaxPool2d(2))
            self.add_module(f"block{i}", block)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, 4 * width)
        self.fc_act = nn.ReLU()
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"block{i}")(x)
        return self.head(self.fc_act(self.fc(self.gap(x).flatten(1))))


BLOCKS = ["block1", "block2", "block3", "block4"]
COLLAPSE_LAYERS = [*BLOCKS, "fc_act", "head"]
NFA_LAYERS = ["block1.conv", "block2.conv", "block3.conv", "block4.conv", "fc", "head"]


# ----------------------------------------------------------------------------- steps
def load(args: argparse.Namespace):
    """Train and test images as N × C × H × W float32, standardized per channel by the
    training set's statistics, and their labels."""
    train = datasets.load(args.dataset, n=args.n, root=args.data_dir)
    available = datasets.count(args.dataset, "test", root=args.data_dir)
    test_n = args.test_n if available is None else min(args.test_n, available)
    test = datasets.load(args.dataset, split="test", n=test_n, root=args.data_dir)
    shape = (-1, *train.image_shape)
    X = torch.from_numpy(train.X).reshape(shape)
    Xt = torch.from_numpy(test.X).reshape(shape)
    mean = X.mean(dim=(0, 2, 3), keepdim=True)
    std = X.std(dim=(0, 2, 3), keepdim=True)
    return ((X - mean) / std, torch.from_numpy(train.y), (Xt - mean) / std,
            torch.from_numpy(test.y), train.num_classes)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(X[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(X), batch))
    return hits / len(X)


def measure(model: nn.Module, X, y, K: int, epoch: int, agop_n: int):
    """Collapse rows, NFA rows and the AGOPs of the NFA layers at the current weights."""
    model.eval()
    rows = []
    in_metrics = collapse.measure(X.reshape(len(X), -1), y, K, strict=False)
    rows.append({"epoch": epoch, "layer": "input", "features": "flat", "dim": X[0].numel(),
                 **{k: in_metrics[k] for k in METRICS}})
    shapes = {}

    def keep_shape(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            shapes[name] = tuple(output.shape[1:])
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep_shape(n)) for n in COLLAPSE_LAYERS]
    with torch.no_grad():
        model(X[:2])
    for h in hooks:
        h.remove()
    for pool in (False, True):
        got = agop.layer_collapse(model, X, COLLAPSE_LAYERS, y, pool=pool, num_classes=K)
        for name in COLLAPSE_LAYERS:
            kind = "pooled" if pool and name in BLOCKS else "flat"
            if pool and kind == "flat":
                continue  # a vector layer pools to itself
            dim = shapes[name][0] if pool else math.prod(shapes[name])
            rows.append({"epoch": epoch, "layer": name, "features": kind, "dim": dim,
                         **{k: got[name][k] for k in METRICS}})
    agops = agop.layer_agops(model, X[:agop_n], layers=NFA_LAYERS)
    corr = agop.nfa(model, agops=agops)
    nfa_rows = []
    for name in NFA_LAYERS:
        layer = model.get_submodule(name)
        W = weight_matrix(layer)
        nfm, A = W.T @ W, agops[name]
        nfa_rows.append({"epoch": epoch, "layer": name, "kind": type(layer).__name__,
                         "weight": "×".join(map(str, layer.weight.shape)),
                         "agop_dim": A.shape[0], **corr[name],
                         "nfa_offdiag": offdiag_correlation(nfm, A),
                         "nfa_sqrt_offdiag": offdiag_correlation(nfm, psd_power(A, 0.5))})
    return rows, nfa_rows, agops


def offdiag_correlation(A: torch.Tensor, B: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal entries of two D × D matrices: the NFA with the
    diagonals left out (two matrices with large diagonals correlate whatever their structure)."""
    mask = ~np.eye(A.shape[0], dtype=bool)
    a, b = A.cpu().numpy()[mask], B.cpu().numpy()[mask]
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan


def train_epoch(model, opt, sched, X, y, batch_size: int, g: torch.Generator
                ) -> tuple[float, float]:
    """One pass of SGD over (X, y) in a random order; (mean loss, accuracy on the batches)."""
    model.train()
    order = torch.randperm(len(X), generator=g)
    total, hits = 0.0, 0
    for i in range(0, len(X), batch_size):
        idx = order[i:i + batch_size]
        logits = model(X[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
        hits += int((logits.detach().argmax(1) == y[idx]).sum())
    return total / len(X), hits / len(X)


# ----------------------------------------------------------------------------- figures
def figures(out: Path, coll: list[dict], nfa_rows: list[dict], model: nn.Module,
            agops: dict[str, torch.Tensor], epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "figures").mkdir(exist_ok=True)
    order = ["input", *COLLAPSE_LAYERS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("nc1", "nc2")):
        for epoch, style in ((0, ":"), (epochs, "-")):
            for kind, marker in (("flat", "o"), ("pooled", "s")):
                # the pooled curve joins the flat values where pooling changes nothing
                pts = sorted((order.index(r["layer"]), r[key]) for r in coll
                             if r["epoch"] == epoch and (r["features"] == kind or (
                                 kind == "pooled" and r["layer"] not in BLOCKS)))
                ax.plot([p for p, _ in pts], [v for _, v in pts], style, marker=marker,
                        label=f"{kind}, {'init' if epoch == 0 else f'epoch {epoch}'}")
        ax.set_xticks(range(len(order)), order, rotation=30)
        ax.set_title({"nc1": "NC1 = tr Σ_W / tr Σ_B",
                      "nc2": "NC2 (distance to a simplex ETF)"}[key])
        if key == "nc1":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figures" / "collapse.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    x = np.arange(len(NFA_LAYERS))
    for ax, suffix, title in ((axes[0], "", "all entries"),
                              (axes[1], "_offdiag", "off-diagonal entries")):
        bars = ((0, "nfa", "ρ(WᵀW, AGOP), init"), (0, "nfa_sqrt", "ρ(WᵀW, AGOP^½), init"),
                (epochs, "nfa", f"ρ(WᵀW, AGOP), epoch {epochs}"),
                (epochs, "nfa_sqrt", f"ρ(WᵀW, AGOP^½), epoch {epochs}"))
        for j, (epoch, key, label) in enumerate(bars):
            vals = [next(r[key + suffix] for r in nfa_rows
                         if r["epoch"] == epoch and r["layer"] == n) for n in NFA_LAYERS]
            ax.bar(x + (j - 1.5) * 0.2, vals, 0.2, label=label, alpha=0.5 if epoch == 0 else 1.0,
                   color=("tab:blue", "tab:orange")[key == "nfa_sqrt"])
        ax.set_xticks(x, NFA_LAYERS, rotation=20)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"Neural Feature Ansatz per layer: {title}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "figures" / "nfa.png", dpi=120)
    plt.close(fig)

    show = ["block1.conv", "block2.conv", "fc"]
    fig, axes = plt.subplots(2, len(show), figsize=(4 * len(show), 7.5))
    for col, name in enumerate(show):
        W = weight_matrix(model.get_submodule(name))
        for row, (M, title) in enumerate(((W.T @ W, "WᵀW"),
                                          (psd_power(agops[name], 0.5), "AGOP^½"))):
            M = M.cpu().numpy()
            lim = np.abs(M).max()
            axes[row, col].imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[row, col].set_title(f"{name}: {title}", fontsize=9)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(out / "figures" / "nfa_matrices.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (must not exist, or be empty)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None, help="data root (default: $AGOP_DATA)")
    p.add_argument("--n", type=int, default=10_000, help="first n training images")
    p.add_argument("--test-n", type=int, default=1_000,
                   help="first n test images (at most those present)")
    p.add_argument("--agop-n", type=int, default=1_000,
                   help="training images the AGOPs average over")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="channels of the first block")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD step (warm-up, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n", "test_n", "agop_n", "epochs", "batch_size", "width", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"error: {out} exists and is not an empty folder; nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started, cpu0 = time.perf_counter(), time.process_time()
    X, y, Xt, yt, K = load(args)
    model = VGG4(X.shape[1], K, args.width)
    agop_n = min(args.agop_n, len(X))
    seconds = {"measure": 0.0, "measure_cpu": 0.0}

    def stamp(what: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {what}", flush=True)

    def measured(epoch: int):
        t, c = time.perf_counter(), time.process_time()
        result = measure(model, X, y, K, epoch, agop_n)
        seconds["measure"] += time.perf_counter() - t
        seconds["measure_cpu"] += time.process_time() - c
        return result

    stamp(f"data: {tuple(X.shape)} train, {tuple(Xt.shape)} test; measuring at init")
    coll, nfa_rows, _ = measured(0)
    log = [{"epoch": 0, "loss": math.nan, "batch_acc": math.nan,
            "test_acc": accuracy(model, Xt, yt), "seconds": 0.0}]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(X) / args.batch_size)
    warm = max(1, steps // 10)  # linear warm-up over the first tenth, then a cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / steps)))
    g = torch.Generator().manual_seed(args.seed)
    t_train, c_train = time.perf_counter(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        loss, batch_acc = train_epoch(model, opt, sched, X, y, args.batch_size, g)
        log.append({"epoch": epoch, "loss": loss, "batch_acc": batch_acc,
                    "test_acc": accuracy(model, Xt, yt),
                    "seconds": time.perf_counter() - t_train})
        stamp(f"epoch {epoch}: loss {loss:.4f}, accuracy on the training batches "
              f"{batch_acc:.4f}, test {log[-1]['test_acc']:.4f}")
        write_csv(out / "training.csv", log)
    seconds["train"] = time.perf_counter() - t_train
    seconds["train_cpu"] = time.process_time() - c_train
    stamp("measuring the trained network")
    c2, n2, agops = measured(args.epochs)
    train_acc = accuracy(model, X, y)
    coll += c2
    nfa_rows += n2
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    write_csv(out / "collapse.csv", coll)
    write_csv(out / "nfa.csv", nfa_rows)
    figures(out, coll, nfa_rows, model, agops, args.epochs)
    seconds["total"] = time.perf_counter() - started
    seconds["total_cpu"] = time.process_time() - cpu0
    final = {r["layer"] + ("" if r["features"] == "flat" else " (pooled)"):
             {"nc1": r["nc1"], "nc2": r["nc2"]} for r in c2}
    atomic_write_json(out / "summary.json", {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(), "seconds": seconds,
        "train_acc": train_acc, "test_acc": log[-1]["test_acc"], "test_n": len(Xt),
        "collapse": final,
        "nfa": {r["layer"]: {k: r[k] for k in ("nfa", "nfa_sqrt", "nfa_offdiag",
                                               "nfa_sqrt_offdiag")} for r in n2}})
    stamp(f"done: {out}; train accuracy {train_acc:.4f}, test {log[-1]['test_acc']:.4f}; "
          f"CPU seconds: {seconds['total_cpu']:.0f}")
    for r in n2:
        print(f"  NFA {r['layer']:12s} ρ(WᵀW, AGOP) = {r['nfa']:.3f}   "
              f"ρ(WᵀW, AGOP^½) = {r['nfa_sqrt']:.3f}   off-diagonal: {r['nfa_offdiag']:.3f}, "
              f"{r['nfa_sqrt_offdiag']:.3f}")
    for r in c2:
        print(f"  {r['layer']:7s} {r['features']:6s} D = {r['dim']:6d}  NC1 = {r['nc1']:.4g}  "
              f"NC2 = {r['nc2']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
