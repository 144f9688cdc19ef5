"""``agop reproduce`` and ``agop report``: the paper's figures and headline numbers in one page.

:func:`reproduce` runs the experiments of the paper at a chosen scale (Deep RFM and the MLP study
on every dataset found, and the theory checks), keeping each run folder under ``DIR/runs/`` so
that an interrupted call continues where it stopped, then calls :func:`build_report`.

:func:`build_report` reads run folders (``config.json`` "kind": ``rfm``, ``mlp`` or ``theory``),
recomputes the headline numbers from their ``metrics.csv`` (and ``theory.csv``), draws the
cross-dataset figures and writes one self-contained HTML page (figures embedded as base64 data
URIs, inline CSS, no scripts, nothing fetched) plus a JSON file with the same numbers.

Figures of the paper and where they come from: Figure 1 (MLP, CIFAR-10) and Figure 7 (MLP, other
datasets): NC1 of each layer's input, S Vᵀ stage and output over training; Figure 2: Gram
matrices of Deep RFM layer inputs; Figure 3 (Deep RFM, CIFAR-10) and Figure 6 (other datasets):
NC1 and NC2 per layer at the input, agop and features stages; Figure 4: Proposition 5.1's
feature distance; Figure 8: variability shares, NFA correlations and loss of the MLP.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from agop import __version__
from agop.experiments.records import metric_float

__all__ = ["SCALES", "PAPER_DATASETS", "build_report", "mlp_numbers", "plan", "reproduce",
           "rfm_numbers", "theory_numbers"]

#: Sizes of each scale, in one place; "<kind>:<dataset>" entries override a kind's sizes for one
#: dataset. ``n`` and ``test_n`` are capped at what a dataset's files hold.
#: quick: 3-7 minutes on 2 CPU cores with digits, MNIST and CIFAR-10 (timings in
#: docs/report.md). Deep RFM at Figure 2's setting (2,000 points, 20 layers). The
#: MLP's lr 1e-3 at N = 1,000 keeps lr × Adam steps near the paper's (2e-5 × 391 steps per epoch
#: at N = 50,000 ≈ 1e-3 × 8): with 2e-5 the 1,000-point network stays on its initial plateau
#: for all 250 epochs (docs/mlp.md, "Scale"); digits' 64 small inputs need 2e-3 to leave it.
#: paper: Appendix C (first 50,000 points, 20 layers, 250 epochs, measured every 10), for a GPU.
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
        "rfm": {"n": 50000, "depth": 20},
        "mlp": {"n": 50000, "epochs": 250, "measure_every": 10},
    },
}
#: The datasets of the paper; ``reproduce`` runs each one found on disk, plus digits.
PAPER_DATASETS = ("mnist", "cifar10", "svhn")
_MAIN_DATASET = "cifar10"  # Figures 1, 2 and 3 are on CIFAR-10; 6 and 7 show the others
_NAMES = {"digits": "digits", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST",
          "cifar10": "CIFAR-10", "svhn": "SVHN"}
KINDS = ("rfm", "mlp", "theory")


# ============================================================================ the plan
@dataclass(frozen=True)
class Experiment:
    """One run of the plan: ``name`` is its folder under ``DIR/runs/``."""

    name: str
    kind: str
    dataset: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _counts(name: str, root: Path) -> tuple[int | None, int | None]:
    """(train, test) points of a dataset under ``root`` (None: split not found), from headers."""
    from agop import datasets

    return datasets.count(name, "train", root), datasets.count(name, "test", root)


def _fit(settings: dict[str, Any], counts: tuple[int | None, int | None], scale: str) -> str:
    """Cap ``n`` and ``test_n`` at what the files hold (in place); the note says what changed."""
    notes = []
    for key, have, split in (("n", counts[0], "training"), ("test_n", counts[1], "test")):
        want = settings.get(key)
        if have is None and key == "test_n":
            settings[key] = 0
            notes.append("no test split found: no test accuracy")
        elif want is not None and have is not None and want > have:
            settings[key] = have
            notes.append(f"{key} capped at {have:,}: the {split} files hold {have:,} points "
                         f"(scale {scale} asks for {want:,})")
    return "; ".join(notes)


def plan(scale: str = "quick", datasets: Sequence[str] | None = None,
         data_dir: Any = None) -> tuple[list[Experiment], list[dict[str, str]]]:
    """The experiments of :func:`reproduce` and the datasets skipped (with where they were sought).

    ``datasets``: names to run (each must be found, else ValueError); None: digits plus every
    one of :data:`PAPER_DATASETS` found under the data root (``data_dir``, else ``$AGOP_DATA``,
    else ``~/.cache/agop``). Returns (experiments, skipped) with skipped entries
    ``{"dataset", "reason"}``.
    """
    from agop import datasets as ds

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    root = ds.resolve_root(data_dir)
    explicit = datasets is not None
    if explicit:
        names = []
        for name in datasets:
            key = str(name).strip().lower().replace("_", "-")
            if key not in ds.DATASETS:
                raise ValueError(f"unknown dataset {name!r} in --datasets; known: "
                                 f"{', '.join(ds.DATASETS)}")
            if key not in names:
                names.append(key)
        if not names:
            raise ValueError("--datasets is empty; name at least one dataset")
    else:
        names = ["digits", *PAPER_DATASETS]
    found, skipped = [], []
    for name in names:
        counts = _counts(name, root)
        if counts[0] is None:
            where = root / ds.DATASETS[name].folder
            reason = (f"not found: looked for its training files in {where} (data root "
                      f"{root}; set --data-dir or $AGOP_DATA; layout in docs/datasets.md)")
            if explicit:
                raise ValueError(f"dataset {name!r} was asked for but is {reason}")
            skipped.append({"dataset": name, "reason": reason})
        else:
            found.append((name, counts))

    sizes = SCALES[scale]
    out = []
    for kind in ("rfm", "mlp"):
        for name, counts in found:
            settings = {"dataset": name, **sizes[kind], **sizes.get(f"{kind}:{name}", {})}
            note = _fit(settings, counts, scale)
            out.append(Experiment(f"{kind}-{name}", kind, name, settings, note))
    out.append(Experiment("theory", "theory", None, {"seed": 0}))
    return out, skipped


# ============================================================================ reproduce
def _existing_state(path: Path, exp: Experiment) -> str:
    """"new", "partial" or "complete" for the run folder of ``exp``; ValueError if it conflicts."""
    from agop.experiments.records import CONFIG, RunDir

    if not (path / CONFIG).is_file():
        return "new"
    run = RunDir.resume(path)
    if run.kind != exp.kind:
        raise ValueError(f"{path} holds a {run.kind!r} run, not the {exp.kind!r} run this plan "
                         f"puts there; move it away or choose another --out")
    stored = run.settings
    diff = [f"{k}: run has {stored.get(k)!r}, plan has {v!r}" for k, v in exp.settings.items()
            if k in stored and stored[k] != v]
    if diff:
        raise ValueError(f"{path} was made with other settings ({'; '.join(diff)}); it belongs "
                         f"to another scale or --datasets: choose another --out or remove it")
    return "complete" if run.is_complete else "partial"


def _run_one(exp: Experiment, path: Path, state: str, *, device: str, data_dir: Any,
             progress: bool, pdf: bool) -> None:
    """Start, continue or (theory, which has no resume) restart one experiment in ``path``."""
    data = None if data_dir is None else str(data_dir)
    if exp.kind == "rfm":
        from agop.experiments.rfm import run_rfm

        if state == "partial":
            run_rfm(resume=path, progress=progress, pdf=pdf, data_dir=data)
        else:
            run_rfm(out=path, progress=progress, pdf=pdf, device=device, data_dir=data,
                    **exp.settings)
    elif exp.kind == "mlp":
        from agop.models.mlp import run_mlp

        if state == "partial":
            run_mlp(resume=path, progress=progress, device=device, data_dir=data, pdf=pdf)
        else:
            run_mlp(out=path, progress=progress, device=device, data_dir=data, pdf=pdf,
                    **exp.settings)
    else:
        from agop.theory import run_theory

        if state == "partial":  # a few seconds of work: start again rather than resume
            shutil.rmtree(path)
        run_theory(path, progress=False, data_dir=data, pdf=pdf, **exp.settings)


def reproduce(out: Any, scale: str = "quick", datasets: Sequence[str] | None = None,
              device: str = "auto", data_dir: Any = None, progress: bool = True,
              pdf: bool = False) -> Path:
    """Run every experiment of the paper at ``scale`` and build ``out/report.html``.

    Plan (:func:`plan`): Deep RFM on each dataset (Figures 2, 3, 6), the MLP study on each
    dataset (Figures 1, 7, 8), the theory checks (Figure 4, Theorems 5.4, 5.5); sizes from
    :data:`SCALES`. Run folders live in ``out/runs/<kind>-<dataset>`` and ``out/runs/theory``:
    a finished run (summary.json complete) is kept, an interrupted one is continued with its
    ``resume``, so calling this again after an interruption picks up where it stopped. Active
    seconds per run accumulate in ``out/timings.json``. Writes ``out/report.html``,
    ``out/summary.json`` and the cross-dataset figures in ``out/figures/``; returns the
    report's path.
    """
    from tqdm.auto import tqdm

    from agop.experiments.records import atomic_write_json, read_json

    experiments, skipped = plan(scale, datasets, data_dir)
    out = Path(out)
    runs_dir = out / "runs"
    timing_file = out / "timings.json"
    timings = read_json(timing_file) if timing_file.is_file() else {}
    states = {e.name: _existing_state(runs_dir / e.name, e) for e in experiments}
    runs_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(experiments), disable=not progress, unit="run", position=0,
               desc="agop reproduce", dynamic_ncols=True)
    try:
        for i, exp in enumerate(experiments, 1):
            label = f"[{i}/{len(experiments)}] {exp.name}"
            if states[exp.name] == "complete":
                if progress:
                    bar.write(f"{label}: already complete, kept")
                bar.update(1)
                continue
            bar.set_description(f"agop reproduce {label}")
            if progress and states[exp.name] == "partial":
                bar.write(f"{label}: continuing the interrupted run")
            t0 = time.perf_counter()
            try:
                _run_one(exp, runs_dir / exp.name, states[exp.name], device=device,
                         data_dir=data_dir, progress=progress, pdf=pdf)
            finally:
                timings[exp.name] = timings.get(exp.name, 0.0) + time.perf_counter() - t0
                atomic_write_json(timing_file, timings)
            if progress:
                bar.write(f"{label}: done in {timings[exp.name]:.0f} s")
            bar.update(1)
        bar.set_description("agop reproduce: report")
        notes = {e.name: e.note for e in experiments if e.note}
        return build_report([runs_dir / e.name for e in experiments], out / "report.html",
                            summary_file=out / "summary.json", figures_dir=out / "figures",
                            pdf=pdf, scale=scale, skipped=skipped, timings=timings,
                            notes=notes)
    finally:
        bar.close()


# ============================================================================ reading runs
@dataclass
class Run:
    """A run folder as the report sees it."""

    path: Path
    kind: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    rows: list[dict[str, Any]]
    figures: list[Path]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset(self) -> str | None:
        return self.config.get("settings", {}).get("dataset")

    @property
    def complete(self) -> bool:
        return bool(self.summary and self.summary.get("complete"))

    @property
    def label(self) -> str:
        """e.g. "Deep RFM, MNIST (rfm-mnist)"."""
        what = {"rfm": "Deep RFM", "mlp": "MLP", "theory": "theory"}[self.kind]
        data = f", {_NAMES.get(self.dataset, self.dataset)}" if self.dataset else ""
        return f"{what}{data} ({self.name})"


def load_run(path: Any) -> Run:
    """Read a run folder; ValueError if it is not one (no config.json, unknown kind)."""
    from agop.experiments.records import CONFIG, FIGURES, METRICS, read_csv, read_json

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder (expected a run folder of agop rfm, agop mlp "
                         f"or agop theory)")
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not a run folder: it has no {CONFIG} (expected a folder "
                         f"written by agop rfm, agop mlp or agop theory)")
    config = read_json(path / CONFIG)
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{path / CONFIG}: kind {kind!r} is not one of {', '.join(KINDS)}")
    table = path / ("theory.csv" if kind == "theory" else METRICS)
    rows = read_csv(table) if table.is_file() else []
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    figures = sorted((path / FIGURES).glob("*.png"))
    return Run(path, kind, config, summary, rows, figures)


# ============================================================================ headline numbers
def _ok(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def rfm_numbers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of a Deep RFM run, finished or not: :func:`agop.experiments.rfm.headline`."""
    from agop.experiments.rfm import headline

    return headline(rows)


def gram_numbers(path: Path, num_classes: int | None) -> dict[str, Any] | None:
    """The last stored Gram matrix of a run against the collapsed one (:func:`agop.experiments.rfm.gram_summary`)."""
    from agop.experiments.rfm import gram_summary, load_grams

    return gram_summary(load_grams(path), num_classes)


def mlp_numbers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of an MLP run at its last measured epoch (Figures 1, 7, 8; Section 4).

    Per hidden layer: NC1 of the input, S Vᵀ ("right") and output stages; ``drop_right`` =
    log10(NC1 input / NC1 right), the decades removed by S Vᵀ, and ``drop_output`` =
    log10(NC1 right / NC1 output), by U and the ReLU; the NFA correlations. Summed over layers
    they split the network's log NC1 reduction, giving ``share_right``; ``right_dominates``
    counts layers with drop_right > |drop_output|. ``within_total_*``: tr Σ_W/tr Σ_T of the last
    layer's output at the first and last measured epochs; ``nfa_sqrt_lowest``: the lowest
    ρ(WᵀW, AGOP^½) over all layers and measured epochs.
    """
    epochs = sorted({r.get("epoch") for r in rows if r.get("epoch") is not None})
    if not epochs:
        return {}
    first, last = epochs[0], epochs[-1]
    final = {(r.get("layer"), r.get("stage")): r for r in rows if r.get("epoch") == last}
    start = {(r.get("layer"), r.get("stage")): r for r in rows if r.get("epoch") == first}
    layer_ids = sorted({l for l, _ in final})
    layers = []
    for l in layer_ids:
        nc1 = {s: metric_float(final.get((l, s), {}).get("nc1")) for s in ("input", "right", "output")}
        right = (math.log10(nc1["input"] / nc1["right"]) if _ok(nc1["input"], nc1["right"])
                 else math.nan)
        output = (math.log10(nc1["right"] / nc1["output"]) if _ok(nc1["right"], nc1["output"])
                  else math.nan)
        inp = final.get((l, "input"), {})
        layers.append({"layer": l, **{f"nc1_{s}": v for s, v in nc1.items()},
                       "drop_right": right, "drop_output": output,
                       "nfa": metric_float(inp.get("nfa")), "nfa_sqrt": metric_float(inp.get("nfa_sqrt"))})
    sum_right = sum(x["drop_right"] for x in layers)
    sum_output = sum(x["drop_output"] for x in layers)
    total = sum_right + sum_output
    nfa_all = [metric_float(r.get("nfa_sqrt")) for r in rows if r.get("stage") == "input"]
    nfa_all = [v for v in nfa_all if math.isfinite(v)]
    head = final.get((layer_ids[0], "input"), {})
    top = layer_ids[-1]
    return {
        "epoch": last, "first_epoch": first, "num_layers": len(layers), "layers": layers,
        "loss": metric_float(head.get("loss")), "train_acc": metric_float(head.get("train_acc")),
        "test_acc": metric_float(head.get("test_acc")),
        "drop_right_total": sum_right, "drop_output_total": sum_output,
        "share_right": sum_right / total if math.isfinite(total) and total > 0 else math.nan,
        "right_dominates": sum(x["drop_right"] > abs(x["drop_output"]) for x in layers),
        "nfa_sqrt_mean": _mean([x["nfa_sqrt"] for x in layers]),
        "nfa_sqrt_min": min((x["nfa_sqrt"] for x in layers), default=math.nan),
        "nfa_sqrt_max": max((x["nfa_sqrt"] for x in layers), default=math.nan),
        "nfa_mean": _mean([x["nfa"] for x in layers]),
        "nfa_sqrt_lowest": min(nfa_all, default=math.nan),
        "within_total_first": metric_float(start.get((top, "output"), {}).get("within_total")),
        "within_total_last": metric_float(final.get((top, "output"), {}).get("within_total")),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


_THEORY_GROUPS = (("fig4", ("prop5.1", "fig4")), ("thm5.4", ("thm5.4", "lemmaa.2")),
                  ("thm5.5", ("thm5.5",)))


def theory_numbers(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> dict[str, Any]:
    """Checks passed per part of the theory (Figure 4, Theorems 5.4, 5.5) from ``theory.csv``.

    ``rows``: check, value, expected, passed, note. Rows are grouped by the check's prefix.
    """
    out: dict[str, Any] = {"checks": len(rows), "passed": sum(_passed(r) for r in rows),
                           "failed": [str(r.get("check")) for r in rows if not _passed(r)]}
    for key, prefixes in _THEORY_GROUPS:
        part = [r for r in rows if str(r.get("check", "")).lower().startswith(prefixes)]
        out[key] = {"checks": len(part), "passed": sum(_passed(r) for r in part)}
    s = summary or {}
    for key in ("relu_ratio_at_2", "relu_mc_max_z_inner", "relu_mc_max_z_distance",
                "krr_dataset", "krr_ratio_laplace", "krr_ratio_rfm", "krr_max_ratio_random",
                "contraction_rates"):
        if key in s:
            out[key] = s[key]
    return out


# ============================================================================ formatting
def _num(v: Any, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, 4,240 for thousands, 2.1e-4 beyond; NaN: "n/a"."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "n/a" if v is None else str(v)
    if not math.isfinite(v):
        return "n/a"
    if v == 0 or 1e-3 <= abs(v) < 1e3:
        return f"{v:.{digits}g}"
    if 1e3 <= abs(v) < 1e6:
        return f"{v:,.0f}"
    mant, exp = f"{v:.{digits - 1}e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def _pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:.0f}%"


def _acc(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


# ============================================================================ claims
@dataclass
class Claim:
    """One row of the headline table: what the paper says, what a run shows, and a verdict."""

    figure: str
    run: str
    paper: str
    measured: str
    consistent: bool | None
    criterion: str = ""


def rfm_claims(run: Run, x: dict[str, Any], gram: dict[str, Any] | None) -> list[Claim]:
    """The Deep RFM statements of Section 5.2 (Figures 2, 3, 6) against one run's numbers."""
    fig = "Fig. 3" if run.dataset == _MAIN_DATASET else "Fig. 6"
    L = x["layers"]
    out = [
        Claim(fig, run.label, "NC1 of the layer input falls by orders of magnitude over the "
              "layers.",
              f"NC1 {_num(x['nc1_first'])} (layer 1) → {_num(x['nc1_last'])} (layer "
              f"{x['last_layer']}): {_num(x['nc1_reduction'])}× smaller",
              _finite_or_none(x["nc1_reduction"], lambda v: v >= 10), "at least 10× smaller"),
        Claim(fig, run.label, "The improvement in NC1 is entirely due to the AGOP projection "
              "M^{1/2}.",
              f"share of the log-NC1 reduction: agop step {_pct(x['share_agop'])}, random "
              f"features {_pct(x['share_features'])}, normalization "
              f"{_pct(x['share_normalize'])}; agop stage below input in "
              f"{x['agop_below_input']} of {L} layers",
              _finite_or_none(x["share_agop"],
                              lambda v: v >= 0.9 and x["agop_below_input"] == L),
              "agop share ≥ 90% and agop < input in every layer"),
        Claim(fig, run.label, "The random feature map does not lower NC1 (it slightly raises "
              "it, Proposition 5.1).",
              f"features stage at or above the agop stage in {x['features_not_below_agop']} of "
              f"{x['layers_with_features']} layers",
              x["features_not_below_agop"] == x["layers_with_features"] if L else None,
              "in every layer"),
        Claim(fig, run.label, "NC2 improves over the layers as well.",
              f"NC2 {_num(x['nc2_first'])} → {_num(x['nc2_last'])}",
              _finite_or_none(x["nc2_last"] - x["nc2_first"], lambda v: v < 0),
              "last below first"),
    ]
    if gram:
        ideal = gram["other_class_ideal"]
        out.append(Claim(
            "Fig. 2", run.label, "At the last layer the Gram matrix is collapsed: ≈ 1 within a "
            "class, ≈ −1/(K−1) between classes.",
            f"layer {gram['layer']} ({gram['points']} points): mean within-class entry "
            f"{gram['same_class_mean']:.3f} (collapsed: 1), between classes "
            f"{gram['other_class_mean']:.3f} (collapsed: {ideal:.3f})",
            gram["same_class_mean"] >= 0.9 and abs(gram["other_class_mean"] - ideal) <= 0.05,
            "within ≥ 0.9, between within 0.05 of −1/(K−1)"))
    return out


def mlp_claims(run: Run, x: dict[str, Any]) -> list[Claim]:
    """The MLP statements of Section 4 (Figures 1, 7, 8) against one run's numbers."""
    fig = "Fig. 1" if run.dataset == _MAIN_DATASET else "Fig. 7"
    L = x["num_layers"]
    return [
        Claim(fig, run.label, "Within-class variability is reduced mostly by the right "
              "singular structure S Vᵀ, not by U and the ReLU.",
              f"epoch {x['epoch']}, summed over layers: S Vᵀ removed "
              f"{_num(x['drop_right_total'])} decades of NC1, U + ReLU "
              f"{_num(x['drop_output_total'])} (S Vᵀ share {_pct(x['share_right'])}); S Vᵀ "
              f"dominated in {x['right_dominates']} of {L} layers",
              x["right_dominates"] > L / 2 if L else None, "S Vᵀ dominates in most layers"),
        Claim("Fig. 8", run.label, "Neural Feature Ansatz: WᵀW is strongly correlated with "
              "the square root of the AGOP through training.",
              f"ρ(WᵀW, AGOP^½) at epoch {x['epoch']}: mean {_num(x['nfa_sqrt_mean'])} over "
              f"layers (range {_num(x['nfa_sqrt_min'])}–{_num(x['nfa_sqrt_max'])}), lowest "
              f"during training {_num(x['nfa_sqrt_lowest'])}; ρ(WᵀW, AGOP) mean "
              f"{_num(x['nfa_mean'])}",
              _finite_or_none(x["nfa_sqrt_mean"], lambda v: v >= 0.8),
              "mean ρ(WᵀW, AGOP^½) ≥ 0.8 at the end"),
        Claim("Fig. 8", run.label, "Training collapses the last layer: tr Σ_W/tr Σ_T falls.",
              f"last layer output: {_num(x['within_total_first'])} (epoch {x['first_epoch']}) "
              f"→ {_num(x['within_total_last'])} (epoch {x['epoch']}); train accuracy "
              f"{_acc(x['train_acc'])}, test {_acc(x['test_acc'])}",
              _finite_or_none(x["within_total_last"] - x["within_total_first"],
                              lambda v: v < 0), "last below first"),
    ]


def theory_claims(run: Run, x: dict[str, Any]) -> list[Claim]:
    """Proposition 5.1 (Figure 4), Theorems 5.4 and 5.5 against the checks of ``agop theory``."""
    def verdict(part):
        return part["passed"] == part["checks"] if part["checks"] else None

    fig4, t54, t55 = x["fig4"], x["thm5.4"], x["thm5.5"]
    z = max(metric_float(x.get("relu_mc_max_z_inner")), metric_float(x.get("relu_mc_max_z_distance")))
    rates = x.get("contraction_rates") or {}
    rate = next((v for k, v in rates.items() if "exact" in k), math.nan)
    lap, rfm = x.get("krr_ratio_laplace") or {}, x.get("krr_ratio_rfm") or {}
    mu = next(iter(lap), None)
    krr = (f"; μ = {mu}: objective/bound {_num(metric_float(lap[mu]))} (Laplace) vs "
           f"{_num(metric_float(rfm.get(mu)))} (RFM k_M) on {x.get('krr_dataset', '?')}"
           if mu is not None else "")
    return [
        Claim("Fig. 4", run.label, "E‖σ(Wx) − σ(Wy)‖/‖x − y‖ decreases monotonically within "
              "[1/√2, 1]; theory and simulation match.",
              f"{fig4['passed']} of {fig4['checks']} checks passed; ratio at ‖x − y‖ = 2: "
              f"{_num(metric_float(x.get('relu_ratio_at_2')), 5)}; Monte-Carlo max |z| {_num(z)}",
              verdict(fig4), "every check passes"),
        Claim("Thm 5.4", run.label, "Linearized Deep RFM collapses geometrically; larger λ_k "
              "slows it, larger λ_Φ speeds it up.",
              f"{t54['passed']} of {t54['checks']} checks passed; contraction rate per layer "
              f"{_num(rate)} at λ_k/λ_Φ = 0.02", verdict(t54), "every check passes"),
        Claim("Thm 5.5", run.label, "yᵀ(k + μI)⁻¹ky ≤ 2n·n/(n + μ), attained by the "
              "collapsed kernel; AGOP kernels get closer than the plain Laplace kernel.",
              f"{t55['passed']} of {t55['checks']} checks passed{krr}", verdict(t55),
              "every check passes"),
    ]


def _finite_or_none(v: float, test) -> bool | None:
    return bool(test(v)) if math.isfinite(v) else None


# ============================================================================ the report
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1180px;padding:1.2em 1.5em 3em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.55em;margin:.2em 0}h2{font-size:1.25em;margin-top:2em;
 border-bottom:2px solid #d0d7de;padding-bottom:.2em}h3{font-size:1.02em;margin:1.3em 0 .3em}
.meta{color:#57606a;font-size:.92em}nav{background:#f6f8fa;border:1px solid #d0d7de;
 border-radius:6px;padding:.5em 1em;font-size:.92em}nav a{margin-right:1em;white-space:nowrap}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0;width:100%}
th,td{border:1px solid #d0d7de;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;
 white-space:nowrap}
.ok{color:#1a7f37;font-weight:600;white-space:nowrap}.bad{color:#cf222e;font-weight:600;
 white-space:nowrap}.na{color:#57606a}
.crit{display:block;color:#57606a;font-size:.85em;font-weight:400}
.paper{background:#fff8c5;border-left:4px solid #d4a72c;padding:.4em .8em;margin:.5em 0}
.note{background:#ddf4ff;border-left:4px solid #54aeff;padding:.4em .8em;margin:.5em 0}
.warn{background:#ffebe9;border-left:4px solid #cf222e;padding:.4em .8em;margin:.5em 0}
figure{margin:1em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.9em;color:#24292f;margin-top:.3em}code{font-size:.92em}
"""

_SECTIONS = (
    ("fig1", "Figure 1: MLP on CIFAR-10, NC1 through each layer's SVD components",
     "A 5-layer MLP trained on CIFAR-10 reduces within-class variability (NC1) mostly when a "
     "layer applies its right singular structure S Vᵀ; the left singular vectors U (a rotation) "
     "and the ReLU change it little (Section 4)."),
    ("fig2", "Figure 2: Gram matrices of Deep RFM layer inputs",
     "On 2,000 CIFAR-10 points, the Gram matrix of centered, normalized layer inputs (samples "
     "ordered by class) becomes block-structured: at the last layer points of one class have "
     "inner products ≈ 1 and points of different classes ≈ −1/(K−1) (Section 5.1)."),
    ("fig3", "Figure 3: neural collapse in Deep RFM on CIFAR-10",
     "NC1 (log scale) and NC2 of Deep RFM on CIFAR-10 fall over 20 layers; the improvement "
     "comes entirely from the AGOP projection M^{1/2} (input → agop), while the random feature "
     "map slightly worsens NC1 (Section 5.1)."),
    ("fig4", "Figure 4: random features barely change distances (Proposition 5.1)",
     "E‖σ(Wx) − σ(Wy)‖ lies above the linear interpolation, and its ratio to ‖x − y‖ decreases "
     "monotonically within [1/√2, 1]: random ReLU features do not collapse the data; theory and "
     "simulation match (Section 5.2)."),
    ("fig6", "Figure 6: neural collapse in Deep RFM on the other datasets",
     "The Deep RFM observations of Figure 3 hold on MNIST and the other vision datasets "
     "(Appendix B.1)."),
    ("fig7", "Figure 7: MLP on the other datasets, NC1 through each layer's SVD components",
     "The MLP observation of Figure 1 holds on MNIST and SVHN: S Vᵀ does most of the NC1 "
     "reduction (Appendix B.2)."),
    ("fig8", "Figure 8: variability, Neural Feature Ansatz and train loss of the MLP",
     "tr Σ_W/tr Σ_T falls and tr Σ_B/tr Σ_T rises during training; W_lᵀW_l stays strongly "
     "correlated with the square root of the AGOP w.r.t. the layer's input (the NFA); the train "
     "loss goes down (Appendix B.3)."),
    ("theory", "Theorems 5.4 and 5.5",
     "Linearized Deep RFM collapses the data geometrically, more slowly for a larger kernel "
     "ridge λ_k and faster for a larger feature-map term λ_Φ (Theorem 5.4); among kernels with "
     "unit diagonal and non-negative entries, the collapsed kernel maximizes the kernel ridge "
     "objective (Theorem 5.5)."),
)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figure(path: Path, alt: str, caption: str) -> str:
    return f"<figure>{_img(path, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


def _pick(run: Run, *words: str) -> list[Path]:
    """The run's figures whose file name contains one of ``words``."""
    return [p for p in run.figures if any(w in p.stem.lower() for w in words)]


def _verdict(c: bool | None, criterion: str) -> str:
    crit = f'<span class="crit">{_e(criterion)}</span>' if criterion else ""
    if c is None:
        return f'<span class="na">n/a</span>{crit}'
    return (f'<span class="ok">✓ consistent</span>{crit}' if c
            else f'<span class="bad">✗ differs</span>{crit}')


def _claims_table(claims: list[Claim]) -> str:
    head = ("<table><tr><th>figure</th><th>run</th><th>the paper says</th>"
            "<th>this reproduction</th><th>verdict</th></tr>")
    body = "".join(f"<tr><td>{_e(c.figure)}</td><td>{_e(c.run)}</td><td>{_e(c.paper)}</td>"
                   f"<td>{_e(c.measured)}</td><td>{_verdict(c.consistent, c.criterion)}</td></tr>"
                   for c in claims)
    return head + body + "</table>"


def _order(items: list[tuple]) -> list[tuple]:
    """(run, ...) tuples with the paper's main dataset (CIFAR-10) first, others as given."""
    return sorted(items, key=lambda t: t[0].dataset != _MAIN_DATASET)


def _settings_text(run: Run) -> str:
    s = {k: v for k, v in run.config.get("settings", {}).items()
         if v is not None and k not in ("dataset", "data_dir")}
    return ", ".join(f"{k}={v}" for k, v in s.items())


def _seconds(run: Run, timings: dict[str, float]) -> float:
    """Active seconds: from ``timings``, else the timings.json of the reproduce folder holding
    the run (``DIR/runs/<name>``), else Deep RFM's own layer and metric seconds, else NaN."""
    from agop.experiments.records import read_json

    if run.name in timings:
        return float(timings[run.name])
    beside = run.path.parent.parent / "timings.json"
    if run.path.parent.name == "runs" and beside.is_file():
        known = read_json(beside)
        if isinstance(known, dict) and run.name in known:
            return float(known[run.name])
    s = run.summary or {}
    if run.kind == "rfm" and "layer_seconds" in s:
        return metric_float(s.get("layer_seconds")) + metric_float(s.get("metric_seconds", 0.0))
    return math.nan


def build_report(run_dirs: Iterable[Any], out_file: Any, *, summary_file: Any = None,
                 figures_dir: Any = None, pdf: bool = False, scale: str | None = None,
                 skipped: Sequence[dict[str, str]] = (), timings: dict[str, float] | None = None,
                 notes: dict[str, str] | None = None) -> Path:
    """Write one self-contained HTML report of the given run folders, and its numbers as JSON.

    ``run_dirs``: folders of ``agop rfm``, ``agop mlp`` and ``agop theory`` in any mix (a folder
    that is not a run raises ValueError). ``out_file``: the HTML page; ``summary_file``: the
    JSON (default: ``out_file`` with suffix .json); ``figures_dir``: the cross-dataset figures
    (default: ``<out_file stem>_figures`` beside it), PDF too with ``pdf``. ``scale``,
    ``skipped``, ``timings`` (seconds per run name) and ``notes`` (per run name) come from
    :func:`reproduce`. Returns the path of the HTML page.
    """
    from agop.experiments.records import atomic_write_json, atomic_write_text

    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise ValueError("no run folders given: pass at least one folder of agop rfm, agop mlp "
                         "or agop theory")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"run folders must have distinct names; repeated: {', '.join(dupes)}")
    out_file = Path(out_file)
    summary_file = Path(summary_file) if summary_file else out_file.with_suffix(".json")
    figures_dir = (Path(figures_dir) if figures_dir
                   else out_file.with_name(out_file.stem + "_figures"))
    timings, notes = dict(timings or {}), dict(notes or {})

    rfm = [(r, rfm_numbers(r.rows)) for r in runs if r.kind == "rfm"]
    rfm = [(r, x, gram_numbers(r.path, r.config.get("data", {}).get("classes")))
           for r, x in rfm if x]
    mlp = [(r, x) for r in runs if r.kind == "mlp" for x in [mlp_numbers(r.rows)] if x]
    theory = [(r, theory_numbers(r.rows, r.summary)) for r in runs
              if r.kind == "theory" and r.rows]
    claims = ([c for r, x, g in rfm for c in rfm_claims(r, x, g)]
              + [c for r, x in mlp for c in mlp_claims(r, x)]
              + [c for r, x in theory for c in theory_claims(r, x)])
    claims.sort(key=lambda c: _FIG_ORDER.get(c.figure, 99))
    cross = _cross_figures(rfm, mlp, figures_dir, pdf)

    parts = [_header(runs, scale), _skipped_html(skipped),
             _incomplete_html(runs),
             '<section id="headline"><h2>Headline numbers beside the paper</h2>'
             + _claims_table(claims) + "</section>"]
    parts += _figure_sections(rfm, mlp, theory, cross)
    parts.append(_theory_table(theory))
    parts.append(_runs_table(runs, timings, notes))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>agop: reproduction report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(p for p in parts if p)
            + f'\n<footer class="meta"><p>Built by agop {_e(__version__)} on '
              f"{_e(_dt.datetime.now().isoformat(timespec='seconds'))}.</p></footer>"
              "</body></html>\n")
    atomic_write_text(out_file, page)

    summary = {
        "agop_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "scale": scale, "report": str(out_file), "skipped": list(skipped),
        "runs": [_run_record(r, timings, notes) for r in runs],
        "rfm": [{"run": r.name, "dataset": r.dataset, **x, "gram_last": g} for r, x, g in rfm],
        "mlp": [{"run": r.name, "dataset": r.dataset, **x} for r, x in mlp],
        "theory": [{"run": r.name, **x} for r, x in theory],
        "claims": [vars(c) for c in claims],
        "figures": [str(p) for p in cross.values()],
    }
    atomic_write_json(summary_file, summary)
    return out_file


_FIG_ORDER = {"Fig. 1": 1, "Fig. 2": 2, "Fig. 3": 3, "Fig. 4": 4, "Fig. 6": 6, "Fig. 7": 7,
              "Fig. 8": 8, "Thm 5.4": 9, "Thm 5.5": 10}


def _run_record(run: Run, timings: dict[str, float], notes: dict[str, str]) -> dict[str, Any]:
    return {"name": run.name, "kind": run.kind, "dataset": run.dataset, "path": str(run.path),
            "complete": run.complete, "settings": run.config.get("settings", {}),
            "device": run.config.get("device"), "dtype": run.config.get("dtype"),
            "seconds": _seconds(run, timings), "agop_version": run.config.get("agop_version"),
            "note": notes.get(run.name, "")}


def _cross_figures(rfm, mlp, figures_dir: Path, pdf: bool) -> dict[str, Path]:
    """Cross-dataset figures (only when there are runs to compare)."""
    from agop.experiments import figures

    out = {}
    if rfm:
        curves = []
        for r, _, _ in rfm:
            by = {(row.get("layer"), row.get("stage")): metric_float(row.get("nc1")) for row in r.rows}
            layers = sorted(l for l, s in by if s == "input")
            curves.append({"label": _NAMES.get(r.dataset, r.dataset) if _unique(rfm, r)
                           else r.name, "layers": layers,
                           "input": [by[(l, "input")] for l in layers],
                           "agop": [by.get((l, "agop"), math.nan) for l in layers]})
        out["rfm"] = figures.report_rfm_nc1(curves, figures_dir / "rfm_nc1_all", pdf=pdf)[0]
    if mlp:
        curves = [{"label": _NAMES.get(r.dataset, r.dataset) if _unique(mlp, r) else r.name,
                   "epoch": x["epoch"], "layers": x["layers"]} for r, x in mlp]
        out["mlp"] = figures.report_mlp_final(curves, figures_dir / "mlp_final_all", pdf=pdf)[0]
    return out


def _unique(items, run: Run) -> bool:
    """Whether ``run`` is the only one of its dataset among ``items`` (label by dataset)."""
    return sum(i[0].dataset == run.dataset for i in items) == 1


def _header(runs: list[Run], scale: str | None) -> str:
    kinds = ", ".join(f"{sum(r.kind == k for r in runs)} {k}" for k in KINDS
                      if any(r.kind == k for r in runs))
    scale_text = f"scale <b>{_e(scale)}</b> · " if scale else ""
    toc = "".join(f'<a href="#{a}">{_e(t.split(":")[0])}</a>' for a, t, _ in _SECTIONS)
    return ("<header><h1>Average gradient outer product as a mechanism for deep neural "
            "collapse: reproduction report</h1>"
            f'<p class="meta">{scale_text}agop {_e(__version__)} · runs: {_e(kinds)}. The paper: '
            "Beaglehole, Súkeník, Mondelli, Belkin. Each section states what the paper claims "
            "(yellow) and what these runs show (the captions, computed from the run records)."
            f'</p></header><nav><a href="#headline">Headline numbers</a>{toc}'
            '<a href="#checks">Theory checks</a><a href="#runs">Runs and settings</a></nav>')


def _skipped_html(skipped: Sequence[dict[str, str]]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><b>{_e(_NAMES.get(s['dataset'], s['dataset']))}</b> skipped: "
                    f"{_e(s['reason'])}</li>" for s in skipped)
    return f'<section id="skipped" class="note"><p>Datasets not run:</p><ul>{items}</ul></section>'


def _incomplete_html(runs: list[Run]) -> str:
    lines = [f"<li>{_e(r.label)} has not finished (no complete summary.json): its numbers are "
             f"those recorded so far.</li>" for r in runs if not r.complete]
    return f'<div class="warn"><ul>{"".join(lines)}</ul></div>' if lines else ""


def _rfm_caption(r: Run, x: dict[str, Any]) -> str:
    return (f"{r.label}: NC1 of the layer input fell from {_num(x['nc1_first'])} to "
            f"{_num(x['nc1_last'])} over {x['layers']} layers ({_num(x['nc1_reduction'])}× "
            f"smaller); the agop stage was below the input stage in {x['agop_below_input']} of "
            f"{x['layers']} layers and the features stage was not below the agop stage in "
            f"{x['features_not_below_agop']} of {x['layers_with_features']}; the agop step "
            f"accounts for {_pct(x['share_agop'])} of the log-NC1 reduction. NC2 "
            f"{_num(x['nc2_first'])} → {_num(x['nc2_last'])}; final train accuracy "
            f"{_acc(x['train_acc'])}, test {_acc(x['test_acc'])}.")


def _gram_caption(r: Run, g: dict[str, Any] | None) -> str:
    if not g:
        return f"{r.label}."
    return (f"{r.label}: at layer {g['layer']} ({g['points']} class-balanced training points) "
            f"the mean within-class inner product is {g['same_class_mean']:.3f} (collapsed: 1) "
            f"and the mean between-class one {g['other_class_mean']:.3f} (collapsed: "
            f"{g['other_class_ideal']:.3f}). Thin lines mark the class blocks.")


def _mlp_caption(r: Run, x: dict[str, Any]) -> str:
    per = "; ".join(f"layer {y['layer']}: {_num(y['nc1_input'])} → {_num(y['nc1_right'])} → "
                    f"{_num(y['nc1_output'])}" for y in x["layers"])
    return (f"{r.label}, epoch {x['epoch']}: NC1 input → S Vᵀ → output per layer: {per}. "
            f"Summed over layers S Vᵀ removed {_num(x['drop_right_total'])} decades and U + "
            f"ReLU {_num(x['drop_output_total'])}; S Vᵀ dominated in {x['right_dominates']} "
            f"of {x['num_layers']} layers. Train accuracy {_acc(x['train_acc'])}, test "
            f"{_acc(x['test_acc'])}.")


def _nfa_caption(r: Run, x: dict[str, Any]) -> str:
    per = ", ".join(f"{_num(y['nfa_sqrt'])}" for y in x["layers"])
    return (f"{r.label}: ρ(WᵀW, AGOP^½) at epoch {x['epoch']}, layers 1–{x['num_layers']}: "
            f"{per} (lowest over training {_num(x['nfa_sqrt_lowest'])}); tr Σ_W/tr Σ_T of the "
            f"last layer's output {_num(x['within_total_first'])} → "
            f"{_num(x['within_total_last'])}; train loss {_num(x['loss'])}.")


def _missing(what: str) -> str:
    return f'<p class="note">{_e(what)}</p>'


def _figure_sections(rfm, mlp, theory, cross) -> list[str]:
    rfm_main = [t for t in rfm if t[0].dataset == _MAIN_DATASET]
    rfm_other = [t for t in rfm if t[0].dataset != _MAIN_DATASET]
    mlp_main = [t for t in mlp if t[0].dataset == _MAIN_DATASET]
    mlp_other = [t for t in mlp if t[0].dataset != _MAIN_DATASET]
    body: dict[str, list[str]] = {a: [] for a, _, _ in _SECTIONS}

    def figs(run, words, caption, alt):
        found = _pick(run, *words)
        return ([_figure(p, f"{alt}, {run.label}", caption) for p in found] if found
                else [_missing(f"{run.label}: no figure found in {run.path / 'figures'}. "
                               + caption)])

    for r, x in mlp_main:
        body["fig1"] += figs(r, ("nc1", "stage"), _mlp_caption(r, x), "NC1 per SVD stage")
    if not mlp_main:
        body["fig1"].append(_missing("No MLP run on CIFAR-10 in this report; other datasets are "
                                     "in Figure 7."))
    for r, _, g in _order(rfm):
        body["fig2"] += figs(r, ("gram",), _gram_caption(r, g), "Gram matrices")
    for r, x, _ in rfm_main:
        body["fig3"] += figs(r, ("collapse",), _rfm_caption(r, x), "Deep RFM NC1 and NC2")
    if not rfm_main:
        body["fig3"].append(_missing("No Deep RFM run on CIFAR-10 in this report; other "
                                     "datasets are in Figure 6."))
    if "rfm" in cross:
        body["fig3"].append(_figure(cross["rfm"], "NC1 per layer, every dataset", (
            "All Deep RFM runs of this report: NC1 of the layer input (solid) and of the agop "
            "stage (dashed) per layer, log scale.")))
    for r, x, _ in rfm_other:
        body["fig6"] += figs(r, ("collapse",), _rfm_caption(r, x), "Deep RFM NC1 and NC2")
    for r, x in mlp_other:
        body["fig7"] += figs(r, ("nc1", "stage"), _mlp_caption(r, x), "NC1 per SVD stage")
    if "mlp" in cross:
        body["fig7"].append(_figure(cross["mlp"], "MLP at the end of training, every dataset", (
            "All MLP runs of this report at their last epoch: left, NC1 along the network "
            "(each layer's input, S Vᵀ and output stages; a drop at an S Vᵀ point is the right "
            "singular structure's work); right, ρ(WᵀW, AGOP^½) (solid) and ρ(WᵀW, AGOP) "
            "(dashed) per layer.")))
    for r, x in _order(mlp):
        body["fig8"] += figs(r, ("nfa", "training"), _nfa_caption(r, x), "NFA and training")
    for r, x in theory:
        said = {c.figure: c.measured for c in theory_claims(r, x)}
        body["fig4"] += figs(r, ("figure4", "relu"), f"{r.label}: {said['Fig. 4']}.", "Figure 4")
        for p in r.figures:
            stem = p.stem.lower()
            if any(w in stem for w in ("figure4", "relu")):
                continue
            key = ("Thm 5.4" if any(w in stem for w in ("54", "contraction")) else
                   "Thm 5.5" if any(w in stem for w in ("55", "bound", "krr")) else None)
            text = f"{r.label}, {key}: {said[key]}." if key else f"{r.label}: {p.stem}."
            body["theory"].append(_figure(p, f"{p.stem}, {r.label}", text))
    empty = {"fig1": None, "fig2": "Deep RFM", "fig3": None, "fig4": "theory",
             "fig6": "Deep RFM on datasets other than CIFAR-10", "fig7": "MLP on datasets "
             "other than CIFAR-10", "fig8": "MLP", "theory": "theory"}
    out = []
    for anchor, title, paper in _SECTIONS:
        content = body[anchor] or [_missing(f"No {empty[anchor]} run in this report.")]
        out.append(f'<section id="{anchor}"><h2>{_e(title)}</h2><p class="paper"><b>The paper:'
                   f"</b> {_e(paper)}</p>{''.join(content)}</section>")
    return out


def _theory_table(theory) -> str:
    if not theory:
        return ""
    parts = ['<section id="checks"><h2>Theory checks (agop theory)</h2>']
    for r, x in theory:
        rows = "".join(
            f"<tr><td>{_e(row.get('check'))}</td><td class=\"num\">{_e(_num(row.get('value'), 4))}"
            f"</td><td>{_e(row.get('expected'))}</td><td>{_result(_passed(row))}</td>"
            f"<td>{_e(row.get('note') or '')}</td></tr>" for row in r.rows)
        parts.append(f"<h3>{_e(r.label)}: {x['passed']} of {x['checks']} passed</h3><table>"
                     "<tr><th>check</th><th>value</th><th>expected</th><th>result</th>"
                     f"<th>note</th></tr>{rows}</table>")
    return "".join(parts) + "</section>"


def _result(ok: bool) -> str:
    return '<span class="ok">✓ passed</span>' if ok else '<span class="bad">✗ failed</span>'


def _passed(row: dict[str, Any]) -> bool:
    return str(row.get("passed")).strip().lower() in ("true", "1")


def _runs_table(runs: list[Run], timings: dict[str, float], notes: dict[str, str]) -> str:
    rows = []
    for r in runs:
        c = r.config
        secs = _seconds(r, timings)
        rows.append(
            f"<tr><td>{_e(r.name)}</td><td>{_e(r.kind)}</td><td>{_e(r.dataset or '')}</td>"
            f"<td>{_e(_settings_text(r))}</td><td>{_e(c.get('device', ''))}</td>"
            f"<td>{_e(c.get('dtype', ''))}</td>"
            f"<td class=\"num\">{'' if not math.isfinite(secs) else f'{secs:.1f}'}</td>"
            f"<td>{'yes' if r.complete else 'no'}</td>"
            f"<td>{_e(c.get('agop_version', ''))}, torch {_e(c.get('torch_version', ''))}</td>"
            f"<td>{_e(r.path)}</td><td>{_e(notes.get(r.name, ''))}</td></tr>")
    return ('<section id="runs"><h2>Runs and settings</h2><table><tr><th>run</th><th>kind</th>'
            "<th>dataset</th><th>settings</th><th>device</th><th>dtype</th><th>seconds</th>"
            "<th>complete</th><th>versions</th><th>folder</th><th>note</th></tr>" + "".join(rows)
            + "</table><p class=\"meta\">Seconds: active time measured by agop reproduce (all "
              "sessions of a resumed run), else the Deep RFM run's own layer and metric time."
              "</p></section>")
