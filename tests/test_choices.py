"""The torch-free choice lists agree with what the library accepts, and the CLI offers them."""

from __future__ import annotations

import pytest

from agop import choices
from agop.agop import METHODS
from agop.cli import build_parser
from agop.kernels import KERNELS
from agop.models.mlp import PRESETS


def test_choices_are_the_library_names():
    assert choices.KERNEL_NAMES == tuple(KERNELS)
    assert choices.MLP_PRESETS == tuple(PRESETS)
    assert choices.AGOP_METHODS == METHODS


@pytest.mark.parametrize("argv, bad", [
    (["rfm", "--features", "cauchy"], "cauchy"),
    (["rfm", "--dtype", "float16"], "float16"),
    (["mlp", "--preset", "mine"], "mine"),
])
def test_the_cli_refuses_a_name_the_library_does_not_know(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert bad in err and "invalid choice" in err
