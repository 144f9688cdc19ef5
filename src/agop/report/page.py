"""The report page: run folders in, one self-contained HTML file and its numbers as JSON out.

:func:`build_report` reads the runs and their numbers (:mod:`agop.report.numbers`), draws the
cross-dataset figures, and renders ``templates/report.html.j2`` (Jinja2, autoescaping on: every
string from a config, a CSV or a folder name is escaped) with ``templates/report.css`` inlined.
The page holds everything it shows: figures as base64 PNG data, the CSS in a ``<style>``
element, no scripts, no links to fetch. The prose (section texts, captions, notes) lives in the
template; this module decides which figures go into which section.

Figures of the paper and where they come from: Figure 1 (MLP, CIFAR-10) and Figure 7 (MLP, other
datasets): NC1 of each layer's input, S Vᵀ stage and output over training; Figure 2: Gram
matrices of Deep RFM layer inputs; Figure 3 (Deep RFM, CIFAR-10) and Figure 6 (other datasets):
NC1 and NC2 per layer at the input, agop and features stages; Figure 4: Proposition 5.1's
feature distance; Figure 8: variability shares, NFA correlations and loss of the MLP.

Every run section is marked with the run's scale, size and (Deep RFM) solver, read from its own
records (:class:`Mark`, :func:`run_mark`), and each Deep RFM section shows where its time went
(:class:`StepTime`: ``figures/step_seconds.png`` and the step that dominates).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import math
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
from markupsafe import Markup

from agop import __version__
from agop._validate import metric_float
from agop.experiments.records import atomic_write_json, atomic_write_text
from agop.report.scales import SCALES
from agop.report.numbers import (DISPLAY_NAMES, KINDS, MAIN_DATASET, Run, acc, claims,
                                 gram_numbers, load_run, mlp_headline, num, passed, pct,
                                 rfm_headline, run_record, seconds, settings_text,
                                 theory_claims, theory_numbers)

__all__ = ["Mark", "build_report", "check_targets", "render", "run_mark", "run_scale",
           "run_solver"]

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
#: What marks the files a report writes as agop's (the page's <meta name="generator">, the
#: numbers file's "generator"): only such files are ever replaced.
GENERATOR = "agop report"
#: The stems of the cross-dataset figures (PNG, and PDF with ``pdf``) in the figures folder.
CROSS_FIGURES = ("rfm_nc1_all", "mlp_final_all")


@dataclass(frozen=True)
class Panel:
    """One run's figures in one section of the page.

    ``images``: data URIs of the run's figures for that section (empty: none was found, and
    the page says where it looked); ``numbers``: what the section's caption is written from.
    """

    run: Run
    numbers: Any
    images: list[str]


@dataclass(frozen=True)
class TheoryFigure:
    """A figure of a theory run outside Figure 4; ``key`` names the theorem it shows, if any."""

    run: Run
    stem: str
    key: str | None
    image: str


@dataclass(frozen=True)
class Mark:
    """What a run's sections are marked with, read from the run's own records: the scale its
    settings belong to, its size and, for Deep RFM, the solver that ran.

    ``scale``: "tiny", "quick" or "paper" (:func:`run_scale`), "custom" (the settings of no
    scale), "fixed" (the theory checks: one size at every scale). ``n``: training points
    (``config["data"]["train"]``), ``test``: test points; ``depth``: Deep RFM's AGOP layers or
    the MLP's hidden layers; ``epochs``: the MLP's; ``solver``: "exact" or "nystrom" as
    config.json (else metrics.csv's ``solver`` column) records it, None where not recorded;
    ``centers``: M of a Nyström run. The theory's Theorem 5.5 problem: ``dataset``, ``n`` per
    class in ``per_class``.
    """

    kind: str
    scale: str
    n: int | None = None
    test: int | None = None
    depth: int | None = None
    epochs: int | None = None
    solver: str | None = None
    centers: int | None = None
    dataset: str | None = None
    per_class: int | None = None

    @property
    def scale_text(self) -> str:
        """The scale as the page names it."""
        return {"custom": "custom (the sizes of no scale)",
                "fixed": "the same at every scale"}.get(self.scale, self.scale)

    @property
    def solver_text(self) -> str:
        """The solver as the page names it: "exact", "Nyström, M = 4,000 centers" or "not
        recorded"; empty outside Deep RFM."""
        if self.kind != "rfm":
            return ""
        if self.solver == "nystrom":
            return "Nyström" + (f", M = {self.centers:,} centers" if self.centers else "")
        return self.solver or "not recorded"

    @property
    def short(self) -> str:
        """One cell of a table: the scale, and the solver of a Deep RFM run."""
        return self.scale_text + (f"; {self.solver_text}" if self.kind == "rfm" else "")

    def record(self) -> dict[str, Any]:
        """The mark in the report's numbers file."""
        out = {"scale": self.scale}
        if self.kind == "rfm":
            out.update(solver=self.solver, centers=self.centers)
        return out


def _int(v: Any) -> int | None:
    """A recorded count as an int; None for anything that is not a finite number."""
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def _planned(kind: str, dataset: Any, sizes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings a scale's ``sizes`` give a run of ``kind`` on ``dataset`` before the caps of
    :func:`agop.report.plan.plan` (Deep RFM: the run, and the exact cross-check if any)."""
    if kind not in sizes:
        return []
    out = [{**sizes[kind], **sizes.get(f"{kind}:{dataset}", {})}]
    if kind == "rfm" and "rfm-check" in sizes:
        check = {**sizes["rfm"], **sizes["rfm-check"]}
        check.pop("centers", None)
        out.append(check)
    return out


def _matches(run: Run, want: dict[str, Any]) -> bool:
    """Whether the run's settings are ``want`` (a scale's sizes) with every other setting at
    its default, allowing the caps of :func:`agop.report.plan.plan`: ``n`` and ``test_n`` cut
    to what the files held (``config["data"]``), ``test_n`` 0 without a test split, the
    Nyström centers cut to ``n``."""
    from agop.experiments.mlp import MLP_DEFAULTS
    from agop.experiments.rfm import RFM_DEFAULTS
    from agop.models.mlp import PRESETS

    if run.kind == "rfm":
        defaults = dict(RFM_DEFAULTS)
    else:
        preset = want.get("preset", MLP_DEFAULTS["preset"])
        defaults = {**MLP_DEFAULTS, **PRESETS.get(preset, {})}
    have = run.folder.settings
    data = run.data
    expected = {**defaults, **want}
    for key, v in expected.items():
        if key in ("dataset", "device", "data_dir"):  # where it ran, not what it computed
            continue
        h = have.get(key, defaults.get(key))
        if h == v:
            continue
        count = data.get("train" if key == "n" else "test")
        capped = (key in ("n", "test_n") and isinstance(v, int) and _int(h) is not None
                  and h < v and h == count)
        no_test = key == "test_n" and h == 0 and not count
        centers = (key == "centers" and isinstance(v, int) and _int(h) is not None and h < v
                   and h == have.get("n"))
        if not (capped or no_test or centers):
            return False
    return True


def run_scale(run: Run, scale: str | None = None) -> str:
    """The scale of :data:`agop.report.scales.SCALES` whose plan gives the run's settings
    (``scale``, the one the report was made at, is tried first); "custom" for none, "fixed"
    for the theory checks (not sized by a scale). Read from the run's config.json alone, so a
    run keeps its scale in a report of runs from several scales."""

    if run.kind == "theory":
        return "fixed"
    order = ([scale] if scale in SCALES else []) + [s for s in SCALES if s != scale]
    for name in order:
        if any(_matches(run, want) for want in _planned(run.kind, run.dataset, SCALES[name])):
            return name
    return "custom"


def run_solver(run: Run) -> tuple[str | None, int | None]:
    """(solver, centers) of a Deep RFM run as it ran: config.json's ``solver`` and
    ``centers.count``; else metrics.csv's ``solver``/``centers`` columns (written by Nyström
    layers only: a table without them ran exact); (None, None) without either record."""
    c = run.config
    solver = c.get("solver") if c.get("solver") in ("exact", "nystrom") else None
    centers = c.get("centers")
    centers = _int(centers.get("count")) if isinstance(centers, dict) else None
    if solver is None and run.rows:
        nystrom = [r for r in run.rows if r.get("solver") == "nystrom"]
        solver = "nystrom" if nystrom else "exact" if not any("solver" in r for r in run.rows) \
            else None
        if nystrom and centers is None:
            centers = _int(nystrom[0].get("centers"))
    return solver, centers if solver == "nystrom" else None


def run_mark(run: Run, scale: str | None = None) -> Mark:
    """The :class:`Mark` of a run (see there), from its config.json, metrics.csv and
    summary.json."""
    s, data, summary = run.folder.settings, run.data, run.summary or {}
    if run.kind == "theory":
        return Mark("theory", "fixed", dataset=summary.get("krr_dataset"),
                    per_class=_int(summary.get("krr_per_class")))
    common = dict(n=_int(data.get("train", s.get("n"))), test=_int(data.get("test")),
                  depth=_int(s.get("depth")))
    if run.kind == "rfm":
        solver, centers = run_solver(run)
        return Mark("rfm", run_scale(run, scale), solver=solver, centers=centers, **common)
    return Mark(run.kind, run_scale(run, scale), epochs=_int(s.get("epochs")), **common)


@dataclass(frozen=True)
class StepTime:
    """Where a Deep RFM run's time went (:func:`agop.experiments.rfm.step_seconds`): the
    ``seconds`` of every step, ``steps`` (step, seconds, share of ``total``) of those that
    took any, largest first, the ``dominant`` step, the number of ``layers`` timed and the
    figure (data URI; None: nothing timed)."""

    seconds: dict[str, float]
    steps: list[tuple[str, float, float]]
    total: float
    dominant: str | None
    layers: int
    image: str | None


def _step_time(run: Run) -> StepTime:
    """The run's :class:`StepTime`; its figure is the run's own ``figures/step_seconds.png``,
    else drawn from its rows for the page (a run made before the figure existed)."""
    import tempfile

    from agop.experiments import figures
    from agop.experiments.rfm import STEP_FIGURE, layer_step_seconds, step_seconds

    totals, dominant = step_seconds(run.rows)
    total = sum(totals.values())
    steps = sorted(((k, v, v / total) for k, v in totals.items() if v > 0),
                   key=lambda t: -t[1]) if total > 0 else []
    image = None
    if dominant is not None:
        own = [p for p in run.figures if p.stem == STEP_FIGURE]
        if own:
            image = _data_uri(own[0])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                n = _int(run.data.get("train"))
                title = f"{run.data.get('name', run.dataset)}, N = {_count(n)}"
                drawn = figures.rfm_step_seconds(run.rows, Path(tmp) / STEP_FIGURE, title=title)
                image = _data_uri(drawn[0])
    return StepTime(totals, steps, total, dominant, len(layer_step_seconds(run.rows)), image)


# ============================================================================ rendering
@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("agop.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, pct=pct, acc=acc, dataset_name=_dataset_name,
                       seconds=_seconds_text, duration=_duration, count=_count)
    env.tests["passed"] = passed
    return env


def _dataset_name(name: Any) -> str:
    return DISPLAY_NAMES.get(name, name)


def _seconds_text(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else ""


def _duration(v: float) -> str:
    """Seconds for prose: one decimal, two significant digits below 0.1 s."""
    return f"{v:.1f}" if v >= 0.1 else f"{v:.2g}"


def _count(v: Any) -> str:
    """A count with thousands separators ("50,000"); unknown: "?"."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "?"


def _stylesheet() -> Markup:
    """The CSS, trusted (it is this package's own file), for the page's ``<style>`` element."""
    css = resources.files("agop.report").joinpath("templates", STYLESHEET)
    return Markup(css.read_text(encoding="utf-8"))


def render(**context: Any) -> str:
    """The HTML page: ``templates/report.html.j2`` rendered with ``context`` (see
    :func:`build_report` for what it holds) and the stylesheet."""
    return _environment().get_template(TEMPLATE).render(css=_stylesheet(), **context)


# ============================================================================ figures
def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _panel(run: Run, numbers: Any, *words: str) -> Panel:
    """``run``'s figures whose file name contains one of ``words``."""
    found = [p for p in run.figures if any(w in p.stem.lower() for w in words)]
    return Panel(run, numbers, [_data_uri(p) for p in found])


def _theory_figures(run: Run) -> list[TheoryFigure]:
    """A theory run's figures other than Figure 4's, with the theorem each one shows."""
    out = []
    for p in run.figures:
        stem = p.stem.lower()
        if any(w in stem for w in ("figure4", "relu")):
            continue
        key = ("Thm 5.4" if any(w in stem for w in ("54", "contraction")) else
               "Thm 5.5" if any(w in stem for w in ("55", "bound", "krr")) else None)
        out.append(TheoryFigure(run, p.stem, key, _data_uri(p)))
    return out


def _order(items: list[tuple]) -> list[tuple]:
    """(run, ...) tuples with the paper's main dataset (CIFAR-10) first, others as given."""
    return sorted(items, key=lambda t: t[0].dataset != MAIN_DATASET)


def _unique(items: list[tuple], run: Run) -> bool:
    """Whether ``run`` is the only one of its dataset among ``items`` (label by dataset)."""
    return sum(i[0].dataset == run.dataset for i in items) == 1


def _cross_figures(rfm: list[tuple], mlp: list[tuple], figures_dir: Path,
                   pdf: bool) -> tuple[dict[str, Path], list[Path]]:
    """Cross-dataset figures (only when there are runs to compare): the PNG of each by name
    ("rfm", "mlp"), and every file written (PDF too with ``pdf``)."""
    from agop.experiments import figures

    out, files = {}, []
    if rfm:
        curves = []
        for r, _, _ in rfm:
            by = {(row.get("layer"), row.get("stage")): metric_float(row.get("nc1"))
                  for row in r.rows}
            layers = sorted(l for l, s in by if s == "input")
            curves.append({"label": _dataset_name(r.dataset) if _unique(rfm, r) else r.name,
                           "layers": layers,
                           "input": [by[(l, "input")] for l in layers],
                           "agop": [by.get((l, "agop"), math.nan) for l in layers]})
        written = figures.report_rfm_nc1(curves, figures_dir / CROSS_FIGURES[0], pdf=pdf)
        out["rfm"], files = written[0], files + list(written)
    if mlp:
        curves = [{"label": _dataset_name(r.dataset) if _unique(mlp, r) else r.name,
                   "epoch": x["last_epoch"], "layers": x["per_layer"]} for r, x in mlp]
        written = figures.report_mlp_final(curves, figures_dir / CROSS_FIGURES[1], pdf=pdf)
        out["mlp"], files = written[0], files + list(written)
    return out, files


# ============================================================================ where it writes
def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _agop_page(path: Path) -> bool:
    """Whether ``path`` is a report page agop wrote (its generator tag; older pages: title)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return (f'<meta name="generator" content="{GENERATOR}' in head
            or "<title>agop: reproduction report</title>" in head)


def _agop_numbers(path: Path) -> dict[str, Any] | None:
    """The numbers file of a report agop wrote (parsed), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    old = {"agop_version", "created", "report", "runs", "claims"} <= set(data)
    return data if data.get("generator") == GENERATOR or old else None


def check_targets(out_file: Any, summary_file: Any, figures_dir: Any,
                  runs: Iterable[Any] = ()) -> None:
    """Refuse, before anything is written, a report that would destroy a record.

    The page ``out_file``, its numbers ``summary_file`` and the cross-dataset figures in
    ``figures_dir`` may not lie in a run folder the report reads (``runs``: their paths), may
    not be one file, and replace only files a report wrote: a page with agop's generator tag,
    a numbers file with its "generator", a figure that the numbers file there lists.

    Raises
    ------
    ValueError
        Naming the file and what to do.
    """
    out_file, summary_file, figures_dir = Path(out_file), Path(summary_file), Path(figures_dir)
    targets = (("the report", out_file), ("its numbers", summary_file),
               ("its figures", figures_dir))
    for run in runs:
        for what, target in targets:
            if _inside(target, Path(run)):
                raise ValueError(f"{what} ({target}) would be written into the run folder "
                                 f"{run}, which the report reads; agop never writes into an "
                                 f"input run: give --out a file outside it")
    if out_file.resolve() == summary_file.resolve():
        raise ValueError(f"the report {out_file} and its numbers would be the same file; give "
                         f"--out a name ending in .html")
    for what, target in targets[:2]:
        if target.is_dir():
            raise ValueError(f"{what} ({target}) names a folder; give --out a file name such "
                             f"as report.html")
    if out_file.exists() and not _agop_page(out_file):
        raise ValueError(f"{out_file} exists and is not a report agop wrote; agop does not "
                         f"replace it: choose another --out or move it away")
    numbers = _agop_numbers(summary_file) if summary_file.exists() else None
    if summary_file.exists() and numbers is None:
        raise ValueError(f"{summary_file} exists and is not the numbers file of a report agop "
                         f"wrote; agop does not replace it: choose another --out or move it "
                         f"away")
    if figures_dir.exists() and not figures_dir.is_dir():
        raise ValueError(f"{figures_dir} (the report's figures folder) is a file; choose "
                         f"another --out or move it away")
    # by name: the paths listed may be relative to another working directory
    listed = {Path(f).stem for f in (numbers or {}).get("figures", []) if isinstance(f, str)}
    for stem in CROSS_FIGURES:
        for suffix in (".png", ".pdf"):
            f = figures_dir / (stem + suffix)
            if f.exists() and stem not in listed:
                raise ValueError(f"{f} exists and {summary_file} does not list it as a figure "
                                 f"agop wrote; agop does not replace it: choose another --out "
                                 f"or move it away")


# ============================================================================ the report
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
    :func:`agop.report.plan.reproduce`. Returns the path of the HTML page.
    """
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
    check_targets(out_file, summary_file, figures_dir, [r.path for r in runs])
    timings, notes = dict(timings or {}), dict(notes or {})

    damaged = [r for r in runs if r.problems]
    for r in damaged:
        warnings.warn(f"{r.label}: {'; '.join(r.problems)}; its numbers are left out of the "
                      f"report", stacklevel=2)
    usable = [r for r in runs if not r.problems]
    rfm = [(r, x, gram_numbers(r.path, r.data.get("classes")))
           for r in usable if r.kind == "rfm" for x in [rfm_headline(r.rows)] if x]
    mlp = [(r, x) for r in usable if r.kind == "mlp" for x in [mlp_headline(r.rows)] if x]
    theory = [(r, theory_numbers(r.rows, r.summary)) for r in usable
              if r.kind == "theory" and r.rows]
    found = claims(rfm, mlp, theory)
    cross, cross_files = _cross_figures(rfm, mlp, figures_dir, pdf)
    built = _dt.datetime.now().isoformat(timespec="seconds")

    rfm_main = [t for t in rfm if t[0].dataset == MAIN_DATASET]
    rfm_other = [t for t in rfm if t[0].dataset != MAIN_DATASET]
    mlp_main = [t for t in mlp if t[0].dataset == MAIN_DATASET]
    mlp_other = [t for t in mlp if t[0].dataset != MAIN_DATASET]
    said = {r.name: {c.figure: c.measured for c in theory_claims(r, x)} for r, x in theory}
    # every run's scale and solver, from its own records (not from the plan of this report)
    marks = {r.name: run_mark(r, scale) for r in runs}
    by_label = {r.label: marks[r.name] for r in runs}
    timing = {r.name: _step_time(r) for r, _, _ in rfm}
    page = render(
        version=__version__, built=built, scale=scale,
        kinds=[(k, sum(r.kind == k for r in runs)) for k in KINDS
               if any(r.kind == k for r in runs)],
        skipped=list(skipped), damaged=damaged,
        incomplete=[r for r in usable if not r.complete],
        claims=found,
        fig1=[_panel(r, x, "nc1", "stage") for r, x in mlp_main],
        fig2=[_panel(r, g, "gram") for r, _, g in _order(rfm)],
        fig3=[_panel(r, x, "collapse") for r, x, _ in rfm_main],
        fig4=[_panel(r, said[r.name], "figure4", "relu") for r, _ in theory],
        fig6=[_panel(r, x, "collapse") for r, x, _ in rfm_other],
        fig7=[_panel(r, x, "nc1", "stage") for r, x in mlp_other],
        fig8=[_panel(r, x, "nfa", "training") for r, x in _order(mlp)],
        theorems=[(f, said[f.run.name]) for r, _ in theory for f in _theory_figures(r)],
        cross={k: _data_uri(p) for k, p in cross.items()},
        theory=theory,
        runs=[(r, settings_text(r), seconds(r, timings), notes.get(r.name, "")) for r in runs],
        marks=marks, marks_by_label=by_label, timing=timing,
    )
    atomic_write_text(out_file, page)

    summary = {
        "generator": GENERATOR,
        "agop_version": __version__,
        "created": built,
        "scale": scale, "report": str(out_file), "skipped": list(skipped),
        "runs": [{**run_record(r, timings, notes), **marks[r.name].record()} for r in runs],
        "damaged": {r.name: list(r.problems) for r in damaged},
        "rfm": [{"run": r.name, "dataset": r.dataset, **x, "gram_last": g,
                 **marks[r.name].record(),
                 "step_seconds": timing[r.name].seconds,
                 "dominant_step": timing[r.name].dominant} for r, x, g in rfm],
        "mlp": [{"run": r.name, "dataset": r.dataset, **x} for r, x in mlp],
        "theory": [{"run": r.name, **x} for r, x in theory],
        "claims": [{**vars(c), **(by_label[c.run].record() if c.run in by_label else {})}
                   for c in found],
        "figures": [str(p) for p in cross_files],
    }
    atomic_write_json(summary_file, summary)
    return out_file
