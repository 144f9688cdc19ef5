"""Tests of agop.experiments.mlp: the headline numbers, run_mlp's records and resume, `agop mlp`."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from _records import mlp_rows
from agop.cli import main
from agop.experiments.mlp import headline, run_mlp, summary_text
from agop.experiments.records import read_csv
from agop.models.mlp import MLP, Trainer


# ----------------------------------------------------------------------------- headline
_rows = mlp_rows  # two layers, epochs 0 and 10 (tests/_records.py)


def test_headline_hand_computed():
    x = headline(_rows())
    assert x["last_epoch"] == 10 and x["first_epoch"] == 0 and x["num_layers"] == 2
    l1, l2 = x["per_layer"]
    assert (l1["layer"], l1["nc1_input"], l1["nc1_right"], l1["nc1_output"]) == (1, 100, 10, 10)
    assert (l1["drop_right"], l1["drop_output"]) == (pytest.approx(1), pytest.approx(0))
    assert (l2["drop_right"], l2["drop_output"]) == (pytest.approx(1), pytest.approx(1))
    assert l1["right_dominates"] is True and l2["right_dominates"] is False  # a tie does not
    assert x["layers_right_dominates"] == 1
    assert x["drop_right_total"] == pytest.approx(2) and x["drop_output_total"] == pytest.approx(1)
    assert x["share_right"] == pytest.approx(2 / 3)
    # per layer over the epochs; over the layers at the last epoch; over both
    assert (l1["nfa_sqrt"], l1["nfa_sqrt_min_over_epochs"]) == (0.9, 0.3)
    assert (l2["nfa_sqrt"], l2["nfa_sqrt_min_over_epochs"]) == (0.8, 0.2)
    assert x["nfa_sqrt_min_last_epoch"] == 0.8 and x["nfa_sqrt_max_last_epoch"] == 0.9
    assert x["nfa_sqrt_mean_last_epoch"] == pytest.approx(0.85)
    assert x["nfa_mean_last_epoch"] == pytest.approx(0.75)
    assert x["nfa_sqrt_min_all_epochs"] == 0.2
    assert (x["within_total_first_epoch"], x["within_total_last_epoch"]) == (0.9, 0.1)
    assert x["train_acc"] == 1.0 and math.isnan(x["test_acc"]) and x["loss"] == 1 / 11
    assert headline([]) == {}


def test_headline_undefined_values_are_nan_not_errors():
    rows = _rows()
    for r in rows:
        if r["epoch"] == 10 and r["layer"] == 2:
            r["nc1"] = 0.0 if r["stage"] == "output" else r["nc1"]  # a ratio with 0: no log
            r["nfa_sqrt"] = None  # as metrics.csv gives an undefined correlation
    x = headline(rows)
    l2 = x["per_layer"][1]
    assert math.isnan(l2["drop_output"]) and l2["right_dominates"] is False
    assert math.isnan(x["drop_output_total"]) and math.isnan(x["share_right"])
    assert math.isnan(x["nfa_sqrt_min_last_epoch"]) and math.isnan(x["nfa_sqrt_mean_last_epoch"])
    assert l2["nfa_sqrt_min_over_epochs"] == 0.2  # the undefined epoch is skipped
    assert x["nfa_sqrt_min_all_epochs"] == 0.2


def test_summary_text_reads_nan_as_null():
    text = summary_text({"last_epoch": 3, "loss": None, "train_acc": 0.5, "test_acc": None,
                         "per_layer": [{"layer": 1, "nc1_input": 2.0, "nc1_right": None,
                                        "nc1_output": 1.0, "nfa_sqrt": 0.9, "nfa": None}]})
    assert text.splitlines() == [
        "epoch 3: train loss nan, train acc 0.5000",
        "  layer 1: NC1 input 2 -> right nan -> output 1; NFA rho(WtW, AGOP^1/2) 0.900, "
        "rho(WtW, AGOP) nan"]


# ----------------------------------------------------------------------------- run_mlp
def test_bad_settings_raise_before_a_folder_is_made(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        run_mlp(preset="bogus", progress=False)
    with pytest.raises(ValueError, match="epochs must be an integer"):
        run_mlp(tmp_path / "run", epochs=-1, progress=False)
    assert not (tmp_path / "run").exists()


_TINY = dict(dataset="digits", n=120, test_n=40, measure_every=2, width=16, depth=2,
             lr=1e-3, device="cpu", progress=False)


def _interrupt_at(monkeypatch, epoch):
    real = Trainer.train_epoch

    def flaky(self):
        if self.epoch + 1 == epoch:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", flaky)


def _final_weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch, preset):
    whole = run_mlp(tmp_path / "whole", epochs=5, preset=preset, **_TINY)
    _interrupt_at(monkeypatch, 4)  # dies in epoch 4, after the checkpoint of epoch 2
    with pytest.raises(KeyboardInterrupt):
        run_mlp(tmp_path / "cut", epochs=5, preset=preset, **_TINY)
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.undo()
    resumed = run_mlp(resume=tmp_path / "cut", progress=False)
    assert (resumed.path / "metrics.csv").read_text() == (whole.path / "metrics.csv").read_text()
    a, b = _final_weights(whole.path), _final_weights(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.is_complete


def test_resume_with_more_epochs_continues_to_them(tmp_path):
    whole = run_mlp(tmp_path / "whole", epochs=4, **_TINY)
    short = run_mlp(tmp_path / "short", epochs=3, **_TINY)  # measured at 0, 2, 3
    assert [r["epoch"] for r in short.read_metrics()][::6] == [0, 2, 3]
    run_mlp(resume=short.path, epochs=4, progress=False)  # 3 is not on the new schedule
    assert (short.path / "metrics.csv").read_text() == (whole.path / "metrics.csv").read_text()
    assert json.loads((short.path / "config.json").read_text())["settings"]["epochs"] == 4
    with pytest.raises(ValueError, match="width"):
        run_mlp(resume=short.path, width=32, progress=False)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["mlp", "--epochs", "2", "--measure-every", "1", "--n", "200", "--width", "32",
               "--depth", "2", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "mlp" and config["device"] == "cpu" and config["dtype"] == "float32"
    assert config["settings"]["lr"] == 2e-5 and config["settings"]["init_scale"] == 0.01
    assert config["settings"]["dataset"] == "digits" and "torch_version" in config
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 3 * 2 * 3  # epochs 0, 1, 2 × layers × stages
    required = {"epoch", "layer", "stage", "nc1", "nc2", "nc1_pinv", "cdnv", "nc2_squared",
                "within_total", "between_total", "nfa", "nfa_sqrt", "loss", "train_acc",
                "test_acc"}
    assert required <= set(rows[0])
    assert {r["layer"] for r in rows} == {1, 2}
    assert all(r["within_total"] + r["between_total"] == pytest.approx(1.0) for r in rows)
    assert {p.name for p in (out / "figures").iterdir()} == {"fig1_nc1_stages.png",
                                                              "fig8_nfa_training.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["last_epoch"] == 2 and len(summary["per_layer"]) == 2
    assert main(["mlp", "--out", str(out), "--no-progress"]) == 2  # folder holds a run


def test_summary_is_the_headline_of_the_records(tmp_path):
    """summary.json holds headline() of metrics.csv as it is, and config["data"] has the one
    data schema of every run kind."""
    run = run_mlp(tmp_path / "run", epochs=3, **_TINY)
    summary = run.read_summary()
    expected = json.loads(json.dumps(headline(read_csv(run.path / "metrics.csv")),
                                     allow_nan=True).replace("NaN", "null"))
    assert {k: summary[k] for k in expected} == expected
    assert (summary["dataset"], summary["preset"]) == ("digits", "paper")
    assert summary["seconds"]["epochs"] == 3
    data = run.config["data"]
    assert set(data) == {"name", "train", "test", "dim", "classes", "class_names", "image_shape"}
    assert (data["name"], data["train"], data["test"], data["dim"], data["classes"]) == (
        "digits", 120, 40, 64, 10)
    assert data["image_shape"] == [1, 8, 8] and data["class_names"][3] == "3"


def test_resume_on_another_device_warns_and_records_it(tmp_path, monkeypatch):
    """One resume rule for every run kind: a device change warns (rounding may differ)."""
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_mlp(tmp_path / "cut", epochs=3, **_TINY)
    monkeypatch.undo()
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    config["device"] = "cuda:0"  # as if it had started on a GPU
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="started on cuda:0 and continues on cpu"):
        run = run_mlp(resume=tmp_path / "cut", device="cpu", progress=False)
    assert run.config["device"] == "cpu" and run.is_complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same device: no warning
        run_mlp(resume=tmp_path / "cut", device="cpu", epochs=4, progress=False)


# ----------------------------------------------------------------------------- issue 13
def test_sizes_and_memory_are_checked_before_the_run_folder(tmp_path, monkeypatch):
    """--n 1 (one class), --n 5 (classes without a point) and a network too large for the
    memory are refused before anything is written, so that the same --out works afterwards
    (issue 13, item 8)."""
    from agop.experiments.mlp import memory_needed

    out = tmp_path / "run"
    for n, why in ((1, "at least 2 classes"), (5, r"class\(es\) \[5, 6, 7, 8, 9\]")):
        with pytest.raises(ValueError, match=why):
            run_mlp(out, n=n, epochs=1, progress=False)
        assert not out.exists()
    with pytest.raises(MemoryError, match="width 200000, depth 2.* needs about .* TiB"):
        run_mlp(out, width=200000, depth=2, epochs=1, progress=False)
    assert not out.exists()
    # the estimate against independent counts: parameters from the module, four copies in
    # float32 (weights, gradients, Adam's two moments), and the data
    for D, K, N, W, L in ((64, 10, 120, 16, 2), (3072, 10, 1000, 512, 5)):
        P = sum(p.numel() for p in MLP(D, K, W, L).parameters())
        need = memory_needed(D, K, N, 0, width=W, depth=L, batch_size=128)
        assert need >= 16 * P + 4 * N * (D + K)
        assert need < 16 * P + 4 * N * (D + K) + 8 * 10 * L * max(D, W) ** 2  # not absurd
    monkeypatch.setenv("AGOP_MEMORY_GB", str(1e-4))  # 100 KiB: the default network is refused
    with pytest.raises(MemoryError, match="is free; use a smaller --width"):
        run_mlp(out, epochs=1, **{**_TINY, "width": 512})
    assert not out.exists()
    monkeypatch.delenv("AGOP_MEMORY_GB")
    run = run_mlp(out, epochs=1, **_TINY)
    assert run.config["memory_needed_bytes"] == memory_needed(64, 10, 120, 40, width=16, depth=2)


def test_a_damaged_checkpoint_is_one_line_and_deleting_it_starts_over(tmp_path, monkeypatch):
    """A checkpoint cut in half or holding another network's weights: one-line ValueError
    naming the file and what to do; deleting it restarts the run, which then ends with the
    numbers of an uninterrupted run (issue 13, item 5)."""
    whole = run_mlp(tmp_path / "whole", epochs=3, **_TINY)
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_mlp(tmp_path / "cut", epochs=3, **_TINY)
    monkeypatch.undo()
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    good = ckpt.read_bytes()
    other = {**state, "model": {**state["model"], "99.weight": torch.zeros(2, 2)}}
    for damage in (lambda: ckpt.write_bytes(good[: len(good) // 2]),
                   lambda: torch.save(other, ckpt),
                   lambda: torch.save({"epoch": "two"}, ckpt)):
        damage()
        with pytest.raises(ValueError) as exc:
            run_mlp(resume=tmp_path / "cut", progress=False)
        message = str(exc.value)
        assert message.startswith(f"{ckpt} ") and "delete it" in message and "\n" not in message
    # a metrics.csv cut at a line end is refused too: the checkpoint follows more rows
    ckpt.write_bytes(good)
    metrics = tmp_path / "cut" / "metrics.csv"
    rows = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(rows[:-2]))
    with pytest.raises(ValueError, match=f"{metrics} holds {len(rows) - 3} row"):
        run_mlp(resume=tmp_path / "cut", progress=False)
    metrics.write_text("".join(rows))
    ckpt.unlink()
    again = run_mlp(resume=tmp_path / "cut", progress=False)
    assert (again.path / "metrics.csv").read_text() == (whole.path / "metrics.csv").read_text()


def test_resume_notes_a_thread_change_and_reads_any_dataset_case(tmp_path, monkeypatch):
    """A resume with another torch thread count warns and records it (item 9); --dataset
    DIGITS is the run's digits (item 11); a metrics.csv that is not text is named."""
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_mlp(tmp_path / "cut", epochs=3, **_TINY)
    monkeypatch.undo()
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    threads = config["threads"]
    assert threads == torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=f"ran with {threads} CPU thread"):
            run = run_mlp(resume=tmp_path / "cut", dataset="DIGITS", progress=False)
    finally:
        torch.set_num_threads(before)
    assert run.config["threads"] == threads + 1
    assert run.config["threads_changed"] == [threads, threads + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same count again: nothing to say
        torch.set_num_threads(threads + 1)
        try:
            run_mlp(resume=tmp_path / "cut", epochs=4, progress=False)
        finally:
            torch.set_num_threads(before)
    metrics = tmp_path / "cut" / "metrics.csv"
    metrics.write_bytes(b"\x89PNG\r\n\x1a\n" + metrics.read_bytes())
    with pytest.raises(ValueError, match=f"{metrics} is not a CSV file agop wrote"):
        run_mlp(resume=tmp_path / "cut", epochs=5, progress=False)
