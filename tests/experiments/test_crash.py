"""Crash consistency: ``agop rfm`` and ``agop mlp`` killed with SIGKILL at random moments.

Each command runs once uninterrupted, then again several times, each killed (SIGKILL: no
cleanup, no ``finally``) at a moment drawn from a seeded generator over the uninterrupted
run's working time (up to its last checkpoint), its resume killed too at a moment drawn over
the whole run (figures and summary included), then resumed to the end. Every
run must end with exactly the numbers of the uninterrupted one (metrics.csv, the times of the
Deep RFM rows aside; the Gram snapshots) and leave no temporary file. A kill can land anywhere:
before the run folder exists (the next attempt starts it with ``--out``), while it is created,
between a step's records and its checkpoint, inside an atomic write, in the figures or the
summary.

The commands run in processes forked from a server that imported agop once
(``_forker.py``), so that a kill costs milliseconds instead of the seconds of ``import torch``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from agop.experiments.records import read_csv, read_json

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                                 reason="the fork server needs os.fork and /proc (Linux)")]

sys.path.insert(0, str(Path(__file__).parent))
from _forker import Forker  # noqa: E402

RFM = ["rfm", "--n", "300", "--test-n", "60", "--depth", "5", "--width", "64",
       "--device", "cpu", "--no-progress"]
MLP = ["mlp", "--n", "200", "--test-n", "60", "--epochs", "6", "--measure-every", "2",
       "--width", "32", "--depth", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress"]
TRIALS = 3  # runs killed per command, each one's first resume too: about 6 kills


@pytest.fixture(scope="module")
def forker():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    server = Forker(env)
    assert server.threads == 1  # forks only from a single-threaded process
    yield server
    server.close()


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _numbers(folder: Path) -> list[dict]:
    """metrics.csv without the wall-clock columns (the Deep RFM rows time each layer)."""
    return [{k: v for k, v in row.items() if not k.startswith("seconds")}
            for row in read_csv(folder / "metrics.csv")]


def _crash_and_resume(forker, argv, tmp_path, seed):
    whole = tmp_path / "whole"
    done = forker.run(argv + ["--out", whole], tmp_path, tmp_path / "whole.log")
    assert done["rc"] == 0, (tmp_path / "whole.log").read_text()
    span = done["seconds"]
    working = max((whole / "checkpoint.pt").stat().st_mtime - done["started"], 0.1 * span)
    rng = random.Random(seed)
    killed, landed = 0, []
    for trial in range(TRIALS):
        cut = tmp_path / f"cut{trial}"
        log = tmp_path / f"cut{trial}.log"
        for attempt in range(20):
            resume = (cut / "config.json").is_file()
            flags = ["--resume", cut] if resume else ["--out", cut]
            when = (rng.uniform(0.0, working) if attempt == 0
                    else rng.uniform(0.0, span) if attempt == 1 else None)
            result = forker.run(argv + flags, tmp_path, log, kill_after=when)
            if result["killed"]:
                killed += 1
                landed.append((cut / "checkpoint.pt").exists()
                              and not (cut / "summary.json").exists())
                continue
            assert result["rc"] == 0, log.read_text()
            break
        else:
            pytest.fail(f"{cut} did not finish in 20 attempts:\n{log.read_text()}")
        assert _numbers(cut) == _numbers(whole), f"trial {trial} (log: {log.read_text()})"
        assert _temporaries(cut) == [], f"trial {trial}"
        summary = read_json(cut / "summary.json")
        assert summary["complete"] is True
        assert summary["records"]["metrics.csv"]["rows"] == len(read_csv(cut / "metrics.csv"))
    # the kills landed: runs were cut short (all of them unless the machine sped up after the
    # uninterrupted run), some between checkpoints (about half on 2 cores; the others before
    # the first checkpoint or in the figures)
    assert killed >= TRIALS // 2 and sum(landed) >= 1, (killed, landed)
    return whole


def test_rfm_killed_at_random_moments_resumes_to_the_same_numbers(forker, tmp_path):
    whole = _crash_and_resume(forker, RFM, tmp_path, seed=1)
    grams = sorted(p.name for p in (whole / "gram").iterdir())
    assert grams  # Figure 2's snapshots: the same matrices after any crash
    for trial in range(TRIALS):
        for name in grams:
            a = np.load(whole / "gram" / name)["gram"]
            b = np.load(tmp_path / f"cut{trial}" / "gram" / name)["gram"]
            assert np.array_equal(a, b), (trial, name)


def test_mlp_killed_at_random_moments_resumes_to_the_same_numbers(forker, tmp_path):
    whole = _crash_and_resume(forker, MLP, tmp_path, seed=2)
    text = (whole / "metrics.csv").read_text()
    for trial in range(TRIALS):
        assert (tmp_path / f"cut{trial}" / "metrics.csv").read_text() == text
