"""Test harness: run a function in P processes joined by gloo on 127.0.0.1, or agop under torchrun.

In a test module (``tests/`` is on ``sys.path`` under pytest)::

    import _multiproc
    from agop import distributed

    def _fit(n, depth):                      # module level: it is sent by reference
        comm = distributed.current()         # the group is already joined (gloo)
        start, stop = comm.row_range(n)
        ...                                  # the code under test, on this rank's rows
        return {"rank": comm.rank, "nc1": nc1}   # anything picklable

    def test_two_processes_match_one():
        results = _multiproc.run(_fit, 2, args=(300, 3))   # one result per rank, rank order
        ...

:func:`run` re-raises the first failure of any rank (its own exception type, with every
failing rank's traceback text attached as the cause) and kills everything after ``timeout``
seconds (``MultiprocTimeout``); :func:`run_all` returns every rank's :class:`Outcome` instead
(for tests of failures). End to end, the way users launch::

    proc = _multiproc.run_torchrun(["rfm", "--dataset", "digits", "--out", str(tmp_path / "run")],
                                   nproc=2, timeout=300)    # python -m torch.distributed.run ...

How: processes come from the ``forkserver`` start method, whose server imports
:data:`PRELOAD` (torch, numpy, agop) once per test session, so a process costs milliseconds,
not the seconds of a fresh ``import torch`` ("spawn" is available: ``start_method="spawn"``).
Each process takes the parent's environment and working directory as they are at the call
(``monkeypatch.setenv`` applies), ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` as torchrun sets them (so ``distributed.session()`` works inside), one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), ``torch.manual_seed(0)`` as
conftest.py does, and, unless ``init=False``, the default gloo group joined with
``pg_timeout``. Results and errors come back through files in a temporary folder (pickles
written by these child processes only); each child's stdout and stderr go to a log that is
printed, prefixed by rank, into the test's captured output, and kept in ``Outcome.log``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing

# Imported once by the forkserver; every child then starts with them loaded. Append module
# names before the first run of a session to share more (for example "agop.models").
PRELOAD = ["torch", "torch.distributed", "numpy", "pytest", "agop", "agop.distributed",
           "agop.datasets", "agop.backend", "_multiproc"]

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 10.0


class MultiprocTimeout(AssertionError):
    """Some ranks were still running at the deadline (or long after another rank failed)."""


class RemoteTraceback(Exception):
    """The traceback text of failed child processes (attached as ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class ChildError(AssertionError):
    """A child failed with an exception that could not be sent back as itself."""


@dataclass
class Outcome:
    """What one rank did: ``ok`` and ``value`` (fn's return), or ``error`` / ``traceback``."""

    rank: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    traceback: str = ""
    exitcode: int | None = None
    killed: str = ""          # why the harness killed it ("" if it ended by itself)
    finished: float = float("nan")  # seconds after the start when it finished or failed
    log: str = ""             # the child's stdout + stderr

    def describe(self) -> str:
        if self.ok:
            return f"rank {self.rank}: ok"
        head = f"rank {self.rank}: " + (f"killed ({self.killed})" if self.killed
                                        else f"failed (exit code {self.exitcode})")
        return head + ("\n" + self.traceback.rstrip() if self.traceback else "")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context(start_method: str):
    ctx = torch.multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the server starts (the first run of the session); later calls are
        # harmless no-ops for the running server.
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(record, f)
    os.replace(tmp, path)


def _child(rank: int, nproc: int, port: int, fn: Callable, args: tuple, kwargs: dict,
           env: dict, cwd: str, out_dir: str, init: bool, pg_timeout: float, t0: float) -> None:
    out = Path(out_dir)
    log = open(out / f"{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)  # C-level output (gloo, OpenMP) too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.chdir(cwd)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist = torch.distributed
    code = 0
    try:
        if init:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=nproc,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        value = fn(*args, **kwargs)
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"the result of rank {rank} cannot be sent back: {exc}") from exc
        _write(out / f"{rank}.pkl", {"ok": True, "value": value, "t": time.time() - t0})
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
        code = 1
        tb = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(exc))
            sent: BaseException | None = exc
        except Exception:
            sent = None
        _write(out / f"{rank}.pkl", {"ok": False, "error": sent, "traceback": tb,
                                     "t": time.time() - t0})
        print(tb, flush=True)
    finally:
        # Leaving the group closes this rank's connections: on failure the peers' collectives
        # fail at once (as in agop.distributed.session) instead of waiting for pg_timeout.
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        log.flush()
    sys.exit(code)


def run_all(fn: Callable, nproc: int, args: Sequence = (), kwargs: dict | None = None, *,
            timeout: float = DEFAULT_TIMEOUT_S, pg_timeout: float = DEFAULT_TIMEOUT_S,
            grace: float = DEFAULT_GRACE_S, init: bool = True, env: dict | None = None,
            start_method: str = "forkserver", echo: bool = True) -> list[Outcome]:
    """Run ``fn(*args, **kwargs)`` on ranks 0 … nproc−1 and return every rank's Outcome.

    ``fn`` and its arguments must be picklable (a module-level function). Ranks still running
    ``timeout`` seconds after the start, or ``grace`` seconds after another rank failed, are
    killed (``Outcome.killed`` says why). ``env``: extra environment variables for the
    children. ``echo``: print the children's logs (pytest shows them for a failed test).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be ≥ 1; got {nproc}")
    ctx = _context(start_method)
    port = free_port()
    child_env = dict(os.environ)
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    with tempfile.TemporaryDirectory(prefix="agop-multiproc-") as tmp:
        t0 = time.time()
        procs = [ctx.Process(target=_child, name=f"rank{r}",
                             args=(r, nproc, port, fn, tuple(args), dict(kwargs or {}),
                                   child_env, os.getcwd(), tmp, init, pg_timeout, t0))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        killed: dict[int, str] = {}
        first_failure = None
        while True:
            alive = [p for p in procs if p.exitcode is None]
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and first_failure is None:
                    first_failure = time.time()
            if not alive:
                break
            now = time.time()
            reason = ""
            if now - t0 > timeout:
                reason = f"still running at the {timeout:g} s timeout"
            elif first_failure is not None and now - first_failure > grace:
                reason = f"still running {grace:g} s after another rank failed"
            if reason:
                for p in alive:
                    killed[procs.index(p)] = reason
                    p.kill()
                for p in alive:
                    p.join(10)
                break
            wait([p.sentinel for p in alive], timeout=0.05)
        outcomes = []
        for r, p in enumerate(procs):
            p.join(1)
            logf = Path(tmp) / f"{r}.log"
            log = logf.read_text(errors="replace") if logf.exists() else ""
            res = Path(tmp) / f"{r}.pkl"
            if res.exists():
                with open(res, "rb") as f:
                    rec = pickle.load(f)  # written by our own child process, not user input
                outcomes.append(Outcome(r, rec["ok"], rec.get("value"), rec.get("error"),
                                        rec.get("traceback", ""), p.exitcode, killed.get(r, ""),
                                        rec["t"], log))
            else:
                why = killed.get(r) or f"exited with code {p.exitcode} and no result"
                outcomes.append(Outcome(r, False, None, None, "", p.exitcode, killed.get(r, ""),
                                        float("nan"), log))
                if not killed.get(r):
                    outcomes[-1].traceback = f"(rank {r} {why}; its log:)\n{log[-4000:]}"
        if echo:
            for o in outcomes:
                if o.log:
                    print("".join(f"[rank {o.rank}] {line}\n" for line in o.log.splitlines()))
        return outcomes


def run(fn: Callable, nproc: int, args: Sequence = (), kwargs: dict | None = None,
        **options) -> list[Any]:
    """``fn``'s return value on each rank, in rank order; see :func:`run_all` for options.

    A rank that raised: the earliest failure (by the time it happened) is re-raised as its own
    exception type, with every failed rank's traceback as ``__cause__``. A rank killed at the
    timeout: :class:`MultiprocTimeout`.
    """
    outcomes = run_all(fn, nproc, args, kwargs, **options)
    if all(o.ok for o in outcomes):
        return [o.value for o in outcomes]
    text = "\n\n".join(o.describe() for o in outcomes if not o.ok)
    if any(o.killed for o in outcomes):
        raise MultiprocTimeout(f"{nproc}-process run of {getattr(fn, '__name__', fn)}:\n{text}")
    failed = sorted((o for o in outcomes if not o.ok),
                    key=lambda o: (o.finished != o.finished, o.finished, o.rank))
    first = failed[0]
    if first.error is None:
        raise ChildError(f"{nproc}-process run of {getattr(fn, '__name__', fn)}:\n{text}")
    raise first.error.with_traceback(None) from RemoteTraceback(text)


# ----------------------------------------------------------------------------- torchrun
class TorchrunFailed(AssertionError):
    """torchrun exited with an error or ran past its timeout; the message holds its output."""

    def __init__(self, message: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.proc = proc


def torchrun_command(args: Sequence[str], nproc: int = 2, *, module: str | None = "agop",
                     script: str | os.PathLike | None = None) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node P -m agop ARGS``
    (``script=``: a Python file instead of ``-m module``)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc)]
    target = [str(script)] if script is not None else ["-m", str(module)]
    return head + target + [str(a) for a in args]


def run_torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 300.0, *,
                 module: str | None = "agop", script: str | os.PathLike | None = None,
                 env: dict | None = None, cwd: str | os.PathLike | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node nproc -m agop ARGS`` and wait.

    One thread per process (``OMP_NUM_THREADS=1``). Returns the CompletedProcess (text
    ``stdout``, ``stderr``: torchrun's and the workers'). Past ``timeout`` seconds the whole
    process group of the launch (torchrun and its workers) is killed and
    :class:`TorchrunFailed` raised; so is a nonzero exit when ``check``.
    """
    cmd = torchrun_command(args, nproc, module=module, script=script)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a launch from inside a worker must not inherit its place
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, err = popen.communicate()
        proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
        raise TorchrunFailed(f"timed out after {timeout:g} s: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-8000:]}",
                             proc) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and popen.returncode != 0:
        raise TorchrunFailed(f"exit code {popen.returncode}: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-8000:]}",
                             proc)
    return proc
