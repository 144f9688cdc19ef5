"""Deep RFM measured data-parallel: agop.experiments.rfm over 2 and 3 gloo processes on
127.0.0.1 (tests/_multiproc.py) and under torchrun, against the same run in one process."""

from __future__ import annotations

import numpy as np
import pytest
import _multiproc
from agop import collapse, datasets, distributed
from agop.cli import main
from agop.experiments.common import load_shard
from agop.experiments.records import RunDir, read_csv, read_json
from agop.experiments.rfm import LayerMeter, load_centers, measure_fit, run_rfm
from agop.models.deep_rfm import NYSTROM_INFO, DeepRFM

METRICS = ("nc1", "nc2", "nc1_authors", "nc1_pinv", "cdnv", "nc2_squared", "nc2_orthogonal",
           "within_total", "between_total", "equinorm", "equiangular")
MODEL = dict(depth=2, width=128, solver="nystrom", centers=120, dtype="float64", device="cpu")
RUN = dict(n=300, test_n=100, depth=2, width=64, solver="nystrom", centers=120,
           dtype="float64", device="cpu")


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def _close(a, b, rel):
    """Every number of rows ``b`` within ``rel`` of rows ``a`` (other fields equal)."""
    assert [(r["layer"], r["stage"]) for r in a] == [(r["layer"], r["stage"]) for r in b]
    for ra, rb in zip(_strip(a), _strip(b)):
        assert ra.keys() == rb.keys()
        for k, x in ra.items():
            y = rb[k]
            if isinstance(x, float) and not isinstance(y, str):
                assert y == pytest.approx(x, rel=rel, abs=0), (ra["layer"], ra["stage"], k)
            else:
                assert x == y, (ra["layer"], ra["stage"], k)


# ----------------------------------------------------------------------------- the meter
def _measure_shard(n, n_test):
    """A Nyström DeepRFM fitted on this rank's rows, measured by LayerMeter; each stage's
    metrics also by collapse.measure on all rows (gathered), for the test to compare."""
    comm = distributed.current()
    shard = load_shard("digits", n, n_test, rank=comm.rank, world=comm.world)
    model = DeepRFM(**MODEL)
    steps = model.fit_iter(shard.train.X, shard.train.y)
    meter = LayerMeter.for_model(model, shard.test.X, shard.test.y)
    rows, direct = [], []
    for step in steps:
        rows += meter(step)
        y = np.concatenate(comm.all_gather_object(step.y.numpy()))
        for H in step.stages.values():
            H_all = np.concatenate(comm.all_gather_object(H.numpy()))
            direct.append(collapse.measure(H_all, y, num_classes=len(model.classes_)))
    return {"rows": _strip(rows), "direct": direct, "world": comm.world,
            "centers": model.centers_, "state": meter.state_dict()}


@pytest.fixture(scope="module")
def one_process_rows():
    train = datasets.load("digits", n=300)
    test = datasets.load("digits", split="test", n=100)
    return measure_fit(DeepRFM(**MODEL), train.X, train.y, test.X, test.y)


@pytest.mark.parametrize("P", [2, 3])
def test_processes_measure_what_one_process_measures(P, one_process_rows):
    """Per layer and stage, every metric of a P-process fit equals the 1-process fit to 1e-6
    (only the order of sums differs); every rank holds the same rows, bit for bit; the
    all-reduced accumulators give collapse.measure of all rows to 1e-10, with the same keys."""
    outs = _multiproc.run(_measure_shard, P, args=(300, 100), timeout=90)
    assert [o["world"] for o in outs] == [P] * P
    for o in outs[1:]:
        assert o["rows"] == outs[0]["rows"]
        assert np.array_equal(o["centers"], outs[0]["centers"])
    rows = outs[0]["rows"]
    assert len(rows) == len(outs[0]["direct"]) == 7
    for row, want in zip(rows, outs[0]["direct"]):
        assert [k for k in row if k in want] == list(want)  # the same metrics, in order
        for k, v in want.items():
            assert row[k] == pytest.approx(v, rel=1e-10, abs=0), (row["layer"], row["stage"], k)
    _close(one_process_rows, rows, 1e-6)
    assert all(set(NYSTROM_INFO) <= set(r) and r["solver"] == "nystrom" for r in rows)
    assert rows[-1]["test_acc"] == one_process_rows[-1]["test_acc"]  # counts, all-reduced
    assert outs[0]["state"]["test"] is None  # per-rank test points stay out of a checkpoint


# ----------------------------------------------------------------------------- run_rfm
def _run(out, settings, resume=None):
    run = run_rfm(out, resume=resume, progress=False, **settings)
    return None if run is None else str(run.path)


def _run_in(folder, settings):
    """run_rfm with no out: the default runs/rfm-<time> under ``folder``, chosen by rank 0."""
    import os

    os.chdir(folder)
    return _run(None, settings)


def _dying_run(out, settings, layer):
    """run_rfm on every rank, interrupted inside ``layer`` (after the checkpoint of the one
    before), as a killed job would be."""
    original = DeepRFM._step

    def step(self):
        if self.layers_done_ + 1 == layer:
            raise KeyboardInterrupt
        return original(self)

    DeepRFM._step = step
    return _run(out, settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process (here) and in two (rank 0 choosing the folder)."""
    base = tmp_path_factory.mktemp("rfm-dist")
    one = run_rfm(base / "one", progress=False, **RUN).path
    paths = _multiproc.run(_run_in, 2, args=(str(base), RUN), init=False, timeout=90)
    return {"one": one, "two": base / paths[0], "others": paths[1:], "base": base}


def test_two_processes_write_one_folder_with_the_numbers_of_one(runs):
    one, two = runs["one"], runs["two"]
    assert runs["others"] == [None]  # only rank 0 has a run folder
    made = list((runs["base"] / "runs").iterdir())
    assert made == [two] and two.name.startswith("rfm-")  # rank 0's timestamp, once
    _close(read_csv(one / "metrics.csv"), read_csv(two / "metrics.csv"), 1e-6)
    config, single = read_json(two / "config.json"), read_json(one / "config.json")
    assert (config["world_size"], config["backend"], config["solver"]) == (2, "gloo", "nystrom")
    assert (single["world_size"], single["backend"], single["solver"]) == (1, None, "nystrom")
    assert config["data"] == single["data"]  # global sizes, not one rank's
    assert config["centers"] == {"count": 120, "file": "centers.npy"}
    centers = load_centers(two)
    assert np.array_equal(centers, load_centers(one)) and len(np.unique(centers)) == 120
    model = DeepRFM.from_state_dict(RunDir.open(two).load_checkpoint()["model"])
    assert np.array_equal(model.centers_, centers)
    for f in sorted((one / "gram").glob("*.npz")):  # the subset gathered to rank 0
        a, b = np.load(f), np.load(two / "gram" / f.name)
        assert np.array_equal(a["labels"], b["labels"])
        assert np.allclose(a["gram"], b["gram"], rtol=0, atol=1e-6)
    s1, s2 = (RunDir.open(p).read_summary() for p in (one, two))
    assert s2["complete"] and s2["nc1_last_input"] == pytest.approx(s1["nc1_last_input"],
                                                                    rel=1e-6)
    assert s2["fallbacks"] == [] and s2["untrusted_layers"] == []


def test_distributed_resume_ends_with_the_uninterrupted_numbers(runs, tmp_path):
    cut = tmp_path / "cut"
    outcomes = _multiproc.run_all(_dying_run, 2, args=(str(cut), RUN, 3), init=False,
                                  timeout=90)
    assert not any(o.ok or o.killed for o in outcomes)
    assert {r["layer"] for r in read_csv(cut / "metrics.csv")} == {1, 2}
    assert RunDir.open(cut).load_checkpoint()["model"]["train"] is None  # features are per rank
    with pytest.raises(ValueError, match="ran on 2 process.*same number of processes"):
        run_rfm(resume=cut, progress=False)  # one process cannot continue a 2-process run
    paths = _multiproc.run(_run, 2, args=(None, {}, str(cut)), init=False, timeout=90)
    assert paths == [str(cut), None]
    assert _strip(read_csv(cut / "metrics.csv")) == _strip(read_csv(runs["two"] / "metrics.csv"))
    for f in sorted((runs["two"] / "gram").glob("*.npz")):
        assert np.array_equal(np.load(f)["gram"], np.load(cut / "gram" / f.name)["gram"])
    assert RunDir.open(cut).read_summary()["complete"]


def _fail_on_rank_1(out, settings):
    if distributed.launched_by_torchrun() and __import__("os").environ["RANK"] == "1":
        original = DeepRFM._step

        def step(self):
            if self.layers_done_ == 1:
                raise RuntimeError("rank 1 broke in layer 2")
            return original(self)

        DeepRFM._step = step
    return _run(out, settings)


def test_a_failing_rank_ends_the_run_with_a_message_not_a_hang(tmp_path):
    outcomes = _multiproc.run_all(_fail_on_rank_1, 2, args=(str(tmp_path / "r"), RUN),
                                  init=False, timeout=90, grace=30)
    assert not any(o.ok or o.killed for o in outcomes)
    assert "rank 1 broke in layer 2" in outcomes[1].traceback
    assert "agop: rank 1 of 2 failed: RuntimeError: rank 1 broke in layer 2" in outcomes[1].log
    assert "agop: rank 0 of 2 failed" in outcomes[0].log  # its next collective saw rank 1 go
    assert {r["layer"] for r in read_csv(tmp_path / "r" / "metrics.csv")} == {1}


# ----------------------------------------------------------------------------- bad input
def _refused(out, settings):
    comm_rank = int(__import__("os").environ["RANK"])
    settings = {k: (v(comm_rank) if callable(v) else v) for k, v in settings.items()}
    return _run(out, settings)


def _seed_of(rank):
    return rank


@pytest.mark.parametrize("P, settings, message", [
    (3, dict(RUN, n=2, test_n=0), "3 processes but only 2 training points"),
    (2, dict(RUN, test_n=1), "2 processes but only 1 test points"),
    (2, dict(RUN, seed=_seed_of), r"ranks disagree on settings\['seed'\]: rank 0 has 0, "
                                  r"rank 1 has 1"),
    (2, dict(RUN, centers=301), "centers = 301 but there are only N = 300"),
    (2, dict(RUN, solver="exact"), "solver='exact' runs in one process"),
])
def test_bad_input_is_refused_on_every_rank_before_any_work(tmp_path, P, settings, message):
    out = tmp_path / "r"
    outcomes = _multiproc.run_all(_refused, P, args=(str(out), settings), init=False,
                                  timeout=60)
    for o in outcomes:
        assert not o.ok and not o.killed and isinstance(o.error, ValueError), o.describe()
        assert __import__("re").search(message, str(o.error)), str(o.error)
        assert "agop: rank" not in o.log  # refused together: no rank left the others
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--centers", "301"], "centers = 301 but there are only N = 300 training points; use "
                           "--centers 300 or fewer"),
    (["--centers", "5"], "centers = 5 but the training points hold K = 10 classes; use "
                         "--centers 10 or more (at least one center per class)"),
    (["--agop-points", "400"], "agop_points = 400 but there are only N = 300 training points"),
])
def test_cli_refuses_bad_sizes_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    args = ["rfm", "--n", "300", "--solver", "nystrom", "--device", "cpu", "--out", str(out),
            "--no-progress", *flags]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [f"agop: error: {message}"]
    assert not out.exists()


def test_cli_refuses_an_unknown_solver():
    with pytest.raises(SystemExit) as info:
        main(["rfm", "--solver", "fast"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- torchrun
E2E = ["rfm", "--dataset", "digits", "--solver", "nystrom", "--centers", "600", "--depth", "3",
       "--dtype", "float64", "--seed", "0", "--n", "600", "--test-n", "100", "--width", "64",
       "--device", "cpu", "--no-progress"]


def test_torchrun_writes_the_metrics_of_one_process(tmp_path, capsys):
    """`torchrun --standalone --nproc-per-node 2 -m agop rfm ...` against the same command in
    one process: the same metrics to 1e-6; rank 0 alone prints."""
    assert main([*E2E, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    # `-m agop -- rfm ...`: without the `--`, torchrun's parser reads agop's --n as an
    # abbreviation of its own options (--nnodes, --nproc-per-node, ...) and stops
    proc = _multiproc.run_torchrun(["--", *E2E, "--out", str(tmp_path / "two")], nproc=2,
                                   timeout=240)
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("NC1 of the layer") == 1
    one, two = (read_csv(tmp_path / d / "metrics.csv") for d in ("one", "two"))
    _close(one, two, 1e-6)
    assert read_json(tmp_path / "two" / "config.json")["world_size"] == 2


def test_torchrun_refuses_bad_input_in_one_line(tmp_path):
    bad = _multiproc.run_torchrun(["--", *E2E, "--centers", "601", "--out",
                                   str(tmp_path / "bad")], nproc=2, timeout=240, check=False)
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("agop: ")]
    assert lines == ["agop: error: centers = 601 but there are only N = 600 training points; "
                     "use --centers 600 or fewer"]


def test_new_settings_default_to_the_estimators():
    from agop.experiments.rfm import RFM_DEFAULTS

    params = DeepRFM().get_params()
    for key in ("solver", "centers", "nystrom_ridge", "agop_points"):
        assert RFM_DEFAULTS[key] == params[key], key


def test_a_folder_rank_0_cannot_use_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    outcomes = _multiproc.run_all(_run, 2, args=(str(out), RUN), init=False, timeout=60)
    for o in outcomes:
        assert isinstance(o.error, ValueError) and "is not empty" in str(o.error), o.describe()
        assert "agop: rank" not in o.log
    assert [f.name for f in out.iterdir()] == ["notes.txt"]
