"""The command line: version, help, datasets, and errors that exit with status 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agop import __version__
from agop.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("datasets", "rfm", "mlp", "theory", "reproduce", "report"):
        assert cmd in out


def test_datasets_lists_every_dataset_and_where_it_looked(tmp_path, capsys):
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "found" in out
    for name in ("mnist", "cifar10", "svhn", "fashion-mnist"):
        assert name in out
    assert str(tmp_path / "mnist") in out and "missing" in out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["rfm", "--dataset", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["rfm", "--dataset", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_every_public_name_of_the_package_resolves():
    import agop

    for name in agop.__all__:
        assert getattr(agop, name) is not None, name


# ----------------------------------------------------------------------------- issue 13
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("agop: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _unwritable(tmp_path):
    """Places no folder can be made: below a file, in /proc, in /sys (Linux)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    places = [(blocker / "out", str(blocker))]
    if sys.platform.startswith("linux"):
        places += [(Path("/proc/agop-test/out"), "/proc/agop-test"),
                   (Path("/sys/agop-test/out"), "/sys/agop-test")]
    return places


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rfm"
    assert main(["rfm", "--n", "100", "--test-n", "0", "--depth", "1", "--width", "16",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    return out


def test_an_unwritable_out_is_one_line_from_every_command(tmp_path, capsys, small_run):
    """A file as a parent, /proc, /sys: every command says which path in one line, rc 2,
    no OSError traceback (issue 13, item 7)."""
    capsys.readouterr()
    for out, named in _unwritable(tmp_path):
        commands = [
            ["rfm", "--n", "50", "--test-n", "0", "--depth", "1", "--width", "8",
             "--device", "cpu", "--no-progress", "--out", str(out)],
            ["mlp", "--n", "50", "--test-n", "0", "--epochs", "1", "--width", "8", "--depth", "1",
             "--device", "cpu", "--no-progress", "--out", str(out)],
            ["theory", "--out", str(out)],
            ["report", str(small_run), "--out", str(out / "report.html")],
            ["reproduce", "--scale", "tiny", "--datasets", "digits", "--no-progress",
             "--out", str(out)],
        ]
        for argv in commands:
            assert main(argv) == 2, argv
            line = _one_line_error(capsys)
            assert named in line, (argv, line)
            assert not Path(out).exists()


def test_warnings_of_a_command_are_one_line(tmp_path, small_run):
    """A resume under another thread count warns (issue 13, item 9); the CLI shows a warning
    as one line, ``agop: warning: ...``, and leaves the display of warnings as it found it."""
    import shutil
    import warnings

    import torch

    from agop import cli

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = torch.get_num_threads()
    shown = warnings.formatwarning
    torch.set_num_threads(before + 1)
    try:
        with pytest.warns(UserWarning, match=f"ran with {before} CPU thread.* continues with "
                                             f"{before + 1}"):
            assert main(["rfm", "--resume", str(run), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    assert warnings.formatwarning is shown
    assert cli._warning_line(UserWarning("a; b"), UserWarning, "x.py", 3) == "agop: warning: a; b\n"


def test_dataset_names_are_one_setting_whatever_their_case(tmp_path, capsys, small_run):
    """--dataset DIGITS on resume is the run's digits, not a conflicting setting (item 11)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert main(["rfm", "--resume", str(run), "--dataset", " Digits", "--no-progress"]) == 0
    assert main(["rfm", "--resume", str(run), "--dataset", "mnist", "--no-progress"]) == 2
    assert "dataset: run has 'digits', given 'mnist'" in _one_line_error(capsys)
