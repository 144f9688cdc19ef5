"""Devices, dtypes, precision policy and memory planning.

Precision policy (one place, enforced here and documented in the README):

- distances, kernel matrices and the Cholesky factorization run in the compute dtype
  (``default_dtype()``: float32 on both CPU and CUDA) with TF32 **off**
  (:func:`strict_fp32`), so "float32" means true IEEE fp32 on a GPU too;
- eigendecompositions (M^{1/2}) and every collapse metric run in float64;
- any fallback (a diagonal jitter, a float64 retry of a factorization) is reported in the
  result and in the run records, never applied silently.

Memory planning: chunk sizes are derived from the free memory of the device
(:func:`free_memory`), not hard-coded; :func:`plan_rows` turns a per-row byte cost into a
number of rows per chunk.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch

from agop.allocator import reusable_bytes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return a ``torch.device``; ``"auto"`` picks CUDA when one is available, else the CPU.

    Asking for ``"cuda"`` on a machine without a usable GPU raises ``ValueError`` instead of
    failing later inside a kernel.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but no CUDA device is available "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda'")
    return dev


def default_dtype() -> torch.dtype:
    """The compute dtype used for kernels, solves and AGOP products: float32 on every device.

    The policy does not depend on the device, so this takes none: float32 has twice the GEMM
    rate of float64 on a CPU and far more on GPUs without fast fp64 (:func:`float64_slowdown`),
    and the Deep RFM tests show that it gives the same per-layer NC1 as float64 to within 1%.
    Ask for float64 explicitly (``dtype="float64"``) where it is wanted.
    """
    return torch.float32


def float64_slowdown(device: torch.device | str) -> float:
    """How many times slower float64 matrix products are than float32 ones on ``device``.

    2 on a CPU (half the SIMD lanes). Data-centre GPUs of compute capability 8.0, 9.0 and
    10.0 (A100, H100/H200, B200) run float64 at half to full float32 speed (1.0 here: their
    fp64 tensor cores roughly match non-TF32 fp32); other GPUs at 1/32 or less. Used only by
    cost models to choose between exact algorithms, never to change a result.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return 2.0
    major, minor = torch.cuda.get_device_capability(dev)
    return 1.0 if major >= 8 and minor == 0 else 32.0


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None``/``"auto"`` → :func:`default_dtype`; ``"float32"``/``"float64"`` → that dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64; got {dtype}")
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "double": torch.float64, "float": torch.float32}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'float64'; got {dtype!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (for config files)."""
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def fp32_matmul(mode: str = "ieee") -> Iterator[None]:
    """Float32 matmul/cuDNN precision inside the block: ``"ieee"`` (TF32 off) or ``"tf32"``.

    Uses ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (2.9 and later; mixing
    it with the legacy ``allow_tf32`` flags is an error there), else the legacy flags. The
    previous settings are restored on exit.
    """
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"mode must be 'ieee' or 'tf32'; got {mode!r}")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        old = (matmul.fp32_precision, cudnn.fp32_precision)
        matmul.fp32_precision = cudnn.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = old


def strict_fp32():
    """TF32 off inside the block (true IEEE float32 matmuls on a GPU): the precision policy."""
    return fp32_matmul("ieee")


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


def free_memory(device: torch.device | str) -> int:
    """Bytes that can be allocated on ``device`` now (CUDA: free + cached by torch's allocator;
    CPU: the system's available memory + what this process freed and kept in its heap,
    :func:`agop.allocator.reusable_bytes`)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    return _cpu_available_bytes() + reusable_bytes()


def memory_budget(device: torch.device | str, fraction: float = 0.5) -> int:
    """A working-memory budget in bytes: ``fraction`` of what is free on ``device`` now.

    ``AGOP_MEMORY_GB`` in the environment caps the budget (useful on shared machines): a
    positive number of GiB (unset or empty: no cap); anything else raises ValueError naming
    the variable.
    """
    budget = int(free_memory(device) * fraction)
    cap = memory_cap()
    if cap is not None:
        budget = min(budget, cap)
    return max(budget, 1)


def memory_cap() -> int | None:
    """The cap ``AGOP_MEMORY_GB`` sets on :func:`memory_budget`, in bytes (None: unset or empty).

    Raises
    ------
    ValueError
        The variable is not a finite number of GiB greater than 0 (e.g. ``abc``, ``0``, ``-1``).
    """
    text = os.environ.get("AGOP_MEMORY_GB", "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"AGOP_MEMORY_GB must be a number of GiB greater than 0 (e.g. 8 or "
                         f"0.5), or unset for no cap; got {text!r}")
    return max(int(gib * 1024**3), 1)


def plan_rows(bytes_per_row: int, total_rows: int, device: torch.device | str,
              *, fixed_bytes: int = 0, fraction: float = 0.5, minimum: int = 1) -> int:
    """Rows per chunk so that ``fixed_bytes + rows * bytes_per_row`` fits the memory budget.

    Returns at most ``total_rows`` and at least ``minimum`` (a chunk of ``minimum`` rows that
    still does not fit raises ``MemoryError`` with the size it needs, before any work starts).
    """
    budget = memory_budget(device, fraction) - fixed_bytes
    rows = budget // max(int(bytes_per_row), 1)
    if rows < minimum:
        need = fixed_bytes + minimum * bytes_per_row
        raise MemoryError(
            f"not enough memory on {device}: need at least {format_bytes(need)} for a chunk of "
            f"{minimum} row(s), have a budget of {format_bytes(memory_budget(device, fraction))}"
        )
    return int(max(minimum, min(rows, total_rows)))


def format_bytes(n: float) -> str:
    """Human-readable byte count (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so that recorded seconds are real); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
