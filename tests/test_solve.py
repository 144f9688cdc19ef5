"""kernel_ridge: interpolation, ridge, the reported jitter/fallback path."""

from __future__ import annotations

import pytest
import torch

from agop.kernels import LaplaceKernel
from agop.solve import kernel_ridge


def _problem(N=60, D=8, K=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=dtype)
    X = X / X.norm(dim=1, keepdim=True)
    Y = torch.randn(N, K, generator=g, dtype=dtype)
    return LaplaceKernel(2.0)(X), Y


def test_ridgeless_interpolates_targets():
    K, Y = _problem()
    res = kernel_ridge(K, Y)
    assert res.jitter == 0.0 and res.dtype == "float64"
    assert torch.allclose(K @ res.coef, Y, atol=1e-9)
    assert torch.allclose(res.fitted(), Y, atol=1e-9)


def test_ridge_matches_direct_solve():
    K, Y = _problem()
    res = kernel_ridge(K, Y, ridge=0.3)
    direct = torch.linalg.solve(K + 0.3 * torch.eye(K.shape[0], dtype=K.dtype), Y)
    assert torch.allclose(res.coef, direct, rtol=1e-10, atol=1e-12)
    assert res.ridge == 0.3
    assert torch.allclose(res.fitted(), K @ res.coef, atol=1e-10)  # f(X) = Kα, not Y


def test_vector_targets():
    K, Y = _problem(K=1)
    assert kernel_ridge(K, Y[:, 0]).coef.shape == (K.shape[0],)


def test_singular_matrix_takes_the_jitter_path_and_reports_it():
    # duplicate points make the kernel matrix exactly singular
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:5]])
    K = LaplaceKernel(2.0)(X)
    Y = torch.randn(25, 2, generator=g, dtype=torch.float64)
    res = kernel_ridge(K, Y)
    assert res.jitter > 0.0
    shifted = K + res.jitter * torch.eye(25, dtype=K.dtype)
    assert torch.allclose(shifted @ res.coef, Y, atol=1e-6 * float(res.coef.abs().max()))


def test_float32_failure_falls_back_to_float64_before_jitter():
    # [[F20, F21], [F21, F22]] (Fibonacci numbers, exact in float32) has determinant 1: it is
    # positive definite, but its condition number (≈ 5e8) defeats a float32 Cholesky.
    K = torch.tensor([[10946.0, 17711.0], [17711.0, 28657.0]], dtype=torch.float32)
    assert int(torch.linalg.cholesky_ex(K)[1]) != 0  # precondition: float32 fails
    Y = torch.tensor([[1.0], [2.0]])
    res = kernel_ridge(K, Y)
    assert res.dtype == "float64" and res.jitter == 0.0
    assert res.coef.dtype == torch.float32
    exact = torch.linalg.solve(K.double(), Y.double())  # [[-6765], [4181]]: det K = 1
    assert torch.allclose(res.coef.double(), exact, rtol=1e-6)


def test_hopeless_matrix_raises_clear_error():
    K = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="far from positive definite"):
        kernel_ridge(K, torch.ones(4, 1))


@pytest.mark.parametrize(
    "K, Y, kw, match",
    [
        (torch.ones(3, 4), torch.ones(3, 1), {}, "square"),
        (torch.eye(3), torch.ones(4, 1), {}, "one row per row"),
        (torch.eye(3), torch.ones(3, 1), {"ridge": -1.0}, "ridge"),
        (torch.eye(3) * float("nan"), torch.ones(3, 1), {}, "Kmat contains NaN"),
        (torch.eye(3), torch.full((3, 1), float("inf")), {}, "Y contains NaN"),
    ],
)
def test_bad_input(K, Y, kw, match):
    with pytest.raises(ValueError, match=match):
        kernel_ridge(K, Y, **kw)


def test_signed_one_hot_targets():
    from agop.solve import signed_one_hot

    T = signed_one_hot(torch.tensor([2, 0, 1, 2]), 3)
    assert T.tolist() == [[-1, -1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    assert T.dtype == torch.float32 and signed_one_hot(torch.tensor([0]), 2, torch.float64).dtype == torch.float64
