"""agop.distributed: collectives, settings agreement, row ranges and failure handling, on 2 and 3
processes joined by gloo on 127.0.0.1 (tests/_multiproc.py), and under torchrun itself."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
import torch

import _multiproc
from agop import distributed
from agop.distributed import check_world_size, row_range

pytestmark = pytest.mark.distributed

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _rank_tensor(rank: int, dtype=torch.float32, n: int = 1000) -> torch.Tensor:
    """Rank r's summand: values of very different magnitudes, so the order of a sum shows."""
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(n, generator=g, dtype=torch.float64)
            * 10.0 ** torch.randint(-6, 7, (n,), generator=g)).to(dtype)


# ----------------------------------------------------------------------------- workers
def _collectives() -> dict:
    comm = distributed.current()
    r, P = comm.rank, comm.world
    out: dict = {"rank": r, "world": P, "backend": comm.backend, "root": comm.is_root}

    t = _rank_tensor(r)
    plain, again = comm.all_reduce_sum(t), comm.all_reduce_sum(t)
    ordered = comm.all_reduce_sum(t, ordered=True)
    out.update(plain=plain, again=again, ordered=ordered,
               ordered64=comm.all_reduce_sum(_rank_tensor(r, torch.float64), ordered=True),
               ints=comm.all_reduce_sum(torch.arange(4) * (r + 1)),
               ints_ordered=comm.all_reduce_sum(torch.arange(4) * (r + 1), ordered=True))

    out["gathered"] = comm.all_gather(torch.full((2, 3), float(r)) + torch.arange(3.0))
    mine = torch.full((3,), float(r), dtype=torch.float64)
    out["broadcast"] = comm.broadcast(mine, src=P - 1)
    out["broadcast_object"] = comm.broadcast_object({"from": r, "seed": 7} if r == 1 else None,
                                                     src=1)
    out["gather_object"] = comm.all_gather_object(("rank", r))

    comm.agree({"seed": 0, "n": 300, "solver": "nystrom"}, "settings")  # equal: no error
    for name, value in (("settings", {"seed": 0, "n": 300 + (r == P - 1), "solver": "nystrom"}),
                        ("the dataset", "mnist" if r == 0 else "cifar10")):
        try:
            comm.agree(value, name)
            out[f"agree {name}"] = None
        except ValueError as exc:
            out[f"agree {name}"] = str(exc)

    out["rows"] = {n: comm.row_range(n) for n in (P, 7, 10, 1001)}
    try:
        comm.row_range(P - 1, "training points")
        out["too_small"] = None
    except ValueError as exc:
        out["too_small"] = str(exc)
    comm.barrier()
    return out


def _fail_on(bad: int, note_dir: str) -> dict:
    """Rank ``bad`` raises inside session(); the others wait in an all_reduce. The failed rank
    then stays alive until every peer has reported its own error (files in note_dir): so the
    peers were released by session() leaving the group, not by the process exiting."""
    notes = Path(note_dir)
    rank = int(os.environ["RANK"])
    t0 = time.monotonic()
    try:
        with distributed.session("cpu", timeout_s=60) as comm:
            if comm.rank == bad:
                raise ValueError(f"rank {bad} gave up")
            comm.all_reduce_sum(torch.ones(3))
            comm.all_reduce_sum(torch.ones(3))
        return {"rank": rank, "error": None}
    except Exception as exc:
        initialized = torch.distributed.is_initialized()
        (notes / f"{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        if rank != bad:
            raise
        world = int(os.environ["WORLD_SIZE"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(notes.glob("*.txt"))) < world:
            time.sleep(0.02)
        return {"rank": rank, "error": str(exc), "group_left": not initialized,
                "peers_failed": len(list(notes.glob("*.txt"))) - 1,
                "waited_s": time.monotonic() - t0}


def _session_roundtrip() -> dict:
    before = torch.distributed.is_initialized()
    with distributed.session("cpu", timeout_s=30) as comm:
        inside = (comm.rank, comm.world, comm.backend, str(comm.device))
        total = comm.all_reduce_sum(torch.tensor([float(comm.rank + 1)]))
    return {"before": before, "inside": inside, "total": total.item(),
            "after": torch.distributed.is_initialized()}


def _raise_on_rank_1() -> int:
    comm = distributed.current()
    if comm.rank == 1:
        raise KeyError("the value rank 1 looked for")
    comm.all_reduce_sum(torch.ones(1))
    return comm.rank


def _hang_on_rank_0() -> None:
    if distributed.current().rank == 0:
        time.sleep(120)


# ----------------------------------------------------------------------------- collectives
@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def collectives(request):
    return _multiproc.run(_collectives, request.param)


def test_every_rank_knows_its_place(collectives):
    P = len(collectives)
    assert [o["rank"] for o in collectives] == list(range(P))
    assert {(o["world"], o["backend"]) for o in collectives} == {(P, "gloo")}
    assert [o["root"] for o in collectives] == [True] + [False] * (P - 1)


def test_all_reduce_sum_is_bit_identical_on_every_rank(collectives):
    P = len(collectives)
    ref = collectives[0]
    for o in collectives:
        for key in ("plain", "ordered", "ordered64", "ints", "ints_ordered"):
            assert o[key].dtype == ref[key].dtype and torch.equal(o[key], ref[key]), key
        assert torch.equal(o["again"], o["plain"])  # gloo's order is fixed for a given world
    assert ref["plain"].dtype == torch.float32
    # ordered=True is the rank-order float64 sum, rounded once.
    parts = [_rank_tensor(r).double() for r in range(P)]
    expect = parts[0].clone()
    for p in parts[1:]:
        expect += p
    assert torch.equal(ref["ordered"], expect.float())
    parts64 = [_rank_tensor(r, torch.float64) for r in range(P)]
    expect64 = parts64[0].clone()
    for p in parts64[1:]:
        expect64 += p
    assert torch.equal(ref["ordered64"], expect64)
    # The backend's sum differs from it only by rounding: a few float32 ulps of Σ|parts|.
    bound = 4 * torch.finfo(torch.float32).eps * sum(p.abs() for p in parts)
    assert torch.all((ref["plain"].double() - expect).abs() <= bound)
    if P == 3:  # (two summands: both are the correctly rounded a + b)
        assert not torch.equal(ref["plain"], ref["ordered"])  # gloo does not add in rank order
    tri = sum(r + 1 for r in range(P))
    assert ref["ints"].tolist() == ref["ints_ordered"].tolist() == [0, tri, 2 * tri, 3 * tri]
    assert ref["ints_ordered"].dtype == torch.int64


def test_all_gather_broadcast_and_objects(collectives):
    P = len(collectives)
    for o in collectives:
        assert len(o["gathered"]) == P
        for r, g in enumerate(o["gathered"]):
            assert torch.equal(g, torch.full((2, 3), float(r)) + torch.arange(3.0))
        assert torch.equal(o["broadcast"], torch.full((3,), float(P - 1), dtype=torch.float64))
        assert o["broadcast_object"] == {"from": 1, "seed": 7}
        assert o["gather_object"] == [("rank", r) for r in range(P)]


def test_agree_refuses_differing_settings_on_every_rank(collectives):
    P = len(collectives)
    msgs = {o["agree settings"] for o in collectives}
    assert msgs == {f"ranks disagree on settings['n']: rank 0 has 300, rank {P - 1} has 301"}
    assert {o["agree the dataset"] for o in collectives} == {
        "ranks disagree on the dataset: rank 0 has 'mnist', rank 1 has 'cifar10'"}


def test_row_ranges_cover_every_row_once_in_rank_order(collectives):
    P = len(collectives)
    for n in (P, 7, 10, 1001):
        ranges = [o["rows"][n] for o in collectives]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [stop - start for start, stop in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)
    assert {o["too_small"] for o in collectives} == {
        f"{P} processes but only {P - 1} training points: each process needs at least one of "
        f"them; run at most {P - 1} processes (torchrun --nproc-per-node / --nnodes)"}


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize("P, bad", [(2, 1), (3, 0)])
def test_a_failing_rank_releases_the_others_at_once(tmp_path, P, bad):
    outcomes = _multiproc.run_all(_fail_on, P, args=(bad, str(tmp_path)), init=False,
                                  timeout=45, grace=40)
    assert not any(o.killed for o in outcomes)  # nobody hung: every rank ended by itself
    failed = outcomes[bad]
    assert failed.ok and failed.value["error"] == f"rank {bad} gave up"
    assert failed.value["group_left"] and failed.value["peers_failed"] == P - 1
    assert f"agop: rank {bad} of {P} failed: ValueError: rank {bad} gave up; leaving the " \
           "process group" in failed.log
    for o in outcomes:
        if o.rank != bad:
            assert not o.ok and isinstance(o.error, RuntimeError)
            assert f"agop: rank {o.rank} of {P} failed: RuntimeError" in o.log


def test_run_reraises_the_first_failure_with_the_child_traceback():
    with pytest.raises(KeyError, match="the value rank 1 looked for") as info:
        _multiproc.run(_raise_on_rank_1, 2, timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, _multiproc.RemoteTraceback)
    assert "rank 1: failed (exit code 1)" in cause.text
    assert 'raise KeyError("the value rank 1 looked for")' in cause.text
    assert "_raise_on_rank_1" in cause.text


def test_a_hanging_rank_is_killed_at_the_timeout():
    with pytest.raises(_multiproc.MultiprocTimeout, match="rank 0: killed .still running at "
                                                          "the 1.5 s timeout"):
        _multiproc.run(_hang_on_rank_0, 2, timeout=1.5)


# ----------------------------------------------------------------------------- session
def test_session_joins_and_leaves_the_group_it_made():
    outs = _multiproc.run(_session_roundtrip, 2, init=False)
    assert outs == [{"before": False, "inside": (r, 2, "gloo", "cpu"), "total": 3.0,
                     "after": False} for r in range(2)]


def test_session_keeps_a_group_the_caller_made():
    outs = _multiproc.run(_session_roundtrip, 3)
    assert [o["after"] for o in outs] == [True] * 3 and {o["total"] for o in outs} == {6.0}


def test_session_without_torchrun_is_the_single_process(monkeypatch):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.session("cpu") as comm:
        assert (comm.rank, comm.world, comm.backend) == (0, 1, None)
        assert comm.device == torch.device("cpu")
        t = torch.arange(3.0)
        assert comm.all_reduce_sum(t) is t and comm.all_reduce_sum(t, ordered=True) is t
        assert comm.all_gather(t) == [t] and comm.broadcast(t) is t
        assert comm.all_gather_object("x") == ["x"] and comm.broadcast_object(5) == 5
        comm.agree("anything", "settings")
        comm.barrier()
        assert comm.row_range(5) == (0, 5)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, kwargs, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, {}, "RANK=2 and WORLD_SIZE=2: need 0 ≤ RANK < WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, {}, "RANK must be an integer; got 'x'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, {}, "LOCAL_RANK must be ≥ 0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, {}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, {}, "MASTER_PORT is not set"),
    ({}, {"timeout_s": 0}, "timeout_s must be a finite number of seconds > 0"),
    ({}, {"timeout_s": "soon"}, "timeout_s must be a number"),
    ({}, {"device": "tpu"}, "unsupported device|unknown device"),
])
def test_init_from_env_refuses_bad_settings_before_connecting(monkeypatch, env, kwargs, message):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_env(**kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_session_on_a_cpu_machine_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="no CUDA device"):
        distributed.init_from_env("cuda")


# ----------------------------------------------------------------------------- pure functions
def test_row_range_partitions_for_every_small_case():
    for world in range(1, 9):
        for n in range(0, 40):
            ranges = [row_range(n, r, world) for r in range(world)]
            rows = [i for start, stop in ranges for i in range(start, stop)]
            assert rows == list(range(n))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("call, message", [
    (lambda: row_range(10, 3, 3), "rank must be in 0..2; got rank 3 of 3"),
    (lambda: row_range(10, 0, 0), "world must be an integer ≥ 1"),
    (lambda: row_range(-1, 0, 2), "n must be an integer ≥ 0"),
    (lambda: row_range(2.5, 0, 2), "n must be an integer"),
    (lambda: check_world_size(2, 3), "3 processes but only 2 points"),
    (lambda: check_world_size(0, 1, "centers"), "1 processes but only 0 centers"),
])
def test_bad_ranges_and_world_sizes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_agree_message_points_at_the_first_differing_key():
    from agop.distributed import _first_difference, _same

    assert _same(torch.ones(2), torch.ones(2)) and not _same(torch.ones(2), torch.ones(3))
    assert not _same(torch.ones(2), torch.ones(2, dtype=torch.float64))
    import numpy as np

    assert _same(np.arange(3), np.arange(3)) and not _same(np.arange(3), np.arange(4))
    assert _first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3}, "s") == ("s['b']", 2, 3)
    assert _first_difference({"a": 1}, {"a": 1, "c": 0}, "s") == ("s['c']", "<missing>", 0)


# ----------------------------------------------------------------------------- torchrun
WORKER = textwrap.dedent("""
    import json, sys, torch
    from agop import distributed

    out = sys.argv[1]
    with distributed.session("cpu", timeout_s=60) as comm:
        start, stop = comm.row_range(10)
        total = comm.all_reduce_sum(torch.tensor([float(stop - start)]), ordered=True)
        with open(f"{out}/rank{comm.rank}.json", "w") as f:
            json.dump({"rank": comm.rank, "world": comm.world, "backend": comm.backend,
                       "rows": [start, stop], "total": total.item()}, f)
""")


@pytest.mark.slow  # three fresh Python processes import torch: ~10 s on 2 cores
def test_torchrun_standalone_runs_a_session(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _multiproc.run_torchrun([str(tmp_path)], nproc=2, script=script, timeout=120)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [{"rank": 0, "world": 2, "backend": "gloo", "rows": [0, 5], "total": 10.0},
                   {"rank": 1, "world": 2, "backend": "gloo", "rows": [5, 10], "total": 10.0}]


@pytest.mark.slow  # torchrun imports torch: ~5 s on 2 cores
def test_torchrun_ends_the_run_when_a_rank_fails(tmp_path):
    # No torch in the workers (fast): rank 1 fails, rank 0 would sleep past the timeout; torchrun
    # terminates it and reports rank 1's error, and run_torchrun raises with that output.
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import os, time
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 stops here")
        time.sleep(300)
    """))
    with pytest.raises(_multiproc.TorchrunFailed) as info:
        _multiproc.run_torchrun([], nproc=2, script=script, timeout=120)
    text = str(info.value)
    assert text.startswith("exit code 1: ") and "--standalone --nproc-per-node 2" in text
    assert 'RuntimeError: rank 1 stops here' in text and info.value.proc.returncode == 1


def test_torchrun_command_is_the_documented_launch():
    cmd = _multiproc.torchrun_command(["rfm", "--depth", 3], nproc=3)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                       "-m", "agop", "rfm", "--depth", "3"]
