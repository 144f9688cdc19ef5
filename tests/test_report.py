"""Tests of agop.report: headline numbers, the plan, resume, the HTML page, and a real browser."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from agop import report
from agop.cli import main
from agop.experiments.records import RunDir


# ----------------------------------------------------------------------------- synthetic runs
def _rfm_rows() -> list[dict]:
    """Two layers and the final solve, NC1 values chosen so every log is a log of 2.

    layer 1: input 8, agop 2, features 4; layer 2: input 2, agop 0.5, features 1; layer 3
    (final solve): input 1. Total ln 8; agop steps ln 4 + ln 4 = ln 16; features ln(1/2) +
    ln(1/2) = ln(1/4); normalization ln(4/2) + ln(1/1) = ln 2. Shares 4/3, −2/3, 1/3.
    """
    values = [(1, "input", 8, 0.3), (1, "agop", 2, 0.2), (1, "features", 4, 0.25),
              (2, "input", 2, 0.2), (2, "agop", 0.5, 0.1), (2, "features", 1, 0.15),
              (3, "input", 1, 0.05)]
    return [{"layer": l, "stage": s, "nc1": v, "nc2": n2, "train_acc": 1.0, "test_acc": 0.5}
            for l, s, v, n2 in values]


def test_rfm_numbers_shares_hand_computed():
    x = report.rfm_numbers(_rfm_rows())
    assert x["layers"] == 2 and x["last_layer"] == 3
    assert x["nc1_first"] == 8 and x["nc1_last"] == 1 and x["nc1_reduction"] == 8
    assert x["share_agop"] == pytest.approx(4 / 3, rel=1e-12)
    assert x["share_features"] == pytest.approx(-2 / 3, rel=1e-12)
    assert x["share_normalize"] == pytest.approx(1 / 3, rel=1e-12)
    assert x["share_agop"] + x["share_features"] + x["share_normalize"] == pytest.approx(1)
    assert x["agop_below_input"] == 2 and x["features_not_below_agop"] == 2
    assert (x["nc2_first"], x["nc2_last"]) == (0.3, 0.05)


def test_rfm_numbers_counts_and_partial_run():
    rows = _rfm_rows()
    rows[4]["nc1"] = 3.0  # layer 2: agop above its input (2) and above the features (1)
    x = report.rfm_numbers(rows)
    assert x["agop_below_input"] == 1 and x["features_not_below_agop"] == 1
    # an interrupted run: layer 2 finished, no final solve; shares over layer 1 only
    x = report.rfm_numbers(_rfm_rows()[:6])
    assert x["last_layer"] == 2 and x["nc1_reduction"] == 4
    assert x["share_agop"] == pytest.approx(math.log(4) / math.log(4))
    assert x["share_features"] == pytest.approx(math.log(1 / 2) / math.log(4))


def test_rfm_numbers_no_reduction_has_no_share():
    rows = _rfm_rows()
    rows[-1]["nc1"] = 16.0  # the last input is above the first: a share would read backwards
    assert math.isnan(report.rfm_numbers(rows)["share_agop"])


def _mlp_rows() -> list[dict]:
    """Two layers, epochs 0 and 10; at epoch 10 the drops are exact decades.

    layer 1: 100 → 10 → 10 (S Vᵀ 1 decade, U + ReLU 0); layer 2: 10 → 1 → 0.1 (1 and 1).
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


def test_mlp_numbers_hand_computed():
    x = report.mlp_numbers(_mlp_rows())
    assert x["epoch"] == 10 and x["first_epoch"] == 0 and x["num_layers"] == 2
    l1, l2 = x["layers"]
    assert (l1["drop_right"], l1["drop_output"]) == (pytest.approx(1), pytest.approx(0))
    assert (l2["drop_right"], l2["drop_output"]) == (pytest.approx(1), pytest.approx(1))
    assert x["drop_right_total"] == pytest.approx(2) and x["drop_output_total"] == pytest.approx(1)
    assert x["share_right"] == pytest.approx(2 / 3)
    assert x["right_dominates"] == 1  # layer 2: 1 decade each, a tie does not dominate
    assert x["nfa_sqrt_mean"] == pytest.approx(0.85) and x["nfa_sqrt_min"] == 0.8
    assert x["nfa_sqrt_lowest"] == 0.2  # epoch 0 counts
    assert (x["within_total_first"], x["within_total_last"]) == (0.9, 0.1)
    assert x["train_acc"] == 1.0 and math.isnan(x["test_acc"]) and x["loss"] == 1 / 11


def test_theory_numbers_groups_checks():
    rows = [{"check": "prop5.1 inner at r=1", "passed": "True"},
            {"check": "fig4 ratio at dist=2", "passed": True},
            {"check": "thm5.4 rate", "passed": "False"},
            {"check": "lemmaA.2 max |closed form - inv|", "passed": "True"},
            {"check": "thm5.5 bound", "passed": "True"}]
    x = report.theory_numbers(rows, {"relu_ratio_at_2": 0.7071, "other": 1})
    assert (x["checks"], x["passed"], x["failed"]) == (5, 4, ["thm5.4 rate"])
    assert x["fig4"] == {"checks": 2, "passed": 2}
    assert x["thm5.4"] == {"checks": 2, "passed": 1}
    assert x["thm5.5"] == {"checks": 1, "passed": 1}
    assert x["relu_ratio_at_2"] == 0.7071 and "other" not in x


def test_number_format():
    assert report._num(4.3) == "4.3" and report._num(2.1e-4) == "2.1e-4"
    assert report._num(4240.86) == "4,241" and report._num(float("nan")) == "n/a"
    assert report._num(None) == "n/a" and report._num(0) == "0"


# ----------------------------------------------------------------------------- the plan
def test_plan_skips_missing_datasets_and_caps_n(tmp_path):
    experiments, skipped = report.plan("quick", data_dir=tmp_path)
    assert [e.name for e in experiments] == ["rfm-digits", "mlp-digits", "theory"]
    assert {s["dataset"] for s in skipped} == set(report.PAPER_DATASETS)
    mnist = next(s for s in skipped if s["dataset"] == "mnist")
    assert str(tmp_path / "mnist") in mnist["reason"]
    rfm = experiments[0]
    assert rfm.settings["n"] == 1500 and "capped" in rfm.note  # digits hold 1,500 points
    assert rfm.settings["depth"] == report.SCALES["quick"]["rfm"]["depth"]


def test_plan_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="'svhn' was asked for but is not found"):
        report.plan("quick", ["digits", "svhn"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        report.plan("quick", ["imagenet"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="scale must be one of"):
        report.plan("huge", data_dir=tmp_path)


def test_plan_finds_real_datasets(data_root):
    experiments, skipped = report.plan("paper", data_dir=data_root)
    names = [e.name for e in experiments]
    assert "rfm-mnist" in names and "mlp-mnist" in names
    mnist = next(e for e in experiments if e.name == "rfm-mnist")
    assert mnist.settings["n"] == 50000 and mnist.settings["depth"] == 20


# ----------------------------------------------------------------------------- errors
def test_report_rejects_folders_that_are_not_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="is not a run folder"):
        report.build_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(ValueError, match="no run folders"):
        report.build_report([], tmp_path / "r.html")
    (tmp_path / "config.json").write_text(json.dumps({"kind": "bogus"}))
    with pytest.raises(ValueError, match="kind 'bogus' is not one of"):
        report.build_report([tmp_path], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_report_of_synthetic_runs_escapes_text(tmp_path):
    """A run folder named with HTML syntax shows as text, and the numbers reach the page."""
    run = RunDir.create(tmp_path / 'rfm<b>&"x', "rfm", {"dataset": "mnist", "n": 10})
    run.write_metrics(_rfm_rows())
    run.write_summary({})
    mlp = RunDir.create(tmp_path / "m", "mlp", {"dataset": "cifar10"})
    mlp.write_metrics(_mlp_rows())
    out = report.build_report([run.path, mlp.path], tmp_path / "out" / "r.html")
    page = out.read_text()
    assert "rfm<b>" not in page and "rfm&lt;b&gt;&amp;&quot;x" in page
    assert "NC1 8 (layer 1) → 1 (layer 3): 8× smaller" in page
    assert "agop step 133%" in page  # share 4/3
    assert "has not finished" in page  # the MLP run has no summary.json
    numbers = json.loads((tmp_path / "out" / "r.json").read_text())
    assert numbers["rfm"][0]["share_agop"] == pytest.approx(4 / 3)
    assert numbers["mlp"][0]["share_right"] == pytest.approx(2 / 3)
    figs = {c["figure"] for c in numbers["claims"]}
    assert {"Fig. 6", "Fig. 1", "Fig. 8"} <= figs  # MNIST Deep RFM is Figure 6, CIFAR MLP Fig. 1


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``agop reproduce --scale tiny --datasets digits`` through the CLI (a few seconds)."""
    out = tmp_path_factory.mktemp("reproduce")
    empty = tmp_path_factory.mktemp("data")  # hermetic: theory falls back to digits
    assert main(["reproduce", "--scale", "tiny", "--datasets", "digits", "--out", str(out),
                 "--data-dir", str(empty), "--no-progress"]) == 0
    return out


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_reproduce_end_to_end(tiny):
    for name in ("rfm-digits", "mlp-digits", "theory"):
        assert RunDir.resume(tiny / "runs" / name).is_complete
    page = (tiny / "report.html").read_text()
    numbers = json.loads((tiny / "summary.json").read_text())
    assert numbers["scale"] == "tiny" and numbers["agop_version"]
    assert [r["name"] for r in numbers["runs"]] == ["rfm-digits", "mlp-digits", "theory"]
    assert all(r["seconds"] > 0 for r in numbers["runs"])
    # the numbers agree with the Deep RFM run's own summary (an independent implementation)
    own = RunDir.resume(tiny / "runs" / "rfm-digits").read_summary()
    ours = numbers["rfm"][0]
    for key, theirs in (("share_agop", "share_agop"), ("nc1_last", "nc1_last_input"),
                        ("agop_below_input", "layers_agop_below_input")):
        assert ours[key] == pytest.approx(own[theirs], rel=1e-12)
    theory = numbers["theory"][0]
    assert theory["checks"] > 0 and theory["passed"] + len(theory["failed"]) == theory["checks"]
    # every figure section of the paper is there, and every image is an embedded PNG
    for anchor in ("fig1", "fig2", "fig3", "fig4", "fig6", "fig7", "fig8", "headline", "runs"):
        assert f'id="{anchor}"' in page
    images = _images(page)
    assert len(images) >= 8  # 2 rfm + 2 mlp + 3 theory figures + 2 cross-dataset figures
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    for name in ("rfm_nc1_all.png", "mlp_final_all.png"):
        assert (tiny / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_reproduce_refuses_a_folder_of_another_scale(tiny):
    with pytest.raises(ValueError, match="other settings"):
        report.reproduce(tiny, scale="quick", datasets=["digits"], progress=False)


def test_report_command_on_existing_runs(tiny, tmp_path):
    runs = [str(tiny / "runs" / n) for n in ("theory", "mlp-digits")]
    assert main(["report", *runs, "--out", str(tmp_path / "r.html"), "--pdf"]) == 0
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert [r["kind"] for r in numbers["runs"]] == ["theory", "mlp"]
    assert numbers["runs"][1]["seconds"] > 0  # found in the reproduce folder's timings.json
    assert (tmp_path / "r_figures" / "mlp_final_all.pdf").is_file()


def test_reproduce_resumes_after_an_interruption(tmp_path, monkeypatch):
    import agop.models.mlp
    import agop.experiments.rfm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agop.models.mlp, "run_mlp", interrupted)
    kw = dict(scale="tiny", datasets=["digits"], data_dir=tmp_path / "data", progress=False)
    with pytest.raises(KeyboardInterrupt):
        report.reproduce(tmp_path / "out", **kw)
    done = tmp_path / "out" / "runs" / "rfm-digits"
    assert RunDir.resume(done).is_complete and not (tmp_path / "out" / "report.html").exists()
    stamp = (done / "summary.json").stat().st_mtime_ns
    first_seconds = json.loads((tmp_path / "out" / "timings.json").read_text())["rfm-digits"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.undo()  # run_mlp works again
    monkeypatch.setattr(agop.experiments.rfm, "run_rfm", must_not_run)
    report.reproduce(tmp_path / "out", **kw)
    assert (done / "summary.json").stat().st_mtime_ns == stamp
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["rfm-digits"] == first_seconds
    assert (tmp_path / "out" / "report.html").is_file()

    # a run that stopped before its summary is continued with resume=, not started anew
    mlp = tmp_path / "out" / "runs" / "mlp-digits"
    (mlp / "summary.json").unlink()
    calls = []
    real = agop.models.mlp.run_mlp

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(agop.models.mlp, "run_mlp", spy)
    report.reproduce(tmp_path / "out", **kw)
    assert [Path(c["resume"]) for c in calls] == [mlp] and RunDir.resume(mlp).is_complete


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
