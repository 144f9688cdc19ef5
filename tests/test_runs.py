"""Run folders: atomic records, exact CSV round trips, safe checkpoints, resume rules."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from agop.experiments.records import (RunDir, atomic_write_json, atomic_write_text, default_run_dir, read_csv,
                       read_json, write_csv)


def test_csv_round_trips_floats_exactly_and_keeps_missing_values(tmp_path):
    rows = [{"layer": 1, "stage": "input", "nc1": 1 / 3, "test_acc": None},
            {"layer": 2, "stage": "agop", "nc1": np.float64(2.5e-17), "extra": "x"}]
    write_csv(tmp_path / "m.csv", rows)
    back = read_csv(tmp_path / "m.csv")
    assert back[0]["nc1"] == 1 / 3 and back[1]["nc1"] == 2.5e-17  # bit-exact
    assert back[0]["test_acc"] is None and back[0]["extra"] is None
    assert back[1]["layer"] == 2 and back[1]["stage"] == "agop"


def test_json_is_strict_and_handles_numpy_and_torch(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "n": np.int64(3),
                                            "t": torch.tensor([1.0, 2.0]), "bad": math.nan,
                                            "inf": [math.inf]})
    data = read_json(tmp_path / "a.json")
    assert data == {"x": 1.5, "n": 3, "t": [1.0, 2.0], "bad": None, "inf": [None]}
    assert "NaN" not in (tmp_path / "a.json").read_text()


def test_atomic_write_leaves_no_partial_file_and_shares_the_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # the temporary file is gone
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRGRP  # not mkstemp's 0600


def test_rundir_create_resume_and_refusals(tmp_path):
    run = RunDir.create(tmp_path / "r", "rfm", {"depth": 3, "seed": 0})
    assert run.kind == "rfm" and run.settings == {"depth": 3, "seed": 0}
    assert "agop_version" in run.config and "torch_version" in run.config
    with pytest.raises(ValueError, match="already holds a run"):
        RunDir.create(tmp_path / "r", "rfm", {})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        RunDir.create(tmp_path / "other", "rfm", {})
    with pytest.raises(FileNotFoundError, match="config.json"):
        RunDir.resume(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is a 'rfm' run"):
        RunDir.resume(tmp_path / "r", "mlp")
    again = RunDir.resume(tmp_path / "r", "rfm")
    assert again.settings == run.settings and not again.is_complete
    again.write_summary({"x": 1})
    assert RunDir.resume(tmp_path / "r").is_complete


def test_check_settings_names_every_difference():
    RunDir.check_settings({"a": 1, "b": 2}, {"a": 1, "b": None, "c": 5})  # None: not given
    with pytest.raises(ValueError, match="a: run has 1, given 2"):
        RunDir.check_settings({"a": 1}, {"a": 2})


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_round_trip_and_refuses_code(tmp_path):
    run = RunDir.create(tmp_path / "r", "mlp", {})
    assert run.load_checkpoint() is None
    state = {"epoch": 3, "w": torch.arange(4.0), "gen": torch.Generator().get_state()}
    run.save_checkpoint(state)
    back = run.load_checkpoint()
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    # a checkpoint that would execute code when unpickled is refused by weights_only=True, in
    # one line that names the file and does not suggest weights_only=False
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(ValueError) as exc:
        run.load_checkpoint()
    message = str(exc.value)
    assert "checkpoint.pt was refused" in message and "delete it" in message
    assert "system" in message  # what it asked for: os.system
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()  # the payload never ran


def test_default_run_dir_is_fresh(tmp_path):
    a = default_run_dir("rfm", tmp_path)
    a.mkdir()
    b = default_run_dir("rfm", tmp_path)
    assert a != b and a.name.startswith("rfm-")


# ----------------------------------------------------------------------------- issue 13
def _create_in_child(path, k, barrier, results):
    barrier.wait()  # every process calls create at the same moment
    try:
        RunDir.create(path, "rfm", {"who": k})
        results.put("won")
    except ValueError as exc:
        results.put("refused: " + str(exc))
    except BaseException as exc:  # noqa: BLE001 - anything else is a failure of the test
        results.put(f"failed: {exc!r}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_create_is_atomic_when_processes_race_for_one_folder(tmp_path):
    """Four processes create the same run folder at once, ten times: exactly one wins each
    time, the others get a one-line ValueError, and config.json is the winner's, whole.
    (Before the fix, all of them "won" every time.)"""
    import multiprocessing
    import warnings

    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = tmp_path / f"r{round_}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            procs = [ctx.Process(target=_create_in_child, args=(path, k, barrier, results))
                     for k in range(4)]
            for p in procs:
                p.start()
        outcome = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(10)
        assert outcome[-1] == "won" and outcome.count("won") == 1, outcome
        for lost in outcome[:-1]:
            # a loser that arrives while the winner is writing sees a folder that is not empty
            assert ("already holds a run" in lost or "exists and is not empty" in lost) \
                and "\n" not in lost, lost
        config = read_json(path / "config.json")
        assert config["kind"] == "rfm" and config["settings"]["who"] in range(4)
        assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # no temporaries


def test_create_claims_a_folder_once_even_if_both_passed_the_check(tmp_path, monkeypatch):
    """The interleaving that broke the old create, forced: two threads both find the folder
    unused, then both write config.json. The claim is one os.link: one of them wins."""
    import threading

    both_checked = threading.Barrier(2)
    check = RunDir._check_unused.__func__

    def slow_check(cls, path):
        check(cls, path)
        both_checked.wait(timeout=10)

    monkeypatch.setattr(RunDir, "_check_unused", classmethod(slow_check))
    outcome = []

    def create(k):
        try:
            RunDir.create(tmp_path / "r", "mlp", {"who": k})
            outcome.append("won")
        except ValueError as exc:
            outcome.append(str(exc))

    threads = [threading.Thread(target=create, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome.count("won") == 1 and "already holds a run" in "".join(outcome)


def test_temporaries_of_a_killed_writer_do_not_block_and_are_removed(tmp_path):
    """A kill inside an atomic write leaves .NAME.XXXXXXXX.tmp: a new run in that folder and a
    resumed run remove it; files that merely end in .tmp are the user's and stay."""
    from agop.experiments.common import start_run
    from agop.experiments.records import is_temporary, remove_temporaries

    assert is_temporary(".checkpoint.pt.a1b2_c3d.tmp") and is_temporary(".config.json.abcdefgh.tmp")
    assert not is_temporary("notes.tmp") and not is_temporary(".x.tmp")
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / ".config.json.k3j4l5m6.tmp").write_text("{")  # killed while creating the run
    run = RunDir.create(folder, "demo", {"a": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    run.save_checkpoint({"epoch": 1})
    (folder / ".checkpoint.pt.zz99aa11.tmp").write_bytes(b"half")  # killed mid-checkpoint
    (folder / "gram").mkdir()
    (folder / "gram" / ".layer_001.npz.abcd1234.tmp").write_bytes(b"")
    (folder / "mine.tmp").write_text("keep")
    start_run("demo", {"a": 1}, {}, resume=folder)
    assert sorted(p.name for p in folder.rglob("*")) == ["checkpoint.pt", "config.json",
                                                         "gram", "mine.tmp"]
    assert remove_temporaries(folder) == []


def test_create_refuses_files_that_are_not_a_run(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        RunDir.create(tmp_path / "file", "rfm", {})
    with pytest.raises(NotADirectoryError) as exc:  # a file where a parent folder must be
        RunDir.create(tmp_path / "file" / "deeper" / "run", "rfm", {})
    assert exc.value.filename == str(tmp_path / "file")


def test_read_csv_names_the_file_of_every_damage(tmp_path):
    """Undecodable bytes, a file cut in the middle of a line, a row with too many or too few
    fields and an empty file: ValueError naming the file, never a row silently short."""
    good = tmp_path / "m.csv"
    write_csv(good, [{"layer": l, "nc1": 1 / l} for l in (1, 2, 3)])
    text = good.read_bytes()
    cases = {"binary.csv": b"\xff\xfe\x00layer\n", "cut.csv": text[:-5],
             "extra.csv": text + b"4,0.25,9\n", "short.csv": text + b"4\n", "empty.csv": b""}
    why = {"binary.csv": "not UTF-8", "cut.csv": "cut short", "extra.csv": "line 5",
           "short.csv": "line 5", "empty.csv": "empty"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=why[name]) as exc:
            read_csv(tmp_path / name)
        assert str(tmp_path / name) in str(exc.value) and "\n" not in str(exc.value)
    assert read_csv(good)[2] == {"layer": 3, "nc1": 1 / 3}


def test_damaged_checkpoints_are_one_line_errors_naming_the_file(tmp_path):
    run = RunDir.create(tmp_path / "r", "mlp", {})
    run.save_checkpoint({"epoch": 2, "w": torch.ones(1000)})
    f = tmp_path / "r" / "checkpoint.pt"
    whole = f.read_bytes()
    for data, why in ((whole[: len(whole) // 2], "cannot be read"),
                      (b"not a checkpoint at all", "cannot be read"),
                      (b"", "cannot be read")):
        f.write_bytes(data)
        with pytest.raises(ValueError, match=why) as exc:
            run.load_checkpoint()
        message = str(exc.value)
        assert message.startswith(str(f)) and "delete it" in message and "\n" not in message
    torch.save([1, 2, 3], f)  # loads, but is no checkpoint
    with pytest.raises(ValueError, match="holds a list, not an agop checkpoint"):
        run.load_checkpoint()


def test_summary_records_its_table_and_problems_are_named(tmp_path):
    """summary.json of a finished run holds the rows and SHA-256 of metrics.csv; a table cut,
    emptied, changed or removed afterwards is named by record_problems (issue 13, item 4)."""
    run = RunDir.create(tmp_path / "r", "rfm", {})
    rows = [{"layer": l, "stage": "input", "nc1": 2.0 ** -l} for l in range(1, 21)]
    run.write_metrics(rows)
    assert run.record_problems() == []  # unfinished, and its table is fine
    run.write_summary({"x": 1})
    record = run.read_summary()["records"]["metrics.csv"]
    data = (run.path / "metrics.csv").read_bytes()
    assert record["rows"] == 20 and record["bytes"] == len(data)
    import hashlib

    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert run.record_problems() == []

    f = run.path / "metrics.csv"
    f.write_bytes(data[:300])  # cut mid-line
    assert "cut short" in run.record_problems()[0]
    f.write_bytes(data[: data.index(b"\n", 200) + 1])  # cut at a line end: fewer rows
    assert "but the finished run wrote 20" in run.record_problems()[0]
    f.write_bytes(data.split(b"\n", 1)[0] + b"\n")  # header only
    assert any("holds no rows" in p for p in run.record_problems())
    f.write_bytes(data.replace(b"0.5", b"0.7"))  # same rows, other numbers
    assert "SHA-256 differs" in run.record_problems()[0]
    f.unlink()
    assert "missing" in run.record_problems()[0]
    # an unfinished run whose table is missing or empty says so too
    other = RunDir.create(tmp_path / "u", "mlp", {})
    assert "has not recorded a step" in other.record_problems()[0]
