"""Run folders: atomic records, exact CSV round trips, safe checkpoints, resume rules."""

from __future__ import annotations

import math
import os
import pickle
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
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_round_trip_and_refuses_code(tmp_path):
    run = RunDir.create(tmp_path / "r", "mlp", {})
    assert run.load_checkpoint() is None
    state = {"epoch": 3, "w": torch.arange(4.0), "gen": torch.Generator().get_state()}
    run.save_checkpoint(state)
    back = run.load_checkpoint()
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    # a checkpoint that would execute code when unpickled is refused by weights_only=True
    torch.save({"x": _Payload()}, tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        run.load_checkpoint()


def test_default_run_dir_is_fresh(tmp_path):
    a = default_run_dir("rfm", tmp_path)
    a.mkdir()
    b = default_run_dir("rfm", tmp_path)
    assert a != b and a.name.startswith("rfm-")
