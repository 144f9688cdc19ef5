"""pytest plugin for mutation testing (mutmut 3, ``[tool.mutmut]`` in pyproject.toml).

mutmut runs each mutant against every selected test that called the mutated function. This
plugin narrows that to the tests of the module the mutant lives in (``OWN_TESTS``), so that a
module's score says how well *its own* test file pins it down, and a run fits in about an hour
on 2 cores (the Deep RFM tests call every kernel, solve and AGOP function). A mutant whose
function no own test reaches ends as "no tests" (pytest exit code 5).

Outside mutmut (no ``MUTANT_UNDER_TEST`` in the environment) it changes nothing. Under
mutmut it also keeps torch on one thread (see :func:`pytest_configure`). Not collected as a
test file (no ``test_`` prefix).
"""

from __future__ import annotations

import os

#: module → its own test files (paths from the repository root; tests mirror modules)
OWN_TESTS = {
    "agop.kernels": ("tests/test_kernels.py",),
    "agop.solve": ("tests/test_solve.py",),
    "agop.nystrom": ("tests/test_nystrom.py",),
    "agop.agop": ("tests/test_agop.py",),
    "agop.linalg": ("tests/test_linalg.py",),
    "agop.collapse": ("tests/test_collapse.py",),
    "agop.theory": ("tests/test_theory.py",),
    "agop.models.deep_rfm": ("tests/models/test_deep_rfm.py",),
    "agop.models.mlp": ("tests/models/test_mlp.py",),
}


#: tests that run the code under test in processes they spawn: those import the installed
#: package, not the mutated copy, so they cannot kill a mutant, and they take minutes each
#: (any test marked ``distributed`` counts too)
SUBPROCESS_TESTS = {
    "tests/test_collapse.py::test_all_reduce_over_gloo_gives_every_rank_the_merged_statistics",
}


def own_tests(mutant: str) -> tuple[str, ...] | None:
    """The test files of the module of ``mutant`` (e.g. ``agop.solve.x_fitted__mutmut_3``);
    None when it names no module of ``OWN_TESTS`` (then every selected test runs)."""
    module = max((m for m in OWN_TESTS if mutant.startswith(m + ".")), key=len, default=None)
    return None if module is None else OWN_TESTS[module]


def pytest_configure(config):
    if "MUTANT_UNDER_TEST" in os.environ:
        # mutmut forks a worker per mutant from a process that has run tests (its stats and
        # clean runs): an OpenMP pool of several threads started there (a test calling
        # torch.set_num_threads(2)) deadlocks in every forked worker. Under mutmut torch stays
        # on one thread; such tests then check their one-thread path.
        import torch

        torch.set_num_threads = lambda n: None


def pytest_collection_modifyitems(config, items):
    if "MUTANT_UNDER_TEST" not in os.environ:
        return  # not under mutmut
    files = own_tests(os.environ["MUTANT_UNDER_TEST"])
    if files is None:
        return  # mutmut's stats, clean and forced-fail runs: every selected test
    keep, drop = [], []
    for item in items:
        nodeid = item.nodeid.removeprefix("mutants/")
        own = nodeid.split("::", 1)[0] in files
        spawns = nodeid in SUBPROCESS_TESTS or item.get_closest_marker("distributed") is not None
        (keep if own and not spawns else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
