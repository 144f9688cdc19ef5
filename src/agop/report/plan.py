"""The plan of ``agop reproduce``: which runs at which sizes, and running them with resume.

:func:`plan` lists the experiments of a scale (:data:`SCALES`) on the datasets found;
:func:`reproduce` runs them, each in its own folder under ``DIR/runs/`` (a finished run is kept,
an interrupted one continued), then builds the report with
:func:`agop.report.page.build_report`. The experiments and the page are imported when they
run (:func:`agop.experiments.rfm.run_rfm`, :func:`agop.experiments.mlp.run_mlp`,
:func:`agop.experiments.theory.run_theory`), so that the CLI reads :data:`SCALES` without
loading torch.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PAPER_DATASETS", "SCALES", "Experiment", "dry_run", "format_dry_run", "plan",
           "reproduce"]

from agop.report.scales import PAPER_DATASETS, SCALES  # noqa: E402 - re-exported

_RUN_KINDS = ("rfm", "mlp")  # one run of each per dataset, in this order; then the theory


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
            try:
                key = ds.canonical_name(name)
            except ValueError as exc:
                raise ValueError(f"{exc} (in --datasets)") from None
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
    for kind in _RUN_KINDS:
        for name, counts in found:
            settings = {"dataset": name, **sizes[kind], **sizes.get(f"{kind}:{name}", {})}
            note = _fit(settings, counts, scale)
            if settings.get("centers") and settings.get("n") and settings["centers"] > settings["n"]:
                settings["centers"] = settings["n"]  # fewer points than centers: M = N
            out.append(Experiment(f"{kind}-{name}", kind, name, settings, note))
            check = sizes.get("rfm-check")
            if kind == "rfm" and check and settings.get("n") is not None \
                    and settings["n"] > check["n"] and _solver(settings, name) != "exact":
                cs = {"dataset": name, **sizes[kind], **check}
                cs.pop("centers", None)
                out.append(Experiment(f"rfm-{name}-exact", "rfm", name, cs,
                                      _fit(cs, counts, scale) or "exact cross-check of the "
                                      "Nyström run"))
    out.append(Experiment("theory", "theory", None, {"seed": 0}))
    return out, skipped


def _dims(name: str) -> tuple[int, int]:
    """(D, K) of a dataset, from its description (no files read)."""
    from agop import datasets as ds

    info = ds.DATASETS[name]
    c, h, w = info.image_shape
    return c * h * w, len(info.classes)


def _solver(settings: dict[str, Any], name: str, device: str = "cpu") -> str:
    """The Deep RFM solver a run with ``settings`` will use here ("exact" or "nystrom"), as
    ``solver="auto"`` decides it: exact where its memory plan fits in one process."""
    from agop.models.deep_rfm import DeepRFM

    if settings.get("solver", "auto") != "auto":
        return settings["solver"]
    D, K = _dims(name)
    model = DeepRFM(depth=int(settings.get("depth", 10)), width=int(settings.get("width", 512)),
                    device=device)
    return model._resolve_solver(int(settings["n"]), D, K, 1)


def dry_run(scale: str = "quick", datasets: Sequence[str] | None = None, data_dir: Any = None,
            device: str = "cpu", calibration: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """The plan of :func:`reproduce` with each run's size, solver and estimated seconds on this
    machine (:mod:`agop.experiments.estimate`: a short calibration of the real code, about
    10–20 s on 2 CPU cores, unless ``calibration`` is given). Runs nothing else, writes nothing.

    Returns (rows, calibration); a row has ``name``, ``kind``, ``dataset``, ``n``, ``test_n``,
    ``solver``, ``seconds`` and ``note``.
    """
    from agop import datasets as ds
    from agop.experiments import estimate as est

    experiments, skipped = plan(scale, datasets, data_dir)
    cal = calibration if calibration is not None else est.calibrate(device)
    root = ds.resolve_root(data_dir)
    rows = []
    for e in experiments:
        row = {"name": e.name, "kind": e.kind, "dataset": e.dataset, "n": None, "test_n": None,
               "solver": "", "seconds": 0.0, "note": e.note}
        if e.kind == "theory":
            row["seconds"] = est.estimate_seconds("theory", {}, n=0, d=0, test_n=0,
                                                  calibration=cal)
        else:
            D, K = _dims(e.dataset)
            have_train, have_test = _counts(e.dataset, root)
            n = e.settings.get("n") or have_train
            test_n = e.settings.get("test_n")
            test_n = min(have_test or 0, 1000 if e.kind == "rfm" else have_test or 0) \
                if test_n is None else test_n
            solver = _solver({**e.settings, "n": n}, e.dataset, device) if e.kind == "rfm" \
                else "adam"
            row.update(n=n, test_n=test_n, solver=solver, seconds=est.estimate_seconds(
                e.kind, e.settings, n=n, d=D, test_n=test_n, calibration=cal,
                solver=solver if e.kind == "rfm" else "exact", K=K))
        rows.append(row)
    for s in skipped:
        rows.append({"name": f"({s['dataset']})", "kind": "skipped", "dataset": s["dataset"],
                     "n": None, "test_n": None, "solver": "", "seconds": 0.0,
                     "note": s["reason"]})
    return rows, cal


def format_dry_run(rows: list[dict[str, Any]], cal: Any, scale: str) -> str:
    """The dry-run table as text: one line per run and the total."""
    def hms(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    lines = [f"agop reproduce --scale {scale}: plan and estimated time on this machine "
             f"({cal.device}, {cal.threads} threads; calibrated in {cal.seconds:.0f} s; "
             f"effective GFLOP/s " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in cal.rates.items())
             + ")",
             f"{'run':<22} {'n':>7} {'test':>6} {'solver':<8} {'estimate':>9}  note"]
    total = 0.0
    for r in rows:
        if r["kind"] == "skipped":
            lines.append(f"{r['name']:<22} {'':>7} {'':>6} {'':<8} {'skipped':>9}  {r['note']}")
            continue
        total += r["seconds"]
        n = "" if r["n"] is None else f"{r['n']:,}"
        t = "" if r["test_n"] is None else f"{r['test_n']:,}"
        lines.append(f"{r['name']:<22} {n:>7} {t:>6} {r['solver']:<8} {hms(r['seconds']):>9}  "
                     f"{r['note']}")
    lines.append(f"{'total':<22} {'':>7} {'':>6} {'':<8} {hms(total):>9}  (estimates lean "
                 "high: the calibration problems are small; other jobs on the machine slow "
                 "both)")
    return "\n".join(lines)


# ============================================================================ reproduce
def _existing_state(path: Path, exp: Experiment) -> str:
    """"new", "partial" or "complete" for the run folder of ``exp``; ValueError if it conflicts."""
    from agop.experiments.records import CONFIG, RunDir, is_temporary

    if not (path / CONFIG).is_file():
        if path.exists() and (not path.is_dir()
                              or any(not is_temporary(p.name) for p in path.iterdir())):
            raise ValueError(f"{path} holds files but no run (no {CONFIG}); this plan puts its "
                             f"{exp.kind!r} run there: move them away or choose another --out")
        return "new"
    run = RunDir.open(path)
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
        from agop.experiments.mlp import run_mlp

        if state == "partial":
            run_mlp(resume=path, progress=progress, device=device, data_dir=data, pdf=pdf)
        else:
            run_mlp(out=path, progress=progress, device=device, data_dir=data, pdf=pdf,
                    **exp.settings)
    else:
        from agop.experiments.theory import run_theory

        if state == "partial":  # a few seconds of work: start again rather than resume
            shutil.rmtree(path)
        run_theory(path, progress=False, data_dir=data, pdf=pdf, **exp.settings)


def _agop_timings(path: Path) -> bool:
    """Whether ``path`` is the timings.json of a reproduce folder: seconds by run name."""
    import json
    import re

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = re.compile(r"^((rfm|mlp)-[a-z0-9-]+|theory)$")
    return isinstance(data, dict) and all(
        isinstance(k, str) and name.match(k) and isinstance(v, (int, float))
        and not isinstance(v, bool) for k, v in data.items())


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` where reproduce would replace a file it did not write: a run folder
    itself, or a report.html, summary.json, timings.json or figures/ file of anyone else."""
    from agop.experiments.records import CONFIG
    from agop.report.page import check_targets

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; reproduce writes a folder")
    if (out / CONFIG).is_file():
        raise ValueError(f"--out {out} is a run folder (it has {CONFIG}); reproduce would write "
                         f"report.html and summary.json into it: choose another folder")
    timing_file = out / "timings.json"
    if timing_file.exists() and not _agop_timings(timing_file):
        raise ValueError(f"{timing_file} exists and is not the timings file of agop reproduce; "
                         f"agop does not replace it: choose another --out or move it away")
    check_targets(out / "report.html", out / "summary.json", out / "figures")


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
    report's path. Before any work it refuses an ``out`` where it would replace a file it did
    not write (:func:`agop.report.page.check_targets`; ``out`` itself a run folder; a
    timings.json or a ``runs/<name>`` folder of something else).
    """
    from tqdm.auto import tqdm

    from agop.experiments.records import (atomic_write_json, ensure_folder, read_json,
                                          remove_temporaries)
    from agop.report.page import build_report

    experiments, skipped = plan(scale, datasets, data_dir)
    out = Path(out)
    runs_dir = out / "runs"
    timing_file = out / "timings.json"
    _check_out(out)  # before any work: nothing agop did not write is replaced
    remove_temporaries(out)  # of a report write that an earlier, killed call left
    timings = read_json(timing_file) if timing_file.is_file() else {}
    states = {e.name: _existing_state(runs_dir / e.name, e) for e in experiments}
    ensure_folder(runs_dir)

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
