"""Data parallelism over ``torch.distributed``: the few places where partial sums meet.

Every algorithm in agop is written once, for a :class:`Comm`. A single process is the P = 1
case (:func:`local`): every collective is the identity, so one and several processes run the
very same code and differ only in the order of floating-point sums.

Launching
---------
One machine, P processes (gloo on CPUs; NCCL on GPUs, one GPU per process)::

    torchrun --standalone --nproc-per-node P -m agop rfm --dataset mnist --solver nystrom ...

(``torchrun`` is ``python -m torch.distributed.run``.) Several machines: run the same command
on each of the N machines, with ``R`` = 0 … N−1 on each and ``HOST:PORT`` a port on one of them
that every machine can reach::

    torchrun --nnodes N --node-rank R --nproc-per-node P \\
             --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m agop rfm ...

torchrun starts the P processes of a machine and gives each its place in the environment:
``RANK`` (0 … world−1 over all machines), ``WORLD_SIZE``, ``LOCAL_RANK`` (0 … P−1 on this
machine; a CUDA run uses ``cuda:LOCAL_RANK``), ``LOCAL_WORLD_SIZE``, and ``MASTER_ADDR`` /
``MASTER_PORT`` (where the ranks meet). :func:`session` reads them (:func:`init_from_env`);
without them (plain ``agop rfm``, or Python) it is the single process of :func:`local`. On
machines with several network interfaces, ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` name
the one the ranks should talk over.

What the ranks do: every rank reads only its rows of the data (:func:`row_range`, in
contiguous ranges in rank order) and the settings, which must agree (:meth:`Comm.agree`);
rank 0 (:attr:`Comm.is_root`) alone writes the run folder and prints progress; the others
compute and take part in the collectives.

Failures
--------
Collectives are called by every rank in the same order (the usual SPMD rule). When a rank
raises inside :func:`session`, it prints a one-line note on stderr and leaves the process
group at once; with gloo, the other ranks' pending or next collective then fails within
milliseconds ("Connection closed by peer"), their sessions end the same way, and every
process exits with an error rather than hanging. Under torchrun the launcher also terminates
the other processes of the run as soon as one exits with an error, and its summary names the
first failure ("root cause"). Whatever a peer cannot see (a rank that hangs without raising,
a machine that vanishes, NCCL, where a peer stuck in a GPU collective does not notice a
departure) ends at the process group's timeout (``timeout_s``, default 600 s): the waiting
collectives raise ``RuntimeError`` and NCCL's watchdog aborts the communicator.

Determinism
-----------
gloo's ``all_reduce`` gives every rank bit-identical results, and the same result from run to
run for a given world size and tensor size (the reduction order is fixed by the algorithm,
which sums chunk by chunk around the ring and then copies each chunk to every rank); it is not
the rank-order sum, and it changes with the world size. ``all_reduce_sum(t, ordered=True)``
instead gathers every rank's tensor and adds them in rank order in float64 on every rank:
identical on every rank by construction, for any backend, and independent of how the backend
reduces (at world × the memory of ``t``: meant for D × D and M × K blocks, not for N-sized
arrays).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any, Iterator

import numpy as np
import torch

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Comm",
    "check_world_size",
    "current",
    "init_from_env",
    "launched_by_torchrun",
    "local",
    "row_range",
    "session",
    "shutdown",
]

DEFAULT_TIMEOUT_S = 600.0


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value}")
    return int(value)


def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world`` owns (contiguous, sizes
    differing by at most one, lower ranks first; the ranges of ranks 0 … world−1 cover
    0 … n−1 exactly once, in order). A rank's range is empty when world > n: see
    :func:`check_world_size`."""
    n = _check_count(n, "n", 0)
    world = _check_count(world, "world", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}; got rank {rank!r} of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_world_size(n: int, world: int, what: str = "points") -> None:
    """Raise ``ValueError`` unless each of ``world`` ranks can own at least one of ``n`` rows.

    Depends on ``n`` and ``world`` only, so every rank reaches the same verdict without
    communicating: call it before any work.
    """
    n = _check_count(n, f"the number of {what}", 0)
    world = _check_count(world, "world", 1)
    if world > n:
        raise ValueError(f"{world} processes but only {n} {what}: each process needs at least "
                         f"one of them; run at most {n} processes (torchrun --nproc-per-node / "
                         f"--nnodes)")


def _same(a: Any, b: Any) -> bool:
    """Equality that also works for arrays and tensors (all elements, shape and dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    try:
        eq = a == b
        return bool(eq) if not hasattr(eq, "all") else bool(
            getattr(a, "shape", None) == getattr(b, "shape", None) and eq.all())
    except (TypeError, ValueError):
        return repr(a) == repr(b)


def _first_difference(a: Any, b: Any, what: str) -> tuple[str, Any, Any]:
    """(name, a's part, b's part) for the first key where two dicts differ, else the whole."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            missing = "<missing>"
            va, vb = a.get(key, missing), b.get(key, missing)
            if (key in a) != (key in b) or not _same(va, vb):
                return f"{what}[{key!r}]", va, vb
    return what, a, b


class Comm:
    """A process group as the algorithms see it: rank, world size and a few collectives.

    ``group``: a ``torch.distributed`` process group, or None for the default group when
    ``torch.distributed`` is initialized. ``device``: the device this rank computes on (set by
    :func:`session` / :func:`init_from_env`: ``cuda:LOCAL_RANK`` for a CUDA run), else None.
    Construct through :func:`session`, :func:`current` or :func:`local`.
    """

    def __init__(self, group: Any = None, *, enabled: bool = True,
                 device: torch.device | None = None):
        self.group = group
        self.device = device
        dist = torch.distributed
        self.enabled = enabled and dist.is_available() and dist.is_initialized()
        if self.enabled:
            self.rank = torch.distributed.get_rank(group)
            self.world = torch.distributed.get_world_size(group)
            self.backend = torch.distributed.get_backend(group)
        else:
            self.rank, self.world, self.backend = 0, 1, None

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world={self.world}, backend={self.backend!r})"

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that writes files and prints."""
        return self.rank == 0

    def row_range(self, n: int, what: str = "points") -> tuple[int, int]:
        """This rank's rows ``[start, stop)`` of ``n`` (:func:`row_range`), after
        :func:`check_world_size` (a world larger than ``n`` raises ValueError on every rank)."""
        check_world_size(n, self.world, what)
        return row_range(n, self.rank, self.world)

    def _device(self, t: torch.Tensor) -> torch.device:
        # The backend's device: gloo reduces CPU tensors, NCCL this rank's current GPU.
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor, *, ordered: bool = False) -> torch.Tensor:
        """Σ over ranks of ``t`` (same shape and dtype on every rank), on t's device.

        ``ordered=False``: the backend's all_reduce (gloo: bit-identical on every rank, fixed
        order for a given world size; see the module notes). ``ordered=True``: the rank-order
        sum ``((t₀ + t₁) + t₂) …`` accumulated in float64 (int64 for integer tensors) and cast
        back to t's dtype, computed identically on every rank whatever the backend; it costs an
        all_gather (world × t in memory). World size 1: ``t`` itself.
        """
        if self.world == 1:
            return t
        if ordered:
            parts = self.all_gather(t)
            acc_dtype = (torch.float64 if t.is_floating_point()
                         else torch.complex128 if t.is_complex() else torch.int64)
            acc = parts[0].to(acc_dtype, copy=True)
            for p in parts[1:]:
                acc += p.to(acc_dtype)
            return acc.to(t.dtype)
        buf = t.detach().to(self._device(t)).clone()
        torch.distributed.all_reduce(buf, group=self.group)
        return buf.to(t.device)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order, on t's device."""
        if self.world == 1:
            return [t]
        src = t.detach().to(self._device(t)).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world)]
        torch.distributed.all_gather(out, src, group=self.group)
        return [o.to(t.device) for o in out]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (``t`` gives shape and dtype on the others)."""
        if self.world == 1:
            return t
        buf = t.detach().to(self._device(t)).contiguous().clone()
        torch.distributed.broadcast(buf, src=src, group=self.group)
        return buf.to(t.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (small objects: settings, names).

        Only objects this process group's own ranks created travel this way; nothing read from
        a user's file is unpickled here.
        """
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, value: Any, what: str) -> None:
        """Raise ``ValueError`` on every rank unless all ranks hold the same ``value``.

        For settings and sizes, before any work (a collective: every rank must call it). The
        message names the first rank that differs from rank 0 and, for dicts, the first key:
        ``ranks disagree on settings['seed']: rank 0 has 0, rank 2 has 1``. Values are
        compared with ``==`` (arrays and tensors element-wise, with shape and dtype).
        """
        if self.world == 1:
            return
        values = self.all_gather_object(value)
        differ = [r for r, v in enumerate(values) if not _same(v, values[0])]
        if differ:
            name, a, b = _first_difference(values[0], values[differ[0]], what)
            raise ValueError(f"ranks disagree on {name}: rank 0 has {a!r}, rank {differ[0]} "
                             f"has {b!r}")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.group)


def local() -> Comm:
    """The single-process group (world size 1): every collective is the identity."""
    return Comm(enabled=False)


def current() -> Comm:
    """The default process group if ``torch.distributed`` is initialized, else :func:`local`."""
    return Comm()


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` is set (``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun "
                             "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from None


def _resolve(device: str | torch.device) -> torch.device:
    from agop.backend import resolve_device

    return resolve_device(device)


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
                  *, backend: str | None = None) -> Comm:
    """Join the process group that ``torchrun`` describes in the environment, once.

    ``device``: "cpu", "cuda" or "auto" (under torchrun a CUDA index is replaced by
    ``LOCAL_RANK``). gloo for a CPU device, NCCL for CUDA (``backend`` overrides); on CUDA the
    rank binds ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) before joining. ``timeout_s``
    bounds the rendezvous and every collective, so a rank that dies or hangs ends the others
    with an error instead of a hang. Returns a :class:`Comm` whose ``device`` is the device to compute
    on; :func:`local` (with ``device``) when not launched by torchrun. If the default group
    already exists (made by the caller), it is used as it is and stays the caller's.

    Bad environment values, a ``LOCAL_RANK`` without a GPU to match, or ``MASTER_ADDR`` /
    ``MASTER_PORT`` missing raise ``ValueError`` before any connection is attempted.
    """
    dev = _resolve(device)
    try:
        timeout = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"timeout_s must be a number of seconds > 0; got {timeout_s!r}") from None
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0; got {timeout_s!r}")
    if not launched_by_torchrun():
        comm = local()
        comm.device = dev
        return comm

    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 ≤ RANK < WORLD_SIZE")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be ≥ 0; got {local_rank}")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} visible "
                             f"CUDA device(s): run at most {count} processes per machine "
                             "(--nproc-per-node), one per GPU")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)

    if torch.distributed.is_initialized():
        comm = current()
        comm.device = dev
        return comm
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set; launch with torchrun, "
                             "which sets it")
    name = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"device_id": dev} if name == "nccl" else {}
    torch.distributed.init_process_group(
        name, init_method="env://", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout), **kwargs)
    comm = current()
    comm.device = dev
    return comm


def shutdown() -> None:
    """Leave and destroy the default process group, if there is one (else nothing).

    Purely local: it does not wait for the other ranks. Any rank still waiting in a collective
    with this one fails at once with gloo (the connections close), at the timeout with NCCL.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device = "cpu",
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Comm]:
    """One distributed run: ``with session(device, timeout_s) as comm: ...``.

    Joins the group that torchrun describes (:func:`init_from_env`) and destroys it at the end;
    without torchrun, ``comm`` is :func:`local` and nothing happens. A group the caller made
    before is used and left in place. If the block raises on a rank, that rank writes
    ``agop: rank r of P failed: <error>; leaving the process group`` on stderr and leaves the
    group before the exception propagates, so the other ranks fail at their pending or next
    collective instead of waiting for the timeout (gloo; with NCCL, torchrun or the timeout
    ends them: see the module notes).
    """
    existed = torch.distributed.is_available() and torch.distributed.is_initialized()
    comm = init_from_env(device, timeout_s)
    owned = comm.enabled and not existed
    try:
        yield comm
    except BaseException as exc:
        if owned:
            text = str(exc).splitlines()[0] if str(exc) else ""
            print(f"agop: rank {comm.rank} of {comm.world} failed: {type(exc).__name__}"
                  f"{': ' + text if text else ''}; leaving the process group",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                shutdown()
        raise
    else:
        if owned:
            shutdown()
