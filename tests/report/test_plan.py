"""Tests of agop.report.plan: the plan of a scale, reproduce end to end, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agop import report
from agop.experiments.records import RunDir


def test_plan_skips_missing_datasets_and_caps_n(tmp_path):
    experiments, skipped = report.plan("quick", data_dir=tmp_path)
    assert [e.name for e in experiments] == ["rfm-digits", "mlp-digits", "theory"]
    assert {s["dataset"] for s in skipped} == set(report.PAPER_DATASETS)
    mnist = next(s for s in skipped if s["dataset"] == "mnist")
    assert str(tmp_path / "mnist") in mnist["reason"]
    rfm = experiments[0]
    assert rfm.settings["n"] == 1500 and "capped" in rfm.note  # digits hold 1,500 points
    assert rfm.settings["depth"] == report.SCALES["quick"]["rfm"]["depth"]


def test_plan_reads_dataset_names_as_the_datasets_module_does(tmp_path):
    experiments, _ = report.plan("tiny", [" Digits ", "DIGITS"], data_dir=tmp_path)
    assert [e.dataset for e in experiments] == ["digits", "digits", None]


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


def test_the_cli_offers_the_scales_of_the_plan():
    from agop.cli import build_parser

    reproduce = build_parser()._subparsers._group_actions[0].choices["reproduce"]
    scale = next(a for a in reproduce._actions if a.dest == "scale")
    assert tuple(scale.choices) == tuple(report.SCALES)


# ----------------------------------------------------------------------------- end to end
def test_reproduce_end_to_end(tiny):
    for name in ("rfm-digits", "mlp-digits", "theory"):
        assert RunDir.resume(tiny / "runs" / name).is_complete
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
    for name in ("rfm_nc1_all.png", "mlp_final_all.png"):
        assert (tiny / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_reproduce_refuses_a_folder_of_another_scale(tiny):
    with pytest.raises(ValueError, match="other settings"):
        report.reproduce(tiny, scale="quick", datasets=["digits"], progress=False)


def test_reproduce_resumes_after_an_interruption(tmp_path, monkeypatch):
    import agop.experiments.mlp
    import agop.experiments.rfm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agop.experiments.mlp, "run_mlp", interrupted)
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
    real = agop.experiments.mlp.run_mlp

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(agop.experiments.mlp, "run_mlp", spy)
    report.reproduce(tmp_path / "out", **kw)
    assert [Path(c["resume"]) for c in calls] == [mlp] and RunDir.resume(mlp).is_complete


def test_reproduce_refuses_an_out_holding_files_it_did_not_write(tiny, tmp_path):
    """An unrelated folder's summary.json / report.html / timings.json / runs/<name>, or a run
    folder as --out: refused before any work, nothing replaced (issue 13, item 6)."""
    kw = dict(scale="tiny", datasets=["digits"], data_dir=tmp_path / "data", progress=False)
    for name, text in (("summary.json", '{"mine": 1}'), ("report.html", "<p>mine</p>"),
                       ("timings.json", '{"lunch": "12:30"}'), ("runs/mlp-digits/a.txt", "x")):
        folder = tmp_path / name.replace("/", "-")
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text(text)
        with pytest.raises(ValueError, match="agop does not replace it|holds files but no run"):
            report.reproduce(folder, **kw)
        assert (folder / name).read_text() == text
        assert not (folder / "runs" / "rfm-digits").exists()  # no work was started
    run = tiny / "runs" / "rfm-digits"
    with pytest.raises(ValueError, match="is a run folder"):
        report.reproduce(run, **kw)
    assert not (run / "report.html").exists() and not (run / "runs").exists()


def test_paper_scale_adds_an_exact_cross_check_where_deep_rfm_is_nystrom(data_root, monkeypatch):
    monkeypatch.setenv("AGOP_MEMORY_GB", "16")  # a laptop: 50,000 points exact do not fit
    exps, _ = report.plan("paper", ["mnist", "cifar10", "digits"], data_root)
    by = {e.name: e for e in exps}
    assert by["rfm-mnist"].settings["n"] == 50000
    assert by["rfm-mnist-exact"].settings == {"dataset": "mnist", "n": 10000, "depth": 20,
                                              "solver": "exact"}
    assert "rfm-cifar10-exact" not in by  # 10,000 points: the exact solver is the run itself
    assert by["rfm-digits"].settings["centers"] == 1500  # never more centers than points
    assert by["mlp-mnist"].settings["preset"] == "paper"


def test_dry_run_prints_each_run_with_its_estimate_and_runs_nothing(data_root, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("AGOP_MEMORY_GB", "16")
    from agop.experiments.estimate import Calibration
    from agop.report.plan import dry_run, format_dry_run

    cal = Calibration("cpu", 2, {"rfm_exact": 2e10, "rfm_nystrom": 2e10, "mlp_epoch": 1e10,
                                 "mlp_measure": 1e10}, 12.0)
    rows, _ = dry_run("paper", ["mnist"], data_root, calibration=cal)
    by = {r["name"]: r for r in rows}
    assert by["rfm-mnist"]["solver"] == "nystrom" and by["rfm-mnist-exact"]["solver"] == "exact"
    assert by["mlp-mnist"]["n"] == 50000 and by["mlp-mnist"]["test_n"] == 10000
    # twice the rate, half the estimate: the seconds come from the calibration, not constants
    fast = Calibration("cpu", 2, {k: 2 * v for k, v in cal.rates.items()}, 12.0)
    rows2, _ = dry_run("paper", ["mnist"], data_root, calibration=fast)
    assert rows2[0]["seconds"] == pytest.approx(rows[0]["seconds"] / 2)
    text = format_dry_run(rows, cal, "paper")
    assert "rfm-mnist-exact" in text and "total" in text.splitlines()[-1]
    assert not any(tmp_path.iterdir())
