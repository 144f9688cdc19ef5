"""Tests of agop.report.numbers: run folders read, headline numbers, claims."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from agop.cli import main
from agop.experiments.records import RunDir
from agop.report import numbers
from agop.report.numbers import num


# ----------------------------------------------------------------------------- Deep RFM
def test_rfm_numbers_shares_hand_computed(rfm_rows):
    x = numbers.rfm_headline(rfm_rows)
    assert x["layers"] == 2 and x["last_layer"] == 3
    assert x["nc1_first"] == 8 and x["nc1_last"] == 1 and x["nc1_reduction"] == 8
    assert x["share_agop"] == pytest.approx(4 / 3, rel=1e-12)
    assert x["share_features"] == pytest.approx(-2 / 3, rel=1e-12)
    assert x["share_normalize"] == pytest.approx(1 / 3, rel=1e-12)
    assert x["share_agop"] + x["share_features"] + x["share_normalize"] == pytest.approx(1)
    assert x["agop_below_input"] == 2 and x["features_not_below_agop"] == 2
    assert (x["nc2_first"], x["nc2_last"]) == (0.3, 0.05)


def test_rfm_numbers_counts_and_partial_run(rfm_rows):
    rows = [dict(r) for r in rfm_rows]
    rows[4]["nc1"] = 3.0  # layer 2: agop above its input (2) and above the features (1)
    x = numbers.rfm_headline(rows)
    assert x["agop_below_input"] == 1 and x["features_not_below_agop"] == 1
    # an interrupted run: layer 2 finished, no final solve; shares over layer 1 only
    x = numbers.rfm_headline(rfm_rows[:6])
    assert x["last_layer"] == 2 and x["nc1_reduction"] == 4
    assert x["share_agop"] == pytest.approx(math.log(4) / math.log(4))
    assert x["share_features"] == pytest.approx(math.log(1 / 2) / math.log(4))


def test_rfm_numbers_no_reduction_has_no_share(rfm_rows):
    rfm_rows[-1]["nc1"] = 16.0  # the last input is above the first: a share would read backwards
    assert math.isnan(numbers.rfm_headline(rfm_rows)["share_agop"])


# ----------------------------------------------------------------------------- MLP
def test_mlp_numbers_hand_computed(mlp_rows):
    x = numbers.mlp_headline(mlp_rows)
    assert x["last_epoch"] == 10 and x["first_epoch"] == 0 and x["num_layers"] == 2
    l1, l2 = x["per_layer"]
    assert (l1["drop_right"], l1["drop_output"]) == (pytest.approx(1), pytest.approx(0))
    assert (l2["drop_right"], l2["drop_output"]) == (pytest.approx(1), pytest.approx(1))
    assert x["drop_right_total"] == pytest.approx(2) and x["drop_output_total"] == pytest.approx(1)
    assert x["share_right"] == pytest.approx(2 / 3)
    assert x["layers_right_dominates"] == 1  # layer 2: 1 decade each, a tie does not dominate
    assert x["nfa_sqrt_mean_last_epoch"] == pytest.approx(0.85)
    assert x["nfa_sqrt_min_last_epoch"] == 0.8
    assert x["nfa_sqrt_min_all_epochs"] == 0.2  # epoch 0 counts
    assert (x["within_total_first_epoch"], x["within_total_last_epoch"]) == (0.9, 0.1)
    assert x["train_acc"] == 1.0 and math.isnan(x["test_acc"]) and x["loss"] == 1 / 11


def test_mlp_claims_read_the_headline(tmp_path, mlp_rows):
    """Each MLP claim states the headline's numbers and judges them by its criterion."""
    run = RunDir.create(tmp_path / "mlp-cifar10", "mlp", {"dataset": "cifar10"})
    run.write_metrics(mlp_rows)
    r = numbers.load_run(run.path)
    svd, nfa, collapse = numbers.mlp_claims(r, numbers.mlp_headline(r.rows))
    assert svd.figure == "Fig. 1"  # CIFAR-10 is the paper's Figure 1
    assert "S Vᵀ removed 2 decades of NC1, U + ReLU 1 (S Vᵀ share 67%)" in svd.measured
    assert "dominated in 1 of 2 layers" in svd.measured and svd.consistent is False
    assert "mean 0.85 over layers (range 0.8–0.9), lowest during training 0.2" in nfa.measured
    assert nfa.consistent is True
    assert "0.9 (epoch 0) → 0.1 (epoch 10)" in collapse.measured and collapse.consistent


# ----------------------------------------------------------------------------- theory
def test_theory_numbers_groups_checks():
    rows = [{"check": "prop5.1 inner at r=1", "passed": "True"},
            {"check": "fig4 ratio at dist=2", "passed": True},
            {"check": "thm5.4 rate", "passed": "False"},
            {"check": "lemmaA.2 max |closed form - inv|", "passed": "True"},
            {"check": "thm5.5 bound", "passed": "True"}]
    x = numbers.theory_numbers(rows, {"relu_ratio_at_2": 0.7071, "other": 1})
    assert (x["checks"], x["passed"], x["failed"]) == (5, 4, ["thm5.4 rate"])
    assert x["fig4"] == {"checks": 2, "passed": 2}
    assert x["thm5.4"] == {"checks": 2, "passed": 1}
    assert x["thm5.5"] == {"checks": 1, "passed": 1}
    assert x["relu_ratio_at_2"] == 0.7071 and "other" not in x


def test_number_format():
    assert num(4.3) == "4.3" and num(2.1e-4) == "2.1e-4"
    assert num(4240.86) == "4,241" and num(float("nan")) == "n/a"
    assert num(None) == "n/a" and num(0) == "0"


# ----------------------------------------------------------------------------- run folders
def test_load_run_reads_a_run_folder(tmp_path, rfm_rows):
    run = RunDir.create(tmp_path / "rfm-mnist", "rfm", {"dataset": "mnist", "n": 10})
    run.write_metrics(rfm_rows)
    (run.figures_dir / "collapse.png").write_bytes(b"\x89PNG")
    r = numbers.load_run(run.path)
    assert (r.kind, r.name, r.dataset, r.complete) == ("rfm", "rfm-mnist", "mnist", False)
    assert r.label == "Deep RFM, MNIST (rfm-mnist)"
    assert r.rows == RunDir.resume(run.path).read_metrics() and r.summary is None
    assert [p.name for p in r.figures] == ["collapse.png"]
    run.write_summary({})
    assert numbers.load_run(run.path).complete


def test_report_rejects_folders_that_are_not_runs(tmp_path, capsys):
    from agop.report import build_report

    with pytest.raises(ValueError, match="is not a run folder"):
        build_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(ValueError, match="no run folders"):
        build_report([], tmp_path / "r.html")
    (tmp_path / "config.json").write_text(json.dumps({"kind": "bogus"}))
    with pytest.raises(ValueError, match="kind 'bogus' is not one of"):
        build_report([tmp_path], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_data_info_reads_old_and_new_mlp_configs():
    new = {"data": {"name": "mnist", "train": 100, "test": 50, "dim": 784, "classes": 10}}
    old = {"data": {"n_train": 100, "n_test": 50, "in_dim": 784, "num_classes": 10,
                    "preprocessing": "flattened pixels"}}
    want = {"train": 100, "test": 50, "dim": 784, "classes": 10}
    assert want.items() <= numbers.data_info(new).items()
    assert want.items() <= numbers.data_info(old).items()
    assert not {"n_train", "n_test", "in_dim", "num_classes"} & set(numbers.data_info(old))
    assert numbers.data_info({}) == {}


# ----------------------------------------------------------------------------- layout
def _report_imports(module: str) -> set[str]:
    """The agop.report modules that ``module`` (a file of the report package) imports."""
    src = Path(numbers.__file__).with_name(f"{module}.py").read_text(encoding="utf-8")
    found = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agop.report"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("agop.report"))
    return found


def test_report_modules_import_one_way():
    """plan → page → numbers → scales: nothing imports a module above it (lazy imports
    included)."""
    assert _report_imports("scales") == set()
    assert _report_imports("numbers") <= {"agop.report.scales"}
    assert _report_imports("page") <= {"agop.report.numbers", "agop.report.scales"}
    assert _report_imports("plan") <= {"agop.report.page", "agop.report.numbers",
                                       "agop.report.scales"}
