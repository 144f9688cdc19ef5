"""The report's numbers: run folders read, headline numbers per run, and the paper's claims.

Every number comes from the run's own records (``metrics.csv``, ``theory.csv``,
``summary.json``, the Gram snapshots) through the experiment's headline function, so that the
report, ``summary.json`` and the CLI read the same values. A :class:`Claim` puts one statement of
the paper beside what a run shows and a verdict whose criterion is written next to it.

This is the bottom of the report package: it imports nothing from :mod:`agop.report.page` or
:mod:`agop.report.plan`, and holds the constants both of them need (:data:`KINDS`,
:data:`MAIN_DATASET`, :data:`DISPLAY_NAMES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agop._validate import metric_float
from agop.experiments.mlp import headline as mlp_headline
from agop.experiments.records import CONFIG, FIGURES, RunDir, read_csv, read_json
from agop.experiments.rfm import gram_summary, load_grams
from agop.experiments.rfm import headline as rfm_headline

__all__ = ["DISPLAY_NAMES", "KINDS", "MAIN_DATASET", "Claim", "Run", "acc", "claims",
           "data_info", "gram_numbers", "load_run", "mlp_claims", "mlp_headline", "num", "pct",
           "rfm_claims", "rfm_headline", "run_record", "seconds", "settings_text",
           "theory_claims", "theory_numbers"]

#: The run kinds a report reads (``config.json``'s ``"kind"``), in the order it lists them.
KINDS = ("rfm", "mlp", "theory")
#: Figures 1, 2 and 3 of the paper are on CIFAR-10; Figures 6 and 7 show the other datasets.
MAIN_DATASET = "cifar10"
#: How the page names a dataset.
DISPLAY_NAMES = {"digits": "digits", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST",
                 "cifar10": "CIFAR-10", "svhn": "SVHN"}
#: Order of the headline table.
FIGURE_ORDER = {"Fig. 1": 1, "Fig. 2": 2, "Fig. 3": 3, "Fig. 4": 4, "Fig. 6": 6, "Fig. 7": 7,
                "Fig. 8": 8, "Thm 5.4": 9, "Thm 5.5": 10}
# config["data"] of MLP runs made before the one data schema: old key -> key of today
_OLD_DATA_KEYS = {"n_train": "train", "n_test": "test", "in_dim": "dim", "num_classes": "classes"}


# ============================================================================ reading runs
@dataclass(frozen=True)
class Run:
    """A run folder as the report sees it: its :class:`~agop.experiments.records.RunDir` and
    the records read from it once (metrics rows, summary, figure files).

    ``problems``: what is wrong with its records
    (:meth:`~agop.experiments.records.RunDir.record_problems`: a table cut short, changed
    after the run, missing or empty); a run with problems has no ``rows``, and the report
    shows none of its numbers (:func:`agop.report.page.build_report`).
    """

    folder: RunDir
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    figures: list[Path]
    problems: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def kind(self) -> str:
        return self.folder.kind

    @property
    def config(self) -> dict[str, Any]:
        return self.folder.config

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset(self) -> str | None:
        return self.folder.settings.get("dataset")

    @property
    def data(self) -> dict[str, Any]:
        """``config["data"]`` in the one schema (:func:`data_info`)."""
        return data_info(self.config)

    @property
    def complete(self) -> bool:
        return bool(self.summary and self.summary.get("complete"))

    @property
    def label(self) -> str:
        """e.g. "Deep RFM, MNIST (rfm-mnist)"."""
        what = {"rfm": "Deep RFM", "mlp": "MLP", "theory": "theory"}[self.kind]
        data = f", {DISPLAY_NAMES.get(self.dataset, self.dataset)}" if self.dataset else ""
        return f"{what}{data} ({self.name})"


def load_run(path: Any) -> Run:
    """Read a run folder; ValueError if it is not one (not a folder, no config.json, a kind not
    in :data:`KINDS`).

    Records that cannot be trusted (:meth:`~agop.experiments.records.RunDir.record_problems`)
    do not raise: the :class:`Run` carries them as ``problems``, with no rows.
    """
    folder = RunDir.open(path)
    if folder.kind not in KINDS:
        raise ValueError(f"{folder.path / CONFIG}: kind {folder.config.get('kind')!r} is "
                         f"not one of {', '.join(KINDS)}")
    problems = tuple(folder.record_problems())
    rows = [] if problems else read_csv(folder.table)
    try:
        summary = folder.read_summary()
    except ValueError:  # not JSON: one of the problems
        summary = None
    figures = sorted((folder.path / FIGURES).glob("*.png"))
    return Run(folder, rows, summary, figures, problems)


def data_info(config: dict[str, Any]) -> dict[str, Any]:
    """``config["data"]`` with the keys of today (``name, train, test, dim, classes,
    class_names, image_shape``); the keys of older MLP runs (``n_train``, ``n_test``,
    ``in_dim``, ``num_classes``) are read as their new names."""
    data = dict(config.get("data") or {})
    for old, new in _OLD_DATA_KEYS.items():
        if old in data:
            data.setdefault(new, data.pop(old))
    return data


# ============================================================================ headline numbers
def gram_numbers(path: Path, num_classes: int | None) -> dict[str, Any] | None:
    """The last stored Gram matrix of a run against the collapsed one
    (:func:`agop.experiments.rfm.gram_summary`); None without Gram snapshots."""
    return gram_summary(load_grams(path), num_classes)


_THEORY_GROUPS = (("fig4", ("prop5.1", "fig4")), ("thm5.4", ("thm5.4", "lemmaa.2")),
                  ("thm5.5", ("thm5.5",)))
_THEORY_SUMMARY_KEYS = ("relu_ratio_at_2", "relu_mc_max_z_inner", "relu_mc_max_z_distance",
                        "krr_dataset", "krr_ratio_laplace", "krr_ratio_rfm",
                        "krr_max_ratio_random", "contraction_rates")


def passed(row: dict[str, Any]) -> bool:
    """Whether a row of ``theory.csv`` passed (the CSV stores the bool as text)."""
    return str(row.get("passed")).strip().lower() in ("true", "1")


def theory_numbers(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> dict[str, Any]:
    """Checks passed per part of the theory (Figure 4, Theorems 5.4, 5.5) from ``theory.csv``.

    ``rows``: check, value, expected, passed, note. Rows are grouped by the check's prefix.
    """
    out: dict[str, Any] = {"checks": len(rows), "passed": sum(passed(r) for r in rows),
                           "failed": [str(r.get("check")) for r in rows if not passed(r)]}
    for key, prefixes in _THEORY_GROUPS:
        part = [r for r in rows if str(r.get("check", "")).lower().startswith(prefixes)]
        out[key] = {"checks": len(part), "passed": sum(passed(r) for r in part)}
    s = summary or {}
    out.update({k: s[k] for k in _THEORY_SUMMARY_KEYS if k in s})
    return out


# ============================================================================ formatting
def num(v: Any, digits: int = 3) -> str:
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


def pct(v: float) -> str:
    """A share as a whole percentage ("133%"); NaN: "n/a"."""
    return "n/a" if not math.isfinite(v) else f"{100 * v:.0f}%"


def acc(v: float) -> str:
    """An accuracy with three decimals; NaN: "n/a"."""
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


def _finite_or_none(v: float, test: Callable[[float], bool]) -> bool | None:
    return bool(test(v)) if math.isfinite(v) else None


def rfm_claims(run: Run, x: dict[str, Any], gram: dict[str, Any] | None) -> list[Claim]:
    """The Deep RFM statements of Section 5.2 (Figures 2, 3, 6) against one run's numbers."""
    fig = "Fig. 3" if run.dataset == MAIN_DATASET else "Fig. 6"
    L = x["layers"]
    out = [
        Claim(fig, run.label, "NC1 of the layer input falls by orders of magnitude over the "
              "layers.",
              f"NC1 {num(x['nc1_first'])} (layer 1) → {num(x['nc1_last'])} (layer "
              f"{x['last_layer']}): {num(x['nc1_reduction'])}× smaller",
              _finite_or_none(x["nc1_reduction"], lambda v: v >= 10), "at least 10× smaller"),
        Claim(fig, run.label, "The improvement in NC1 is entirely due to the AGOP projection "
              "M^{1/2}.",
              f"share of the log-NC1 reduction: agop step {pct(x['share_agop'])}, random "
              f"features {pct(x['share_features'])}, normalization "
              f"{pct(x['share_normalize'])}; agop stage below input in "
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
              f"NC2 {num(x['nc2_first'])} → {num(x['nc2_last'])}",
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
    """The MLP statements of Section 4 (Figures 1, 7, 8) against one run's numbers
    (:func:`agop.experiments.mlp.headline`)."""
    fig = "Fig. 1" if run.dataset == MAIN_DATASET else "Fig. 7"
    L = x["num_layers"]
    return [
        Claim(fig, run.label, "Within-class variability is reduced mostly by the right "
              "singular structure S Vᵀ, not by U and the ReLU.",
              f"epoch {x['last_epoch']}, summed over layers: S Vᵀ removed "
              f"{num(x['drop_right_total'])} decades of NC1, U + ReLU "
              f"{num(x['drop_output_total'])} (S Vᵀ share {pct(x['share_right'])}); S Vᵀ "
              f"dominated in {x['layers_right_dominates']} of {L} layers",
              x["layers_right_dominates"] > L / 2 if L else None,
              "S Vᵀ dominates in most layers"),
        Claim("Fig. 8", run.label, "Neural Feature Ansatz: WᵀW is strongly correlated with "
              "the square root of the AGOP through training.",
              f"ρ(WᵀW, AGOP^½) at epoch {x['last_epoch']}: mean "
              f"{num(x['nfa_sqrt_mean_last_epoch'])} over layers (range "
              f"{num(x['nfa_sqrt_min_last_epoch'])}–{num(x['nfa_sqrt_max_last_epoch'])}), "
              f"lowest during training {num(x['nfa_sqrt_min_all_epochs'])}; ρ(WᵀW, AGOP) mean "
              f"{num(x['nfa_mean_last_epoch'])}",
              _finite_or_none(x["nfa_sqrt_mean_last_epoch"], lambda v: v >= 0.8),
              "mean ρ(WᵀW, AGOP^½) ≥ 0.8 at the end"),
        Claim("Fig. 8", run.label, "Training collapses the last layer: tr Σ_W/tr Σ_T falls.",
              f"last layer output: {num(x['within_total_first_epoch'])} (epoch "
              f"{x['first_epoch']}) → {num(x['within_total_last_epoch'])} (epoch "
              f"{x['last_epoch']}); train accuracy {acc(x['train_acc'])}, test "
              f"{acc(x['test_acc'])}",
              _finite_or_none(x["within_total_last_epoch"] - x["within_total_first_epoch"],
                              lambda v: v < 0), "last below first"),
    ]


def theory_claims(run: Run, x: dict[str, Any]) -> list[Claim]:
    """Proposition 5.1 (Figure 4), Theorems 5.4 and 5.5 against the checks of ``agop theory``."""
    def verdict(part):
        return part["passed"] == part["checks"] if part["checks"] else None

    fig4, t54, t55 = x["fig4"], x["thm5.4"], x["thm5.5"]
    z = max(metric_float(x.get("relu_mc_max_z_inner")),
            metric_float(x.get("relu_mc_max_z_distance")))
    rates = x.get("contraction_rates") or {}
    rate = next((v for k, v in rates.items() if "exact" in k), math.nan)
    lap, rfm = x.get("krr_ratio_laplace") or {}, x.get("krr_ratio_rfm") or {}
    mu = next(iter(lap), None)
    krr = (f"; μ = {mu}: objective/bound {num(metric_float(lap[mu]))} (Laplace) vs "
           f"{num(metric_float(rfm.get(mu)))} (RFM k_M) on {x.get('krr_dataset', '?')}"
           if mu is not None else "")
    return [
        Claim("Fig. 4", run.label, "E‖σ(Wx) − σ(Wy)‖/‖x − y‖ decreases monotonically within "
              "[1/√2, 1]; theory and simulation match.",
              f"{fig4['passed']} of {fig4['checks']} checks passed; ratio at ‖x − y‖ = 2: "
              f"{num(metric_float(x.get('relu_ratio_at_2')), 5)}; Monte-Carlo max |z| {num(z)}",
              verdict(fig4), "every check passes"),
        Claim("Thm 5.4", run.label, "Linearized Deep RFM collapses geometrically; larger λ_k "
              "slows it, larger λ_Φ speeds it up.",
              f"{t54['passed']} of {t54['checks']} checks passed; contraction rate per layer "
              f"{num(rate)} at λ_k/λ_Φ = 0.02", verdict(t54), "every check passes"),
        Claim("Thm 5.5", run.label, "yᵀ(k + μI)⁻¹ky ≤ 2n·n/(n + μ), attained by the "
              "collapsed kernel; AGOP kernels get closer than the plain Laplace kernel.",
              f"{t55['passed']} of {t55['checks']} checks passed{krr}", verdict(t55),
              "every check passes"),
    ]


def claims(rfm: list[tuple], mlp: list[tuple], theory: list[tuple]) -> list[Claim]:
    """Every claim of the runs' numbers, in the order of the paper's figures.

    ``rfm``: (run, :func:`agop.experiments.rfm.headline`, :func:`gram_numbers`) triples;
    ``mlp``: (run, :func:`agop.experiments.mlp.headline`); ``theory``: (run,
    :func:`theory_numbers`).
    """
    out = ([c for r, x, g in rfm for c in rfm_claims(r, x, g)]
           + [c for r, x in mlp for c in mlp_claims(r, x)]
           + [c for r, x in theory for c in theory_claims(r, x)])
    out.sort(key=lambda c: FIGURE_ORDER.get(c.figure, 99))
    return out


# ============================================================================ the runs table
def seconds(run: Run, timings: dict[str, float]) -> float:
    """Active seconds: from ``timings``, else the timings.json of the reproduce folder holding
    the run (``DIR/runs/<name>``), else Deep RFM's own layer and metric seconds, else NaN."""
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


def settings_text(run: Run) -> str:
    """The run's settings as ``key=value, ...`` (dataset and data folder left out)."""
    s = {k: v for k, v in run.folder.settings.items()
         if v is not None and k not in ("dataset", "data_dir")}
    return ", ".join(f"{k}={v}" for k, v in s.items())


def run_record(run: Run, timings: dict[str, float], notes: dict[str, str]) -> dict[str, Any]:
    """One entry of ``summary.json``'s ``"runs"``."""
    c = run.config
    return {"name": run.name, "kind": run.kind, "dataset": run.dataset, "path": str(run.path),
            "complete": run.complete, "settings": run.folder.settings,
            "device": c.get("device"), "dtype": c.get("dtype"),
            "seconds": seconds(run, timings), "agop_version": c.get("agop_version"),
            "note": notes.get(run.name, ""), "problems": list(run.problems)}
