"""Devices, dtypes and memory planning."""

from __future__ import annotations

import pytest
import torch

from agop import backend


def test_resolve_device():
    assert backend.resolve_device("cpu") == torch.device("cpu")
    auto = backend.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        backend.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            backend.resolve_device("cuda")


def test_dtypes():
    assert backend.default_dtype() == torch.float32  # the policy: one dtype on every device
    assert backend.parse_dtype("auto") == backend.parse_dtype(None) == torch.float32
    assert backend.parse_dtype("float64") == backend.parse_dtype(torch.float64) == torch.float64
    assert backend.dtype_name(torch.float64) == "float64"
    with pytest.raises(ValueError, match="dtype"):
        backend.parse_dtype("float16")
    with pytest.raises(ValueError, match="dtype"):
        backend.parse_dtype(torch.float16)
    assert backend.float64_slowdown("cpu") == 2.0


def _precision():
    m = torch.backends.cuda.matmul
    return m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32


def test_fp32_matmul_sets_and_restores_the_precision():
    before = _precision()
    with backend.fp32_matmul("tf32"):
        inside_tf32 = _precision()
        with backend.strict_fp32():
            assert _precision() in ("ieee", False)
        assert _precision() == inside_tf32
    assert inside_tf32 in ("tf32", True)
    assert _precision() == before
    with pytest.raises(ValueError, match="ieee"):
        with backend.fp32_matmul("fast"):
            pass


def test_plan_rows_fits_the_budget_and_says_what_it_needs(monkeypatch):
    monkeypatch.setenv("AGOP_MEMORY_GB", "1")  # a 1 GiB cap on the budget
    budget = backend.memory_budget("cpu")
    assert budget <= 1024**3
    rows = backend.plan_rows(1024, 10**9, "cpu")
    assert rows * 1024 <= budget and rows >= budget // 1024 - 1
    assert backend.plan_rows(1024, 10, "cpu") == 10  # never more rows than there are
    with pytest.raises(MemoryError, match="need at least"):
        backend.plan_rows(2 * 1024**3, 10, "cpu")
    assert backend.format_bytes(1536) == "1.5 KiB"


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1e-400"])
def test_a_bad_memory_cap_is_named(monkeypatch, value):
    """AGOP_MEMORY_GB=abc|0|-1 (and NaN, inf, a number that rounds to 0) is refused in one line
    that names the variable and the value, not a float() error or a 1-byte budget."""
    monkeypatch.setenv("AGOP_MEMORY_GB", value)
    with pytest.raises(ValueError, match=f"AGOP_MEMORY_GB must be a number of GiB greater "
                                         f"than 0.*got '{value}'"):
        backend.memory_budget("cpu")


def test_an_empty_memory_cap_is_no_cap(monkeypatch):
    monkeypatch.delenv("AGOP_MEMORY_GB", raising=False)
    free = backend.memory_budget("cpu", fraction=1.0)
    monkeypatch.setenv("AGOP_MEMORY_GB", " ")
    assert backend.memory_cap() is None
    assert backend.memory_budget("cpu", fraction=1.0) == pytest.approx(free, rel=0.2)
    monkeypatch.setenv("AGOP_MEMORY_GB", "0.5")
    assert backend.memory_cap() == 512 * 1024**2
