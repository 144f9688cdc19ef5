"""The command line: version, help, datasets, and errors that exit with status 2."""

from __future__ import annotations

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
