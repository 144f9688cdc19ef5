"""psd_power and the blocked symmetric product."""

from __future__ import annotations

import pytest
import torch

from agop.linalg import gram_lower_blocks, psd_power


def _psd(D=20, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, rank or D, generator=g, dtype=torch.float64)
    return A @ A.T


def test_square_root_squared_gives_back_psd_matrix():
    M = _psd()
    R = psd_power(M, 0.5)
    assert torch.allclose(R @ R, M, rtol=1e-10, atol=1e-10)
    assert torch.equal(R, R.T) or torch.allclose(R, R.T, atol=1e-13)
    assert float(torch.linalg.eigvalsh(R).min()) >= -1e-10


def test_negative_eigenvalues_are_clamped():
    M = _psd(10, rank=4)
    evals, evecs = torch.linalg.eigh(M)
    noisy = M - 1e-3 * evecs[:, :1] @ evecs[:, :1].T  # one eigenvalue pushed to −1e-3
    R = psd_power(noisy, 0.5)
    assert torch.allclose(R @ R, M, atol=1e-9)  # the negative direction is gone
    assert not torch.isnan(R).any()


def test_float32_input_gives_float64_and_powers_compose():
    M = _psd(12, seed=3)
    assert psd_power(M.float(), 1.0).dtype == torch.float64
    assert torch.allclose(psd_power(M, 1.0), M, rtol=1e-10)
    assert torch.allclose(psd_power(M, 0.25) @ psd_power(M, 0.75), M, rtol=1e-9, atol=1e-9)
    assert torch.allclose(psd_power(M, -1.0) @ M, torch.eye(12, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(psd_power(M, 0.0), torch.eye(12, dtype=torch.float64))


def test_negative_power_is_a_pseudo_inverse_on_low_rank():
    M = _psd(10, rank=3)
    P = psd_power(M, -1.0)
    assert torch.allclose(M @ P @ M, M, atol=1e-8)


def test_psd_power_bad_input():
    with pytest.raises(ValueError, match="square"):
        psd_power(torch.ones(2, 3), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        psd_power(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.5)


@pytest.mark.parametrize("blocks", [1, 2, 3, 7, 40])
def test_gram_lower_blocks_equals_full_product(blocks):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 11, generator=g, dtype=torch.float64)
    assert torch.allclose(gram_lower_blocks(W, blocks), W @ W.T, rtol=1e-13, atol=1e-13)


def test_powers_of_a_singular_matrix():
    M = torch.diag(torch.tensor([4.0, 1e-20, 0.0], dtype=torch.float64))
    # p > 0 keeps every eigenvalue (no cut-off); p = 0 is the identity; p < 0 a pseudo-inverse
    assert torch.allclose(psd_power(M, 0.5).diagonal(),
                          torch.tensor([2.0, 1e-10, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(psd_power(M, 0.0), torch.eye(3, dtype=torch.float64))
    assert torch.allclose(psd_power(M, -1.0).diagonal(),
                          torch.tensor([0.25, 0.0, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="^M contains"):
        psd_power(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 0.5)


def test_gram_lower_blocks_with_no_block_count():
    W = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    assert torch.equal(gram_lower_blocks(W, 0), W @ W.T)  # at least one block


# ----------------------------------------------------------------------------- M^{1/2} in float32
def test_float32_square_root_is_within_its_bound_and_symmetric(monkeypatch):
    import agop.linalg
    from agop.linalg import psd_sqrt, sqrt_float32_bound

    # the float32 route is for D ≥ 1024 (SQRT_FLOAT32_MIN_DIM); below, always float64
    M0 = _psd(300)
    assert psd_sqrt(M0, allow_float32=True, info=(info0 := {})) is not None
    assert info0 == {"sqrt_precision": "float64", "sqrt_bound": float("inf")}
    monkeypatch.setattr(agop.linalg, "SQRT_FLOAT32_MIN_DIM", 1)  # a small D runs it here

    g = torch.Generator().manual_seed(4)
    A = torch.randn(300, 400, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 400,
                                                                                dtype=torch.float64)
    M = A @ A.T  # eigenvalues spread over ~8 decades, as an AGOP's are
    info = {}
    S = psd_sqrt(M, allow_float32=True, info=info)
    ref = psd_power(M, 0.5)
    err = float((S - ref).norm() / ref.norm())
    bound = sqrt_float32_bound(M)
    # the bound, written out: √(D ε₃₂ ‖M‖₂ / tr M), ‖M‖₂ estimated within a factor 1.1 above
    top = float(torch.linalg.eigvalsh(M)[-1])
    lo = (300 * 2.0**-23 * top / float(M.trace())) ** 0.5
    assert lo <= bound <= 1.1**0.5 * lo * (1 + 1e-9)
    assert info == {"sqrt_precision": "float32", "sqrt_bound": bound}
    assert 1e-9 < err <= bound  # a float32 decomposition, inside its a-priori bound
    assert S.dtype == torch.float64 and torch.equal(S, S.T)
    assert psd_sqrt(M).dtype == torch.float64 and torch.equal(psd_sqrt(M), ref)  # default: float64


def test_float32_square_root_falls_back_when_its_bound_is_too_large(monkeypatch):
    import agop.linalg
    from agop.linalg import SQRT_FLOAT32_BOUND, psd_sqrt, sqrt_float32_bound

    monkeypatch.setattr(agop.linalg, "SQRT_FLOAT32_MIN_DIM", 1)  # the bound alone decides

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(900, 900, generator=g, dtype=torch.float64))[0]
    lam = torch.full((900,), 1e-9, dtype=torch.float64)
    lam[0] = 1.0  # one direction carries the trace: the small ones' float32 error dominates
    M = (Q * lam) @ Q.T
    assert sqrt_float32_bound(M) > SQRT_FLOAT32_BOUND
    info = {}
    S = psd_sqrt(M, allow_float32=True, info=info)
    assert info["sqrt_precision"] == "float64" and torch.equal(S, psd_power(M, 0.5))
    # a zero (or non-positive) trace has no bound
    assert sqrt_float32_bound(torch.zeros(3, 3)) == float("inf")


@pytest.mark.parametrize("N, k, dtype", [(1, 3, torch.float64), (37, 11, torch.float64),
                                         (600, 40, torch.float32), (5, 8, torch.float32)])
def test_symmetric_product_is_alpha_w_wt_exactly_symmetric(N, k, dtype):
    from agop.linalg import symmetric_product

    g = torch.Generator().manual_seed(N)
    W = torch.randn(N, k, generator=g, dtype=torch.float64)
    S = symmetric_product(W.to(dtype), alpha=-2.0)
    assert S.dtype == dtype and S.shape == (N, N) and torch.equal(S, S.T)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(S.double(), -2.0 * W @ W.T, rtol=tol, atol=tol * k)


def test_symmetric_product_without_blas_takes_the_block_route():
    from agop.linalg import symmetric_product

    # bfloat16 has no BLAS syrk in SciPy: the GEMM-block route (as on a GPU), scaled by α
    W = torch.arange(12.0).reshape(4, 3)
    S = symmetric_product(W.to(torch.bfloat16), alpha=0.5)
    assert S.dtype == torch.bfloat16 and torch.equal(S.float(), 0.5 * W @ W.T)
