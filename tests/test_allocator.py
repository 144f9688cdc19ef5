"""agop.allocator: freed memory kept in the process (glibc), and counted as available."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from agop import allocator, backend

GLIBC = allocator._glibc() is not None

# a 256 MB block and 64 MB blocks cut from it, as a layer's chunks are: print the page faults
# of the last 3 rounds, the bytes kept, and the resident bytes after release_freed_memory
_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from agop import allocator
    ok = allocator.retain_freed_memory() if sys.argv[1] == "retain" else False
    if sys.argv[1] == "block":  # kept inside the block, glibc's defaults after it
        with allocator.retained_memory() as ok:
            pass
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def resident():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    t = torch.ones(64 << 20); del t
    before = faults()
    for _ in range(3):
        chunks = [torch.ones(16 << 20) for _ in range(3)]
        del chunks
    kept, rss = allocator.reusable_bytes(), resident()
    allocator.release_freed_memory()
    print(ok, faults() - before, kept, rss - resident())
""")


def _faults(mode: str, env: dict | None = None) -> tuple[bool, int, int, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                         check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), int(out[3])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults_and_released_on_request():
    # 3 rounds × 3 × 64 MB = 147,456 pages of 4 KiB: each one faulted again with glibc's
    # defaults; kept, freed blocks serve some of them (not all: torch's aligned requests do not
    # always fit a hole of their own size, agop.allocator)
    ok, retained_faults, kept, released = _faults("retain")
    assert ok
    _, default_faults, _, _ = _faults("default")
    assert default_faults > 140_000
    assert retained_faults < 0.75 * default_faults
    assert kept >= 192 << 20  # the freed blocks stay in the heap, and are reported
    assert released >= 192 << 20  # ... until released


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_opt_out_keeps_the_defaults():
    ok, faults, _, _ = _faults("retain", {"AGOP_MALLOC": "default"})
    assert not ok and faults > 140_000


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_defaults_come_back_after_the_block():
    ok, faults, kept, _ = _faults("block")
    assert ok and faults > 140_000 and kept < 64 << 20


def test_kept_memory_counts_as_free(monkeypatch):
    monkeypatch.setattr(backend, "_cpu_available_bytes", lambda: 1000)
    monkeypatch.setattr(backend, "reusable_bytes", lambda: 234)
    assert backend.free_memory("cpu") == 1234


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.retain_freed_memory() is False
    assert allocator.reusable_bytes() == 0
