"""Tests of agop.experiments.rfm and the run skeleton agop.experiments.common: the measurement
of each layer, run_rfm's records and exact resume, the resume rules, and `agop rfm`."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch

from agop import collapse, datasets
from agop.cli import main
from agop.experiments.common import (data_config, load_data, merge_settings, record_device,
                                     start_run)
from agop.experiments.records import RunDir, read_csv, read_json
from agop.experiments.rfm import (RFM_DEFAULTS, LayerMeter, class_indices, measure_fit,
                                  run_rfm)
from agop.models.deep_rfm import DeepRFM, normalize_rows

METRICS = ("nc1", "nc2", "nc1_authors", "nc1_pinv", "cdnv", "nc2_squared", "nc2_orthogonal",
           "within_total", "between_total", "equinorm", "equiangular")
SMALL = dict(n=200, test_n=60, depth=3, width=128, device="cpu")


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


# ----------------------------------------------------------------------------- measurement
def test_meter_measures_the_yielded_stages_and_carries_test_points():
    """Each row holds collapse.measure of its stage, and f_l's test accuracy on test points
    carried through the layers beside the fit equals f_l on transform(X_test, l) afterwards."""
    train = datasets.load("digits", n=150)
    test = datasets.load("digits", split="test", n=40)
    model = DeepRFM(depth=2, width=32, device="cpu")
    steps = model.fit_iter(train.X, train.y)
    meter = LayerMeter.for_model(model, test.X, test.y)
    stages, rows, kept = {}, [], []
    for step in steps:
        stages.update({(step.layer, s): H.clone() for s, H in step.stages.items()})
        rows += meter(step)
        kept.append(step)
    assert [(r["layer"], r["stage"]) for r in rows] == list(stages)
    for r in rows:
        want = collapse.measure(stages[r["layer"], r["stage"]], train.y)
        assert all(r[k] == want[k] for k in METRICS)
        assert r["n"] == 150 and r["train_acc"] == 1.0
    y_test = torch.as_tensor(test.y)
    for step in kept:
        H = torch.as_tensor(model.transform(test.X, layer=step.layer))
        acc = float((step.predict(H).argmax(1) == y_test).double().mean())
        row = next(r for r in rows if r["layer"] == step.layer and r["stage"] == "input")
        assert row["test_acc"] == acc
    assert rows[-1]["test_acc"] == model.score(test.X, test.y)
    assert meter.test is None  # nothing left to carry after the final solve


def test_undefined_metrics_are_nan_with_a_warning_as_on_the_mlp_path():
    """A stage whose class means coincide has undefined metrics: NaN and a warning, not an error
    (collapse.measure(strict=False), as agop.models.mlp.probe records a dead layer)."""
    train = datasets.load("digits", n=100)
    model = DeepRFM(depth=1, width=16, device="cpu")
    step = next(model.fit_iter(train.X, train.y))
    same = torch.ones_like(step.stages["features"])  # every class mean equal
    step.stages["features"] = same
    with pytest.warns(UserWarning, match="undefined at layer 1 features; recorded as NaN"):
        rows = LayerMeter(len(model.classes_))(step)
    by = {r["stage"]: r for r in rows}
    with pytest.raises(ValueError):
        collapse.measure(same, train.y)
    assert np.isnan(by["features"]["nc1"])
    assert by["input"]["nc1"] == collapse.measure(step.inputs, train.y)["nc1"]


def test_class_indices_mark_unseen_labels():
    classes = np.array(["a", "c", "d"])
    assert class_indices(classes, ["d", "b", "a", "z"]).tolist() == [2, -1, 0, -1]
    assert class_indices(np.arange(3, 13), np.array([3, 12, 2, 99])).tolist() == [0, 9, -1, -1]


# ----------------------------------------------------------------------------- the skeleton
def test_common_settings_and_resume_rules(tmp_path):
    defaults = {"a": 1, "b": None, "device": "auto"}
    assert merge_settings(defaults, {"a": None, "b": 2, "c": 3}) == {"a": 1, "b": 2,
                                                                     "device": "auto", "c": 3}
    start = start_run("demo", defaults, {"b": 5}, out=tmp_path / "r",
                      complete=lambda s: {**s, "done": True})
    assert start.settings == {"a": 1, "b": 5, "device": "auto", "done": True}
    assert not start.resumed and start.run is None and start.checkpoint is None
    run = start.create()
    assert run.settings == start.settings and run.kind == "demo"
    run.update_config(device="cuda:0")

    with pytest.raises(ValueError, match="either out or resume"):
        start_run("demo", defaults, {}, out=tmp_path / "other", resume=tmp_path / "r")
    with pytest.raises(ValueError, match="'demo' run"):
        start_run("rfm", defaults, {}, resume=tmp_path / "r")
    with pytest.raises(ValueError, match="b: run has 5, given 6"):
        start_run("demo", defaults, {"b": 6}, resume=tmp_path / "r")
    # a setting the run's config lacks counts as its default
    with pytest.raises(ValueError, match="e: run has 0, given 1"):
        start_run("demo", {**defaults, "e": 0}, {"e": 1}, resume=tmp_path / "r")
    again = start_run("demo", defaults, {"b": 5, "device": "cpu"}, resume=tmp_path / "r",
                      free=("device",))
    assert again.resumed and again.settings["device"] == "cpu" and again.create() is again.run
    with pytest.warns(UserWarning, match="started on cuda:0 and continues on cpu"):
        record_device(again, torch.device("cpu"))
    assert read_json(tmp_path / "r" / "config.json")["device"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record_device(again, "cpu")  # the same device: nothing to say


def test_common_data_loading_and_schema():
    train, test = load_data("digits", 100, None, test_cap=50)
    assert len(train) == 100 and len(test) == 50
    assert load_data("digits", 100, 0)[1] is None
    assert len(load_data("digits", 100, None)[1]) == 297  # no cap: the whole test split
    data = data_config(train, test)
    assert data == {"name": "digits", "train": 100, "test": 50, "dim": 64, "classes": 10,
                    "class_names": [str(c) for c in range(10)], "image_shape": [1, 8, 8]}
    assert data_config(train, None, [2, 5])["class_names"] == ["2", "5"]


# ----------------------------------------------------------------------------- the experiment
def test_run_rfm_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    full = run_rfm(tmp_path / "full", progress=False, **SMALL)

    calls = {"n": 0}
    original = DeepRFM._step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 3:  # the process dies inside layer 3
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(DeepRFM, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_rfm(tmp_path / "cut", progress=False, **SMALL)
    monkeypatch.setattr(DeepRFM, "_step", original)
    cut = tmp_path / "cut"
    assert {r["layer"] for r in read_csv(cut / "metrics.csv")} == {1, 2}
    assert not (cut / "summary.json").exists()

    resumed = run_rfm(resume=cut, progress=False)
    assert _strip(read_csv(resumed.path / "metrics.csv")) == _strip(read_csv(full.path / "metrics.csv"))
    a, b = full.read_summary(), resumed.read_summary()
    for key in ("nc1_first_input", "nc1_last_input", "share_agop", "final_test_acc", "gram_last"):
        assert a[key] == b[key]
    for name in ("layer_001.npz", "layer_004.npz"):
        assert np.array_equal(np.load(full.path / "gram" / name)["gram"],
                              np.load(cut / "gram" / name)["gram"])
    models = [DeepRFM.from_state_dict(r.load_checkpoint()["model"]) for r in (full, resumed)]
    Xt = datasets.load("digits", split="test", n=60).X
    assert np.array_equal(models[0].predict(Xt), models[1].predict(Xt))


def test_run_records_the_rows_of_measure_fit(tmp_path):
    """run_rfm's metrics.csv holds measure_fit's rows: one measurement, two callers."""
    run = run_rfm(tmp_path / "r", progress=False, **{**SMALL, "depth": 1})
    train = datasets.load("digits", n=200)
    test = datasets.load("digits", split="test", n=60)
    rows = measure_fit(DeepRFM(depth=1, width=128, device="cpu"), train.X, train.y,
                       test.X, test.y)
    recorded = read_csv(run.path / "metrics.csv")
    assert set(recorded[0]) == set(rows[0])
    keys = ("layer", "stage", *METRICS, "train_acc", "test_acc", "jitter", "n", "dim")
    assert [[r[k] for k in keys] for r in recorded] == [[r[k] for k in keys] for r in rows]


def test_resume_rejects_different_settings(tmp_path):
    run_rfm(tmp_path / "r", progress=False, **{**SMALL, "depth": 1})
    with pytest.raises(ValueError, match="depth"):
        run_rfm(resume=tmp_path / "r", progress=False, depth=5)
    # a value that equals the library default is still a value the run does not have
    with pytest.raises(ValueError, match="depth: run has 1, given 10"):
        run_rfm(resume=tmp_path / "r", progress=False, depth=10)
    with pytest.raises(ValueError, match="standardize: run has True, given False"):
        run_rfm(resume=tmp_path / "r", progress=False, standardize=False)


def test_resume_on_another_device_warns_and_records_it(tmp_path):
    run = run_rfm(tmp_path / "r", progress=False, **{**SMALL, "depth": 1})
    run.update_config(device="cuda:0")  # as if it had started on a GPU
    before = read_csv(run.path / "metrics.csv")
    with pytest.warns(UserWarning, match="started on cuda:0 and continues on cpu"):
        again = run_rfm(resume=run.path, progress=False, device="cpu")
    assert read_json(again.path / "config.json")["device"] == "cpu"
    assert read_csv(again.path / "metrics.csv") == before  # finished: nothing recomputed


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["rfm", "--n", "200", "--test-n", "60", "--depth", "2", "--width", "64",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "NC1 of the layer input" in capsys.readouterr().out
    config = read_json(out / "config.json")
    assert config["kind"] == "rfm" and config["device"] == "cpu" and config["dtype"] == "float32"
    assert config["settings"]["depth"] == 2 and config["settings"]["dataset"] == "digits"
    assert config["settings"]["standardize"] is True
    assert config["data"]["train"] == 200 and config["data"]["test"] == 60
    rows = read_csv(out / "metrics.csv")
    required = {"layer", "stage", *METRICS, "train_acc", "test_acc", "seconds", "jitter"}
    assert required <= set(rows[0])
    assert [(r["layer"], r["stage"]) for r in rows] == [
        (1, "input"), (1, "agop"), (1, "features"), (2, "input"), (2, "agop"),
        (2, "features"), (3, "input")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["nc1_first_input"] == rows[0]["nc1"] and summary["nc1_last_input"] == rows[-1]["nc1"]
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    shares = summary["share_agop"] + summary["share_features"] + summary["share_normalize"]
    assert shares == pytest.approx(1.0)
    assert (out / "figures" / "collapse.png").stat().st_size > 0
    assert (out / "figures" / "gram.png").stat().st_size > 0
    assert (out / "figures" / "step_seconds.png").stat().st_size > 0
    firsts = [r for r in rows if r["stage"] == "input"]  # one per layer, each with its times
    assert summary["step_seconds"]["solve"] == pytest.approx(
        sum(r["seconds_solve"] for r in firsts))
    assert main(["rfm", "--resume", str(out), "--depth", "4", "--no-progress"]) == 2


def test_cli_no_standardize_is_recorded_and_used(tmp_path):
    out = tmp_path / "plain"
    assert main(["rfm", "--n", "100", "--test-n", "0", "--depth", "1", "--width", "16",
                 "--device", "cpu", "--no-standardize", "--out", str(out), "--no-progress"]) == 0
    assert read_json(out / "config.json")["settings"]["standardize"] is False
    model = DeepRFM.from_state_dict(RunDir.resume(out).load_checkpoint()["model"])
    assert model.standardize is False and model.mean_ is None
    train = datasets.load("digits", n=100)
    X1 = normalize_rows(torch.as_tensor(train.X, dtype=torch.float32))  # no standardization
    first = read_csv(out / "metrics.csv")[0]
    assert first["nc1"] == pytest.approx(collapse.nc1(X1, train.y), rel=1e-12)
    assert first["test_acc"] is None


def test_cli_help_defaults_match_run_rfm():
    import inspect

    from agop.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["rfm"]
    helps = {a.dest: a.help for a in sub._actions}
    for name, param in inspect.signature(run_rfm).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert name in RFM_DEFAULTS or name == "pdf", name
        if name in ("depth", "bandwidth", "width", "seed"):
            assert f"default: {RFM_DEFAULTS[name]}" in helps[name], name


def test_summary_text_prints_undefined_numbers_as_na():
    """A run whose NC1 does not fall has no shares of the reduction (None/NaN in the summary):
    the terminal summary says n/a instead of failing."""
    from agop.experiments.rfm import summary_text

    s = {"depth": 1, "nc1_first_input": 0.5, "nc1_last_input": 0.7, "nc1_reduction": 0.714,
         "share_agop": None, "share_features": float("nan"), "share_normalize": None,
         "layers_agop_below_input": 0, "layers_features_not_below_agop": 1,
         "nc2_first_input": 0.1, "nc2_last_input": None, "final_train_acc": 1.0,
         "final_test_acc": None, "layer_seconds": 0.1, "metric_seconds": 0.0, "fallbacks": []}
    text = summary_text(s)
    assert "agop n/a, features n/a, normalization n/a" in text
    assert "NC2: 0.1 -> n/a" in text and "x0.714 smaller" in text


def test_rfm_that_does_not_collapse_ends_with_a_summary(tmp_path, capsys):
    """Tiny bandwidth: NC1 does not fall; the command still ends with its summary, rc 0."""
    assert main(["rfm", "--bandwidth", "0.05", "--depth", "1", "--n", "300", "--width", "16",
                 "--test-n", "0", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert "n/a" in capsys.readouterr().out


# ----------------------------------------------------------------------------- issue 13
TINY = dict(n=150, test_n=40, depth=2, width=32, device="cpu")


def _cut_after_layer_1(tmp_path, monkeypatch, name="cut"):
    """A run killed inside layer 2: records and checkpoint of layer 1."""
    original, calls = DeepRFM._step, {"n": 0}

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(DeepRFM, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_rfm(tmp_path / name, progress=False, **TINY)
    monkeypatch.setattr(DeepRFM, "_step", original)
    return tmp_path / name


def test_a_damaged_checkpoint_is_one_line_and_deleting_it_starts_over(tmp_path, monkeypatch,
                                                                     capsys):
    """Cut in half, a pickle that asks for os.system, an unknown parameter: --resume says, in
    one line, which file and what to do; doing it (delete, resume) ends with the numbers of an
    uninterrupted run (issue 13, item 5)."""
    import os

    full = run_rfm(tmp_path / "full", progress=False, **TINY)
    cut = _cut_after_layer_1(tmp_path, monkeypatch)
    ckpt = cut / "checkpoint.pt"
    good = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=True)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    unknown = {**state, "model": {**state["model"],
                                  "params": {**state["model"]["params"], "bogus": 1}}}
    damages = {"half": lambda: ckpt.write_bytes(good[: len(good) // 2]),
               "code": lambda: torch.save({"model": Payload()}, ckpt),
               "unknown parameter": lambda: torch.save(unknown, ckpt),
               "no model": lambda: torch.save({"rows": []}, ckpt)}
    for what, damage in damages.items():
        damage()
        assert main(["rfm", "--resume", str(cut), "--no-progress"]) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert f"{ckpt} " in err and "delete it" in err and "weights_only" not in err, what
    assert not (tmp_path / "pwned").exists()
    ckpt.unlink()
    again = run_rfm(resume=cut, progress=False)
    assert (_strip(read_csv(again.path / "metrics.csv"))
            == _strip(read_csv(full.path / "metrics.csv")))
    # a finished run's metrics.csv cut afterwards: --resume rewrites it from the checkpoint
    text = (cut / "metrics.csv").read_text()
    (cut / "metrics.csv").write_text(text[:300])
    assert again.record_problems() != []
    run_rfm(resume=cut, progress=False)
    assert (cut / "metrics.csv").read_text() == text and again.record_problems() == []


def test_resume_removes_temporaries_and_notes_a_thread_change(tmp_path, monkeypatch):
    """A kill inside an atomic write leaves .checkpoint.pt.XXXXXXXX.tmp: the resume removes it
    (item 11). A resume under another thread count warns and records it (item 9)."""
    cut = _cut_after_layer_1(tmp_path, monkeypatch)
    (cut / ".checkpoint.pt.k2j3h4g5.tmp").write_bytes(b"half a checkpoint")
    (cut / "gram" / ".layer_003.npz.abcd1234.tmp").write_bytes(b"")
    threads = read_json(cut / "config.json")["threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=f"ran with {threads} CPU thread"):
            run = run_rfm(resume=cut, progress=False)
    finally:
        torch.set_num_threads(before)
    assert [p.name for p in cut.rglob("*.tmp")] == []
    config = read_json(cut / "config.json")
    assert config["threads"] == threads + 1 and config["threads_changed"] == [threads, threads + 1]
    assert run.is_complete


def test_gram_and_centers_files_that_are_not_agops_are_named(tmp_path):
    """An object-array or damaged .npz in gram/ and a centers.npy of the wrong kind: ValueError
    naming the file, not numpy's bare message (item 11)."""
    from agop.experiments.rfm import load_centers, load_grams

    gram = tmp_path / "gram"
    gram.mkdir()
    np.savez(gram / "layer_001.npz", gram=np.eye(2, dtype=np.float32), labels=np.arange(2))
    assert load_grams(tmp_path)[0][0] == 1
    np.savez(gram / "layer_002.npz", gram=np.array([{"a": 1}], dtype=object), labels=np.arange(1))
    with pytest.raises(ValueError, match="layer_002.npz is not a Gram snapshot"):
        load_grams(tmp_path)
    (gram / "layer_002.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="layer_002.npz is not a Gram snapshot"):
        load_grams(tmp_path)
    np.savez(gram / "layer_002.npz", gram=np.eye(3), labels=np.arange(2))
    with pytest.raises(ValueError, match=r"layer_002.npz .*labels \(2,\)"):
        load_grams(tmp_path)
    np.save(tmp_path / "centers.npy", np.array(["a", "b"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="centers.npy is not the centers file"):
        load_centers(tmp_path)
    np.save(tmp_path / "centers.npy", np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="centers.npy is not the centers file"):
        load_centers(tmp_path)


# ----------------------------------------------------------------------------- where the time goes
def _timed_rows():
    """Three layers and the final solve as a Nyström run might record them: every stage row
    of a layer repeats its times; None where a step did not run (no test points at layer 2's
    predict), a time missing in a row, and a step column the exact solver never writes
    (``seconds_centers``, on layer 1 only)."""
    times = {
        1: {"kernel": 1.0, "solve": 2.0, "agop": 5.0, "sqrt": 0.5, "features": 0.25,
            "predict": 0.125, "metrics": 1.5, "centers": 0.75},
        2: {"kernel": 1.5, "solve": 2.5, "agop": 6.0, "sqrt": None, "features": 0.25,
            "predict": None, "metrics": 1.5},
        3: {"kernel": 2.0, "solve": 3.0, "agop": 7.0, "sqrt": 0.5, "features": 0.5,
            "predict": 0.25, "metrics": 1.0},
        4: {"kernel": 3.0, "solve": 4.0, "predict": 0.25, "metrics": 0.5},  # final solve
    }
    rows = []
    for layer, t in times.items():
        stages = ("input",) if layer == 4 else ("input", "agop", "features")
        for i, stage in enumerate(stages):
            nc1 = 2.0 ** -(3 * layer + i)
            rows.append({"layer": layer, "stage": stage, "nc1": nc1, "nc2": nc1,
                         "train_acc": 1.0, "test_acc": 0.5, "jitter": 0.0,
                         "solve_dtype": "float64", "kernel_dtype": "float32",
                         "dtype": "float32", "solver": "nystrom", "trusted": True,
                         "seconds": 1.0, **{f"seconds_{k}": v for k, v in t.items()}})
    return rows, times


def test_summary_step_seconds_are_the_column_sums_over_layers():
    """summary.json's step_seconds: every step's seconds summed over the layers (each layer
    once, not once per stage row), None and missing counted as 0, extra step columns kept;
    dominant_step is the largest; the terminal summary lists the largest steps."""
    from agop.experiments.rfm import summarize, summary_text

    rows, times = _timed_rows()
    summary = summarize(rows, [], 10)
    want = {}
    for t in times.values():
        for k, v in t.items():
            want[k] = want.get(k, 0.0) + (v or 0.0)
    got = summary["step_seconds"]
    assert set(got) == set(want) and got == pytest.approx(want)
    assert list(got)[:7] == ["kernel", "solve", "agop", "sqrt", "features", "predict",
                             "metrics"]
    assert got["agop"] == 18.0 and got["sqrt"] == 1.0 and got["centers"] == 0.75
    assert summary["dominant_step"] == "agop" == max(want, key=want.get)
    assert summary["metric_seconds"] == 4.5
    total = sum(want.values())
    line = next(l for l in summary_text(summary).splitlines() if l.startswith("time by step"))
    assert line.startswith(f"time by step: agop {100 * 18 / total:.0f}% (18.0 s), solve "
                           f"{100 * 11.5 / total:.0f}% (11.5 s), kernel")
    assert "other" in line

    # nothing timed (rows of an older record, or every time None): no dominant step
    bare = [{k: (None if k.startswith("seconds") else v) for k, v in r.items()} for r in rows]
    s = summarize(bare, [], 10)
    assert s["dominant_step"] is None and set(s["step_seconds"].values()) == {0.0}
    assert "time by step" not in summary_text(s)


def test_step_seconds_figure_stacks_each_layers_seconds(tmp_path, monkeypatch):
    """rfm_step_seconds writes its file; each step is one bar series whose heights are that
    step's seconds per layer, stacked on the steps below it; a step that never took time has
    no bars."""
    from agop.experiments import figures

    rows, times = _timed_rows()
    rows = [{**r, "seconds_unused": None} for r in rows]
    drawn = []
    original = figures.save

    def keep(fig, path, pdf=False):
        drawn.append(fig)
        return original(fig, path, pdf)

    monkeypatch.setattr(figures, "save", keep)
    paths = figures.rfm_step_seconds(rows, tmp_path / "steps", title="test", pdf=True)
    assert [p.name for p in paths] == ["steps.png", "steps.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    (ax,) = drawn[0].axes
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == ["kernel", "solve", "agop", "sqrt", "features", "predict", "metrics",
                          "centers"]  # no "unused": it never took time
    layers = sorted(times)
    below = [0.0] * len(layers)
    for step, container in bars.items():
        want = [times[l].get(step) or 0.0 for l in layers]
        assert [p.get_height() for p in container.patches] == pytest.approx(want), step
        assert [p.get_y() for p in container.patches] == pytest.approx(below), step
        assert [p.get_x() + p.get_width() / 2 for p in container.patches] == pytest.approx(layers)
        below = [b + w for b, w in zip(below, want)]
    assert len(ax.patches) == len(bars) * len(layers)
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "centers"  # top first


@pytest.mark.parametrize("solver, free, kept", [("exact", 1 << 40, True), ("exact", 1 << 20, False),
                                                ("nystrom", 1 << 20, True)])
def test_freed_memory_is_kept_where_the_plan_leaves_room(tmp_path, monkeypatch, solver, free,
                                                         kept):
    # Nyström runs keep freed memory for reuse; exact runs only where twice their planned peak
    # fits in the free memory (agop.allocator: kept holes raise the peak)
    import agop.experiments.rfm as rfm_mod

    used = []

    @contextlib.contextmanager
    def spy():
        used.append(True)
        yield True

    monkeypatch.setattr(rfm_mod, "retained_memory", spy)
    monkeypatch.setattr(rfm_mod, "free_memory", lambda device: free)
    extra = {"centers": 100} if solver == "nystrom" else {}
    run_rfm(tmp_path / "r", progress=False, **{**SMALL, "depth": 1, "solver": solver, **extra})
    assert used == ([True] if kept else [])
