"""Tests of agop.experiments.theory: the checks of ``agop theory``, its records and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from agop.experiments.records import read_csv
from agop.experiments.theory import run_theory, summary_text

SQRT_HALF = 1 / math.sqrt(2)


def _check_run(path, dataset):
    rows = read_csv(path / "theory.csv")
    assert len(rows) >= 20
    failed = [r["check"] for r in rows if r["passed"] != "True"]
    assert not failed, failed
    for name in ("figure4_relu_distance", "theorem54_contraction", "theorem55_bound"):
        assert (path / "figures" / f"{name}.png").stat().st_size > 10_000
    summary = json.loads((path / "summary.json").read_text())
    assert summary["complete"] and summary["failed"] == [] and summary["krr_dataset"] == dataset
    assert summary["relu_ratio_at_2"] == pytest.approx(SQRT_HALF)
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == "theory" and config["settings"]["seed"] == 0
    for ratio_rfm, ratio_plain in zip(summary["krr_ratio_rfm"].values(),
                                      summary["krr_ratio_laplace"].values()):
        assert ratio_plain < ratio_rfm <= 1
    return rows


def test_run_theory_on_mnist(tmp_path, data_root):
    run = run_theory(tmp_path / "run", progress=False, data_dir=data_root)
    rows = _check_run(run.path, "mnist")
    assert any("mnist" in str(r["note"]) for r in rows)
    krr = read_csv(run.path / "krr.csv")
    assert {r["N"] for r in krr if "data" in r["kernel"]} == {400}


def test_cli_theory_falls_back_to_digits(tmp_path, capsys):
    from agop.cli import main

    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main(["theory", "--out", str(tmp_path / "run"), "--data-dir", str(empty),
                 "--pdf"]) == 0
    rows = _check_run(tmp_path / "run", "digits")
    assert any("fell back to digits" in str(r["note"]) for r in rows)
    assert (tmp_path / "run" / "figures" / "theorem55_bound.pdf").exists()
    assert "checks passed" in capsys.readouterr().out
    # an existing run folder is refused, with exit status 2
    assert main(["theory", "--out", str(tmp_path / "run")]) == 2


def test_run_theory_prints_nothing(tmp_path, capsys):
    """The experiment returns its run; the CLI prints (summary_text)."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    run = run_theory(tmp_path / "run", progress=False, data_dir=empty, seed=0)
    assert capsys.readouterr().out == ""
    summary = run.read_summary()
    rows = read_csv(run.path / "theory.csv")
    assert summary["checks"] == len(rows) and summary["passed"] == len(rows)
    assert summary_text(summary, run.path).splitlines() == [
        "theory: MNIST not found; Theorem 5.5 used scikit-learn's digits instead",
        f"theory: {len(rows)}/{len(rows)} checks passed -> {run.path}"]
    assert run.config["settings"] == {"seed": 0, "data_dir": str(empty), "pdf": False}


def test_summary_text_names_failed_checks():
    text = summary_text({"checks": 3, "passed": 1, "failed": ["a", "b"], "krr_dataset": "mnist"})
    assert text.splitlines() == ["theory: 1/3 checks passed", "  FAILED: a", "  FAILED: b"]
