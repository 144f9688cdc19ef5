"""Tests of agop.report.page: the HTML page, its escaping, its numbers file, a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from agop.cli import main
from agop.experiments.mlp import headline as mlp_headline
from agop.experiments.records import RunDir, write_csv
from agop.report import build_report

HOSTILE = '<script>alert("x")</script>'


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def _self_contained(page: str) -> None:
    """No scripts, nothing to fetch, the stylesheet inlined."""
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    assert style and "font-family" in style.group(1) and ".paper" in style.group(1)


def test_report_of_synthetic_runs_escapes_text(tmp_path, rfm_rows, mlp_rows):
    """A run folder named with HTML syntax shows as text, and the numbers reach the page."""
    run = RunDir.create(tmp_path / 'rfm<b>&"x', "rfm", {"dataset": "mnist", "n": 10})
    run.write_metrics(rfm_rows)
    run.write_summary({})
    mlp = RunDir.create(tmp_path / "m", "mlp", {"dataset": "cifar10"})
    mlp.write_metrics(mlp_rows)
    out = build_report([run.path, mlp.path], tmp_path / "out" / "r.html")
    page = out.read_text()
    assert "rfm<b>" not in page and "rfm&lt;b&gt;&amp;&#34;x" in page
    assert "NC1 8 (layer 1) → 1 (layer 3): 8× smaller" in page
    assert "agop step 133%" in page  # share 4/3
    assert "has not finished" in page  # the MLP run has no summary.json
    numbers = json.loads((tmp_path / "out" / "r.json").read_text())
    assert numbers["rfm"][0]["share_agop"] == pytest.approx(4 / 3)
    assert numbers["mlp"][0]["share_right"] == pytest.approx(2 / 3)
    figs = {c["figure"] for c in numbers["claims"]}
    assert {"Fig. 6", "Fig. 1", "Fig. 8"} <= figs  # MNIST Deep RFM is Figure 6, CIFAR MLP Fig. 1
    _self_contained(page)


def test_strings_from_configs_and_records_are_escaped(tmp_path, rfm_rows):
    """Settings, config fields, theory rows, skip reasons and notes can hold any text: none of
    it becomes markup."""
    run = RunDir.create(tmp_path / "rfm-x", "rfm", {"dataset": "mnist", "tag": HOSTILE})
    run.write_metrics(rfm_rows)
    run.update_config(device=HOSTILE, dtype="<i>f32</i>", torch_version="<u>2</u>")
    theory = RunDir.create(tmp_path / "theory", "theory", {"seed": 0})
    write_csv(theory.path / "theory.csv", [
        {"check": f"thm5.5 {HOSTILE}", "value": 1.0, "expected": "<= 1 & > 0",
         "passed": True, "note": "</td></tr></table><h1>x</h1>"}])
    out = build_report([run.path, theory.path], tmp_path / "r.html",
                       skipped=[{"dataset": "svhn", "reason": f"not found in {HOSTILE}"}],
                       notes={"rfm-x": "<b>capped</b>"})
    page = out.read_text()
    _self_contained(page)
    assert "<i>" not in page and "<u>" not in page and "<b>capped" not in page
    assert "<h1>x</h1>" not in page and "</td></tr></table><h1>" not in page
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
    assert page.count(escaped) >= 4  # settings, device, theory check, skip reason
    assert "&lt;= 1 &amp; &gt; 0" in page and "&lt;b&gt;capped&lt;/b&gt;" in page
    assert "tag=" + escaped in page  # the settings column


def test_report_numbers_are_the_experiments_headlines(tmp_path, mlp_rows):
    """summary.json's MLP entry is agop.experiments.mlp.headline of the run, key for key; the
    run's data schema may be the old one (n_train, num_classes, ...)."""
    mlp = RunDir.create(tmp_path / "mlp-mnist", "mlp", {"dataset": "mnist"})
    mlp.write_metrics(mlp_rows)
    mlp.update_config(data={"n_train": 40, "n_test": 0, "in_dim": 4, "num_classes": 2})
    build_report([mlp.path], tmp_path / "r.html")
    entry = json.loads((tmp_path / "r.json").read_text())["mlp"][0]
    want = json.loads(json.dumps(mlp_headline(mlp.read_metrics())).replace("NaN", "null"))
    assert {k: v for k, v in entry.items() if k not in ("run", "dataset")} == want


def test_report_command_on_existing_runs(tiny, tmp_path):
    runs = [str(tiny / "runs" / n) for n in ("theory", "mlp-digits")]
    assert main(["report", *runs, "--out", str(tmp_path / "r.html"), "--pdf"]) == 0
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert [r["kind"] for r in numbers["runs"]] == ["theory", "mlp"]
    assert numbers["runs"][1]["seconds"] > 0  # found in the reproduce folder's timings.json
    assert (tmp_path / "r_figures" / "mlp_final_all.pdf").is_file()


def test_reproduced_page_embeds_every_figure(tiny):
    page = (tiny / "report.html").read_text()
    for anchor in ("fig1", "fig2", "fig3", "fig4", "fig6", "fig7", "fig8", "headline", "runs"):
        assert f'id="{anchor}"' in page
    images = _images(page)
    assert len(images) >= 8  # 2 rfm + 2 mlp + 3 theory figures + 2 cross-dataset figures
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    _self_contained(page)


# ----------------------------------------------------------------------------- scale and solver
def _marks(page: str) -> dict[str, str]:
    """The mark line of every run section: run name -> its text (tags removed), one per run
    (each section repeats the same line)."""
    out = {}
    for scale, text in re.findall(r'<p class="meta mark" data-scale="([^"]*)">(.*?)</p>', page,
                                  re.S):
        name = re.search(r"\(([^()]*)\):", text).group(1)
        line = re.sub(r"<[^>]+>", "", text)
        assert out.setdefault(name, (scale, line)) == (scale, line), name
    return out


def test_every_run_section_is_marked_with_its_scale_and_solver(tiny, tmp_path):
    """The tiny reproduction: each run's sections, the headline table and the runs table carry
    the scale and (Deep RFM) the solver that ran; the same when the report is rebuilt from the
    folders alone (no scale given: it is read from each run's settings)."""
    page = (tiny / "report.html").read_text()
    marks = _marks(page)
    assert set(marks) == {"rfm-digits", "mlp-digits", "theory"}
    assert marks["rfm-digits"] == ("tiny", "Deep RFM, digits (rfm-digits): scale tiny · n = 200 "
                                   "training points, 100 test · 3 layers · solver exact · not "
                                   "the paper's sizes")
    assert marks["mlp-digits"][0] == "tiny" and "3 hidden layers, 6 epochs" in marks["mlp-digits"][1]
    assert marks["theory"][0] == "fixed" and "the same at every scale" in marks["theory"][1]
    for section in ("fig2", "fig6", "fig4", "fig7", "fig8", "theory", "checks"):
        body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
        assert 'class="meta mark"' in body, section
    numbers = json.loads((tiny / "summary.json").read_text())
    config = json.loads((tiny / "runs" / "rfm-digits" / "config.json").read_text())
    assert config["solver"] == "exact"  # the record the mark is read from
    assert {r["name"]: r["scale"] for r in numbers["runs"]} == {
        "rfm-digits": "tiny", "mlp-digits": "tiny", "theory": "fixed"}
    assert numbers["rfm"][0]["solver"] == "exact" and numbers["rfm"][0]["scale"] == "tiny"
    rfm_claims = [c for c in numbers["claims"] if "rfm-digits" in c["run"]]
    assert rfm_claims and all((c["scale"], c["solver"]) == ("tiny", "exact") for c in rfm_claims)
    assert page.count('<td class="mark">tiny; exact</td>') == len(rfm_claims)
    assert '<td class="mark">tiny</td><td class="mark">exact</td>' in page  # the runs table
    assert 'data-scale="paper"' not in page and "paper; " not in page

    rebuilt = build_report([tiny / "runs" / n for n in ("rfm-digits", "mlp-digits", "theory")],
                           tmp_path / "r.html")
    assert _marks(rebuilt.read_text()) == marks


def test_the_step_time_of_each_deep_rfm_run_is_shown(tiny):
    """Each Deep RFM section shows where its time went: the step_seconds figure and which step
    dominates, as the run's metrics.csv gives it; the numbers file has the same seconds."""
    from agop.experiments.records import read_csv
    from agop.experiments.rfm import step_seconds

    page = (tiny / "report.html").read_text()
    body = page.split('<section id="fig6">', 1)[1].split("</section>", 1)[0]
    totals, dominant = step_seconds(read_csv(tiny / "runs" / "rfm-digits" / "metrics.csv"))
    assert f"Deep RFM, digits (rfm-digits): the {dominant} step dominates the time" in body
    assert 'alt="seconds per step and layer, Deep RFM, digits (rfm-digits)"' in body
    entry = json.loads((tiny / "summary.json").read_text())["rfm"][0]
    assert entry["step_seconds"] == pytest.approx(totals) and entry["dominant_step"] == dominant


def _planned_run(tmp_path, scale, kind, dataset, rows, name=None, **config):
    """A run folder with the settings ``agop reproduce --scale SCALE`` gives ``kind`` on
    ``dataset`` (its caps included), and ``rows`` as its table."""
    from agop.experiments.mlp import MLP_DEFAULTS
    from agop.experiments.rfm import RFM_DEFAULTS
    from agop.models.mlp import PRESETS
    from agop.report.plan import plan

    exp = next(e for e in plan(scale, [dataset])[0] if e.kind == kind)
    base = (RFM_DEFAULTS if kind == "rfm"
            else {**MLP_DEFAULTS, **PRESETS[exp.settings.get("preset", "paper")]})
    settings = {**base, **exp.settings}
    run = RunDir.create(tmp_path / (name or exp.name), kind, settings)
    run.write_metrics(rows)
    run.update_config(data={"name": dataset, "train": settings["n"],
                            "test": settings["test_n"] or 0}, **config)
    return run.path


def test_a_quick_scale_section_is_never_marked_paper(tmp_path, rfm_rows, mlp_rows):
    """Runs of the quick and the paper scale in one report (digits: n capped at 1,500 either
    way): each is marked with its own scale and solver, whatever scale the report is told; the
    paper's exact cross-check is marked paper, exact; settings of no scale are custom."""
    quick = _planned_run(tmp_path, "quick", "rfm", "digits", rfm_rows, solver="exact")
    paper = _planned_run(tmp_path, "paper", "rfm", "digits", rfm_rows, name="rfm-digits-paper",
                         solver="nystrom", centers={"count": 1500, "file": "centers.npy"})
    mlp = _planned_run(tmp_path, "quick", "mlp", "digits", mlp_rows)
    check = RunDir.create(tmp_path / "rfm-mnist-exact", "rfm",
                          {"dataset": "mnist", "n": 10000, "depth": 20, "solver": "exact"})
    check.write_metrics(rfm_rows)
    check.update_config(data={"name": "mnist", "train": 10000, "test": 1000}, solver="exact")
    other = RunDir.create(tmp_path / "rfm-custom", "rfm",
                          {"dataset": "digits", "n": 1500, "depth": 20, "width": 64})
    other.write_metrics([{**r, "solver": "nystrom", "centers": 300} for r in rfm_rows])
    other.update_config(data={"name": "digits", "train": 1500, "test": 0})
    runs = [quick, paper, mlp, check.path, other.path]
    for told in (None, "paper", "quick"):
        out = build_report(runs, tmp_path / f"r-{told}.html", scale=told)
        marks = _marks(out.read_text())
        assert {k: v[0] for k, v in marks.items()} == {
            "rfm-digits": "quick", "rfm-digits-paper": "paper", "mlp-digits": "quick",
            "rfm-mnist-exact": "paper", "rfm-custom": "custom"}, told
        assert "solver Nyström, M = 1,500 centers" in marks["rfm-digits-paper"][1]
        assert "not the paper's sizes" in marks["rfm-digits"][1]
        assert "not the paper's sizes" not in marks["rfm-digits-paper"][1]
        numbers = json.loads(out.with_suffix(".json").read_text())
        got = {r["path"]: (r["scale"], r.get("solver"), r.get("centers")) for r in numbers["runs"]}
        assert got == {str(quick): ("quick", "exact", None),
                       str(paper): ("paper", "nystrom", 1500),
                       str(mlp): ("quick", None, None),
                       str(check.path): ("paper", "exact", None),
                       str(other.path): ("custom", "nystrom", 300)}, told


# ----------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.mark.browser
def test_report_in_headless_chromium(tiny, tmp_path):
    """The page opens from disk: every image decodes, nothing is fetched, no console error."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright not installed (pip install -e '.[test]')")
    url = (tiny / "report.html").resolve().as_uri()
    requests, errors = [], []
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=args,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="load")
            widths = page.evaluate(
                "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    print(f"screenshot: {shot}")
    assert len(widths) >= 8 and all(w > 0 for w in widths), widths
    assert [u for u in requests if u != url and not u.startswith("data:")] == []
    assert errors == []
    assert shot.stat().st_size > 10_000


# ----------------------------------------------------------------------------- issue 13
def _copy_run(tiny, tmp_path, name="rfm-digits"):
    run = tmp_path / name
    shutil.copytree(tiny / "runs" / name, run)
    return run


def test_a_damaged_table_is_named_and_never_shown_as_the_result(tiny, tmp_path):
    """metrics.csv cut to 3,000 bytes, cut at a line end, header only, changed, missing: a
    warning on stderr, a notice on the page, and none of the run's numbers, verdicts or figures
    (issue 13, item 4). The intact run beside it is reported as before."""
    good = _copy_run(tiny, tmp_path, "mlp-digits")
    run = _copy_run(tiny, tmp_path)
    data = (run / "metrics.csv").read_bytes()
    assert len(data) > 3000
    header = data.split(b"\n", 1)[0] + b"\n"
    damages = {"cut mid-line": (data[:3000], "ends in the middle of a line"),
               "cut at a line end": (data[: data.rindex(b"\n", 0, 3000) + 1],
                                     "but the finished run wrote"),
               "header only": (header, "holds no rows"),
               "changed": (data.replace(b"1.0,", b"0.5,", 1), "SHA-256 differs"),
               "missing": (None, "is missing, but summary.json says the run finished")}
    for what, (content, why) in damages.items():
        if content is None:
            (run / "metrics.csv").unlink()
        else:
            (run / "metrics.csv").write_bytes(content)
        out = tmp_path / what.replace(" ", "-") / "r.html"
        with pytest.warns(UserWarning, match="rfm-digits.*" + why):
            build_report([run, good], out)
        page = out.read_text()
        assert 'id="damaged"' in page and why in page, what
        numbers = json.loads(out.with_suffix(".json").read_text())
        assert numbers["rfm"] == [] and all(c["run"] != "Deep RFM, digits (rfm-digits)"
                                            for c in numbers["claims"]), what
        assert [r["problems"] != [] for r in numbers["runs"]] == [True, False]
        assert list(numbers["damaged"]) == ["rfm-digits"] and numbers["mlp"], what
        assert "Deep RFM, digits (rfm-digits): NC1 of the layer input fell" not in page
    # the command warns (one line on stderr: tests/test_cli.py) and still writes the page
    with pytest.warns(UserWarning, match="is missing.*left out of the report") as seen:
        assert main(["report", str(run), str(good), "--out", str(tmp_path / "c.html")]) == 0
    assert len(seen) == 1 and (tmp_path / "c.html").is_file()


def test_report_refuses_to_write_into_a_run_or_over_files_it_did_not_write(tiny, tmp_path,
                                                                            capsys):
    """--out RUN/summary.json, RUN/metrics.csv or anything in an input run folder, an --out
    ending in .json, and an existing file agop did not write are refused before anything is
    written; a report agop wrote is replaced (issue 13, item 6)."""
    run = _copy_run(tiny, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for target in ("summary.json", "metrics.csv", "report.html", "figures/x.html"):
        assert main(["report", str(run), "--out", str(run / target)]) == 2, target
        err = capsys.readouterr().err
        assert "would be written into the run folder" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["report", str(run), "--out", str(tmp_path / "numbers.json")]) == 2
    assert "same file" in capsys.readouterr().err
    assert not (tmp_path / "numbers.json").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.html").write_text("my notes")
    (mine / "notes.json").write_text('{"mine": true}')
    assert main(["report", str(run), "--out", str(mine / "notes.html")]) == 2
    assert "notes.html exists and is not a report agop wrote" in capsys.readouterr().err
    (mine / "other.json").write_text('{"mine": true}')
    assert main(["report", str(run), "--out", str(mine / "other.html")]) == 2
    assert "other.json exists and is not the numbers file" in capsys.readouterr().err
    assert not (mine / "other.html").exists()
    (mine / "third_figures").mkdir()
    (mine / "third_figures" / "rfm_nc1_all.png").write_bytes(b"my figure")
    assert main(["report", str(run), "--out", str(mine / "third.html")]) == 2
    assert "rfm_nc1_all.png exists" in capsys.readouterr().err
    assert (mine / "notes.html").read_text() == "my notes"
    assert (mine / "third_figures" / "rfm_nc1_all.png").read_bytes() == b"my figure"
    # agop's own report, page, numbers and figures, is replaced by the next one
    out = tmp_path / "report" / "r.html"
    for _ in range(2):
        assert main(["report", str(run), "--out", str(out)]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["generator"] == "agop report"
    assert numbers["figures"] == [str(out.with_name("r_figures") / "rfm_nc1_all.png")]
    assert '<meta name="generator" content="agop report' in out.read_text()
