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



def test_fitted_values_are_k_times_coef_when_a_jitter_was_added():
    # Duplicate points make K singular; −δI (rounding upstream can leave K a little indefinite)
    # makes the Cholesky fail until the jitter exceeds δ, so the jitter is large enough to see.
    # fitted() must give K α for K itself, not (K + jitter·I) α ≈ Y: a solve that could not
    # interpolate must not report near-perfect fitted values (Deep RFM's train_acc).
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:5]])
    K = LaplaceKernel(2.0)(X) - 1e-10 * torch.eye(25, dtype=torch.float64)
    Y = torch.randn(25, 2, generator=g, dtype=torch.float64)
    res = kernel_ridge(K, Y)
    assert res.jitter > 1e-10 and res.dtype == "float64"  # the jitter path, well above δ
    direct = K @ res.coef
    assert float((res.fitted() - direct).norm() / direct.norm()) < 1e-5
    assert float((res.fitted() - Y).norm() / Y.norm()) > 0.1  # K α is far from Y here
    # the same with a ridge: the factor is of K + (μ + jitter)I, fitted() is still K α
    ridged = kernel_ridge(K, Y, ridge=1e-12)
    assert ridged.jitter > 0.0
    direct = K @ ridged.coef
    assert float((ridged.fitted() - direct).norm() / direct.norm()) < 1e-5

def test_float32_failure_falls_back_to_float64_before_jitter():
    # [[F20, F21], [F21, F22]] (Fibonacci numbers, exact in float32) has determinant 1: it is
    # positive definite, but its condition number (≈ 5e8) defeats a float32 Cholesky.
    K = torch.tensor([[10946.0, 17711.0], [17711.0, 28657.0]], dtype=torch.float32)
    assert int(torch.linalg.cholesky_ex(K)[1]) != 0  # precondition: float32 fails
    Y = torch.tensor([[1.0], [2.0]])
    res = kernel_ridge(K, Y)
    assert res.dtype == "float64" and res.jitter == 0.0
    # α is kept in float64: rounded to float32 it would leave a residual of κ·1e-7 ≈ 50
    assert res.coef.dtype == torch.float64 and res.residual < 1e-6
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


def test_jitter_schedule_is_machine_epsilon_times_mean_diagonal_times_powers_of_ten():
    # eigenvalue −1e-12 below a diagonal of mean 1.5: the jitters ε·1.5·10^t are tried in order
    # and the first above 1e-12 (t = 4) is the one used and reported, exactly
    K = torch.diag(torch.tensor([2.0, 2.0, 2.0, -1e-12], dtype=torch.float64))
    Y = torch.ones(4, 1, dtype=torch.float64)
    res = kernel_ridge(K, Y)
    eps = torch.finfo(torch.float64).eps
    scale = float(K.diagonal().abs().mean())
    assert res.jitter == pytest.approx(eps * scale * 1e4, rel=1e-12)
    assert torch.allclose(res.coef[:, 0], 1.0 / (K.diagonal() + res.jitter), rtol=1e-9)
    # eight levels by default (t = 0..7): an eigenvalue of −1e-8 needs the ninth
    hard = torch.diag(torch.tensor([2.0, 2.0, 2.0, -1e-8], dtype=torch.float64))
    with pytest.raises(ValueError, match="far from positive definite"):
        kernel_ridge(hard, Y)
    assert kernel_ridge(hard, Y, max_tries=9).jitter == pytest.approx(eps * scale * 1e8,
                                                                      rel=1e-12)


def test_zero_matrix_gets_the_jitter_of_a_unit_scale():
    # mean(diag K) = 0 gives no scale: the jitters are then ε·10^t
    res = kernel_ridge(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))
    assert res.jitter == torch.finfo(torch.float64).eps
    assert torch.allclose(res.coef, torch.full((3, 2), 1.0 / res.jitter, dtype=torch.float64))


def test_non_finite_coefficients_move_on_to_the_next_try():
    # the factorization succeeds, but 1/1e-310 overflows: the next try (with a jitter) is used
    K = torch.diag(torch.tensor([1.0, 1e-310], dtype=torch.float64))
    res = kernel_ridge(K, torch.ones(2, 1, dtype=torch.float64))
    assert res.jitter > 0.0 and bool(torch.isfinite(res.coef).all())
    assert float(res.coef[1, 0]) == pytest.approx(1.0 / res.jitter, rel=1e-9)


def test_float32_without_fallback_stays_in_float32_and_fitted_keeps_the_dtypes():
    K = torch.tensor([[10946.0, 17711.0], [17711.0, 28657.0]], dtype=torch.float32)
    Y = torch.tensor([[1.0], [2.0]])
    res = kernel_ridge(K, Y, fallback_float64=False)
    assert res.dtype == "float32" and res.jitter > 0.0 and res.factor.dtype == torch.float32
    # with the fallback: factor and coef in float64 (rounding α to float32 would undo the
    # solve: κ ≈ 5e8); fitted() in the coef's dtype
    res = kernel_ridge(K, Y)
    assert res.factor.dtype == torch.float64 and res.fitted().dtype == torch.float64
    assert torch.allclose(res.fitted().double(), K.double() @ res.coef.double(), rtol=1e-3)


def test_ridge_error_names_the_ridge():
    with pytest.raises(ValueError, match="^ridge must be a finite number ≥ 0"):
        kernel_ridge(torch.eye(3), torch.ones(3, 1), ridge=-1.0)


def test_signed_one_hot_is_on_the_labels_device():
    from agop.solve import signed_one_hot

    # the meta device (shapes only) stands in for a GPU: a tensor made on the CPU would not mix
    T = signed_one_hot(torch.tensor([1, 0], device="meta"), 3)
    assert T.device.type == "meta" and T.shape == (2, 3)


# ----------------------------------------------------------------------------- residual check
def _conditioned(N=80, cond=1e5, seed=0, dtype=torch.float32):
    """A symmetric positive definite N × N matrix with eigenvalues from 1 down to 1/cond,
    exactly symmetric in ``dtype`` (the lower triangle mirrored)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), N, dtype=torch.float64)
    K = ((Q * lam) @ Q.T).to(dtype)
    K = torch.tril(K) + torch.tril(K, -1).T
    Y = torch.randn(N, 3, generator=g, dtype=torch.float64).to(dtype)
    return K, Y


def test_residual_is_against_the_matrix_factored_in_float64():
    K, Y = _problem()
    res = kernel_ridge(K, Y, ridge=0.3)
    want = float((Y - (K + 0.3 * torch.eye(len(K), dtype=K.dtype)) @ res.coef).norm() / Y.norm())
    assert res.residual == pytest.approx(want, rel=0.5, abs=1e-15)
    assert res.residual < 1e-12 and res.refinements == 0


def test_ill_conditioned_float32_solve_is_refined_to_the_float32_matrix_solution():
    # κ = 1e5: a float32 Cholesky solve is off by ~κ·ε₃₂ ≈ 1e-2 relative; two or three float64
    # residual corrections make α the solution of the float32 matrix itself
    K, Y = _conditioned(cond=1e5)
    plain = torch.cholesky_solve(Y, torch.linalg.cholesky(K)).double()
    exact = torch.linalg.solve(K.double(), Y.double())
    assert float((plain - exact).norm() / exact.norm()) > 1e-4  # what an unchecked solve gives
    res = kernel_ridge(K, Y)  # to the default tolerance, 1e-4
    assert res.dtype == "float32" and res.refinements >= 1 and res.residual <= 1e-4
    res = kernel_ridge(K, Y, tol=1e-10)  # to float64's accuracy on this matrix
    assert res.dtype == "float32" and res.jitter == 0.0 and 1 <= res.refinements <= 6
    assert res.coef.dtype == torch.float64 and res.residual <= 1e-10
    assert float((res.coef - exact).norm() / exact.norm()) < 1e-6
    # the reported residual is the true one, and fitted() is K α
    true = float((Y.double() - K.double() @ res.coef).norm() / Y.double().norm())
    assert res.residual == pytest.approx(true, rel=1e-6, abs=1e-12)
    assert torch.allclose(res.fitted(), K.double() @ res.coef, atol=1e-9)


def test_refinement_that_cannot_converge_moves_on_to_float64():
    # κ = 1e8 > 1/ε₃₂: the float32 factor exists but cannot be refined; the float64 attempt
    # solves the float32 matrix to its residual
    K, Y = _conditioned(N=60, cond=1e8, seed=0)
    assert int(torch.linalg.cholesky_ex(K)[1]) == 0  # precondition: float32 factors
    res = kernel_ridge(K, Y)
    assert res.dtype == "float64" and res.jitter == 0.0 and res.residual <= 1e-4
    exact = torch.linalg.solve(K.double(), Y.double())
    assert float((res.coef - exact).norm() / exact.norm()) < 1e-4


def test_a_solve_no_attempt_can_bring_to_the_tolerance_is_refused():
    # an asymmetry far above rounding: Cholesky factors the lower triangle without complaint,
    # but no α makes the whole matrix's residual small (κ·asymmetry ≫ 1), in any dtype
    K, Y = _conditioned(N=40, cond=1e6, seed=1, dtype=torch.float64)
    K[0, 1:] += 1e-3
    with pytest.raises(ValueError, match="cannot be solved to a relative residual of 0.0001"):
        kernel_ridge(K, Y)
    # what an unchecked Cholesky solve would have returned: a residual of order one
    a = torch.cholesky_solve(Y, torch.linalg.cholesky(K))
    assert float((Y - K @ a).norm() / Y.norm()) > 1e-2


def test_the_tolerance_is_a_parameter():
    K, Y = _conditioned(cond=1e5)
    loose = kernel_ridge(K, Y, tol=1.0)
    assert loose.refinements == 0 and loose.dtype == "float32" and loose.coef.dtype == torch.float32
    assert loose.residual > 1e-4
    with pytest.raises(ValueError, match="tol"):
        kernel_ridge(K, Y, tol=0.0)


def test_singular_system_with_targets_outside_its_range_takes_a_reported_jitter():
    # an exactly duplicated row with a different target: no α interpolates. The solve is of
    # K + jitter·I (residual ≤ tol against that matrix, the jitter reported), and its fitted
    # values K α show the compromise: both copies get the mean of their two targets
    K, Y = _problem(N=30, K=2)
    idx = torch.cat([torch.arange(30), torch.tensor([0])])
    K, Y = K[idx][:, idx], torch.cat([Y, Y[:1] + 1.0])
    res = kernel_ridge(K, Y)
    assert res.dtype == "float64" and res.jitter > 0.0 and res.residual <= 1e-4
    want = float((Y - (K + res.jitter * torch.eye(31, dtype=K.dtype)) @ res.coef).norm() / Y.norm())
    assert res.residual == pytest.approx(want, rel=0.01, abs=1e-12)
    F = res.fitted()
    assert torch.allclose(F[0], F[30], atol=1e-4)
    assert torch.allclose(F[0], 0.5 * (Y[0] + Y[30]), atol=1e-3)  # not the targets
