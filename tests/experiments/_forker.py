"""A fork server for tests that kill ``agop`` commands: ``agop`` in a fresh process in milliseconds.

Run as a script (``python _forker.py``) by :class:`Forker`. It imports the CLI and the
experiments once (seconds: torch, matplotlib, scikit-learn), then for each request line on
stdin (JSON: ``argv``, ``cwd``, ``log``) forks a child that runs ``agop.cli.main(argv)``
exactly as the ``agop`` command does, with its stdout and stderr in ``log``, and answers two
lines on stdout: ``{"pid": ...}`` when the child starts and ``{"pid", "rc", "signal"}`` when it
ends (``signal`` 9 for a SIGKILL). The server is single-threaded when it forks (nothing it
imports starts a thread), so a child is the ``agop`` process it would be if started afresh.

The test kills a child by its pid (:meth:`Forker.run`'s ``kill_after``): a real SIGKILL at a
chosen moment of the run, with no cleanup of any kind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def _child(request: dict) -> None:
    """Run one ``agop`` command in this (forked) process and exit with its status."""
    rc = 1
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.chdir(request["cwd"])
        from agop.cli import main

        rc = main(request["argv"])
    except BaseException:  # noqa: BLE001 - a traceback goes to the log, the status says it
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def _warm_matplotlib() -> None:
    """Draw one small figure, so that the fonts are loaded once here, not in every child."""
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2)
    for a in ax:
        a.semilogy([1, 2, 3], [1.0, 0.1, 0.01], "o-", label="x")
        a.set_title("warm-up")
        a.set_xlabel("layer")
        a.legend()
    fig.suptitle("warm-up")
    fig.savefig(io.BytesIO(), format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def serve() -> None:
    import torch

    import agop.cli  # noqa: F401 - imported once here, inherited by every child
    import agop.experiments.figures  # noqa: F401
    import agop.experiments.mlp  # noqa: F401
    import agop.experiments.rfm  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import sklearn.datasets  # noqa: F401

    torch.set_num_threads(1)
    _warm_matplotlib()
    out = sys.stdout
    out.write(json.dumps({"ready": True, "threads": len(os.listdir("/proc/self/task"))}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status, usage = os.wait4(pid, 0)
        out.write(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status),
                              "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                              "cpu": usage.ru_utime + usage.ru_stime}) + "\n")
        out.flush()


class Forker:
    """Starts the server (``python _forker.py``, environment ``env``) and runs commands on it."""

    def __init__(self, env: dict[str, str], timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        ready = self._line(timeout)
        if ready is None or not ready.get("ready"):
            self.close()
            raise RuntimeError(f"the fork server did not start: {ready}")
        self.threads = ready["threads"]

    def _line(self, timeout: float | None) -> dict | None:
        """The next JSON line from the server, or None if none came within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: str | os.PathLike, log: str | os.PathLike,
            kill_after: float | None = None, timeout: float = 300.0) -> dict:
        """Run ``agop argv``; with ``kill_after``, SIGKILL it that many seconds after it
        started if it is still running. Returns ``{"rc", "signal", "killed", "seconds", "cpu",
        "started"}``: wall and CPU seconds of the child, and its start (``time.time()``)."""
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "log": str(log)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._line(60.0)["pid"]
        started, clock = time.monotonic(), time.time()
        end = self._line(timeout if kill_after is None else kill_after)
        if end is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended at this very moment
                pass
            if kill_after is None:
                raise TimeoutError(f"agop {' '.join(request['argv'])} ran past {timeout} s")
            end = self._line(60.0)
        return {"rc": end["rc"], "signal": end["signal"], "cpu": end["cpu"],
                "killed": end["signal"] == signal.SIGKILL, "seconds": time.monotonic() - started,
                "started": clock}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    serve()
