"""Kernels: values against direct formulas, exact diagonals, gradient weights vs autograd."""

from __future__ import annotations

import math

import pytest
import torch

from agop.kernels import (GaussianKernel, LaplaceKernel, class_groups, get_kernel,
                          pairwise_distances)


def _pts(n=30, d=9, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_distances_match_direct_loop():
    X, Z = _pts(12, 5, 0), _pts(8, 5, 1)
    direct = torch.tensor([[float((x - z).norm()) for z in Z] for x in X], dtype=torch.float64)
    assert torch.allclose(pairwise_distances(X, Z), direct, rtol=1e-12, atol=1e-12)


def test_self_distances_are_exactly_zero_in_float32_despite_large_norms():
    X = _pts(50, 64, scale=300.0).float()
    D = pairwise_distances(X)
    assert torch.all(D.diagonal() == 0)
    assert float(D.min()) >= 0.0  # clamped, never NaN from sqrt of a negative
    # chunk of the same matrix: self entries found by index
    Dc = pairwise_distances(X[10:20], X, diagonal_offset=10)
    assert torch.all(Dc[torch.arange(10), 10 + torch.arange(10)] == 0)


@pytest.mark.parametrize("L", [0.5, 2.0])
def test_laplace_values_and_unit_diagonal(L):
    X, Z = _pts(10, 4), _pts(6, 4, 1)
    k = LaplaceKernel(L)
    expected = torch.exp(-torch.cdist(X, Z) / L)
    assert torch.allclose(k(X, Z), expected, rtol=1e-12)
    Kxx = k(X.float())
    assert torch.all(Kxx.diagonal() == 1.0)
    assert torch.allclose(Kxx, Kxx.T, atol=1e-6)  # symmetric up to GEMM rounding


def test_gaussian_values():
    X, Z = _pts(10, 4), _pts(6, 4, 1)
    k = GaussianKernel(1.5)
    expected = torch.exp(-torch.cdist(X, Z) ** 2 / (2 * 1.5**2))
    assert torch.allclose(k(X, Z), expected, rtol=1e-12)


@pytest.mark.parametrize("kernel", [LaplaceKernel(2.0), GaussianKernel(0.8)], ids=repr)
def test_gradient_weights_match_autograd(kernel):
    x, z = _pts(1, 6, 3)[0], _pts(1, 6, 4)[0]
    grad = torch.func.grad(lambda v: kernel.from_distances(torch.sqrt(((v - z) ** 2).sum())))(x)
    d = (x - z).norm()
    w = kernel.gradient_weights(kernel.from_distances(d), d)
    assert torch.allclose(grad, -w * (x - z), rtol=1e-12)


def test_laplace_gradient_weight_is_zero_at_exact_zero_distance():
    k = LaplaceKernel(2.0)
    d = torch.tensor([0.0, 1.0], dtype=torch.float64)
    w = k.gradient_weights(k.from_distances(d), d)
    assert w[0] == 0 and math.isclose(float(w[1]), math.exp(-0.5) / 2.0)


def test_kernel_bad_input():
    with pytest.raises(ValueError, match="bandwidth"):
        LaplaceKernel(0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKernel(float("nan"))
    with pytest.raises(ValueError, match="same number of columns"):
        LaplaceKernel()(torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        LaplaceKernel()(torch.ones(3))
    with pytest.raises(ValueError, match="unknown kernel"):
        get_kernel("cosine")
    assert get_kernel("laplace", 3.0) == LaplaceKernel(3.0)


def _collapsed(K=4, per=25, D=16, spread=1e-4, seed=0):
    """Unit-norm class means with a tiny within-class spread (a late Deep RFM layer)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    means /= means.norm(dim=1, keepdim=True)
    y = torch.arange(K).repeat_interleave(per)
    X = means[y] + spread * torch.randn(K * per, D, generator=g, dtype=torch.float64)
    return X / X.norm(dim=1, keepdim=True), y


def test_grouped_distances_equal_plain_ones_in_float64():
    X, y = _collapsed(spread=1e-2)
    Z = _pts(7, 16, 5)
    groups = class_groups(y)
    assert torch.allclose(pairwise_distances(X, groups=groups), pairwise_distances(X),
                          rtol=1e-10, atol=1e-12)
    assert torch.allclose(pairwise_distances(Z, X, groups=groups), pairwise_distances(Z, X),
                          rtol=1e-10, atol=1e-12)


def test_grouped_distances_keep_float32_accuracy_after_collapse():
    X, y = _collapsed(spread=1e-4)
    exact = pairwise_distances(X)
    same = y[:, None] == y[None, :]
    same.fill_diagonal_(False)
    plain = pairwise_distances(X.float()).double()
    grouped = pairwise_distances(X.float(), groups=class_groups(y)).double()
    err_plain = float(((plain - exact).abs() / exact)[same].max())
    err_grouped = float(((grouped - exact).abs() / exact)[same].max())
    assert err_grouped < 1e-4  # float32 rounding of the within-class spread
    assert err_plain > 100 * err_grouped  # the cancellation the groups remove


def test_class_groups_partition_and_skip_empty_classes():
    y = torch.tensor([2, 0, 2, 2, 0])
    groups = class_groups(y, 4)
    assert [g.tolist() for g in groups] == [[1, 4], [0, 2, 3]]


def test_kernels_compare_and_hash_by_type_and_bandwidth():
    from agop.kernels import GaussianKernel, LaplaceKernel

    assert LaplaceKernel(2.0) == LaplaceKernel(2.0) and hash(LaplaceKernel(2.0)) == hash(
        LaplaceKernel(2.0))
    assert LaplaceKernel(2.0) != GaussianKernel(2.0)
    assert LaplaceKernel(2.0) != LaplaceKernel(3.0)
    assert hash(LaplaceKernel(2.0)) != hash(GaussianKernel(2.0))
    assert hash(LaplaceKernel(2.0)) != hash(LaplaceKernel(3.0))


def test_kernel_defaults_repr_and_argument_checks():
    assert LaplaceKernel().bandwidth == 2.0 and GaussianKernel().bandwidth == 2.0  # the paper's L
    assert get_kernel("laplace").bandwidth == 2.0
    k = LaplaceKernel(3.0)
    assert get_kernel(k) is k
    assert repr(LaplaceKernel(2.0)) == "LaplaceKernel(bandwidth=2)"
    with pytest.raises(ValueError, match="^bandwidth must"):
        LaplaceKernel(0.0)
    with pytest.raises(ValueError, match="^X must be a 2-D"):
        LaplaceKernel()(torch.ones(3))
    with pytest.raises(ValueError, match="^Z must be a 2-D"):
        LaplaceKernel()(torch.ones(3, 2), torch.ones(2))
    # finiteness is not checked here (callers validate once, upstream): NaN propagates
    X = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    assert bool(torch.isnan(LaplaceKernel()(X)[1, 0]))  # (the self term is 1 by index)
    assert bool(torch.isnan(LaplaceKernel()(X, X.clone())[1]).all())


def test_kernel_matrix_passes_the_groups_on(monkeypatch):
    import agop.kernels as kernels_module

    seen = []
    real = kernels_module.pairwise_distances

    def spy(*args, **kwargs):
        seen.append(kwargs.get("groups"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels_module, "pairwise_distances", spy)
    X, y = _collapsed(K=2, per=3, D=4)
    groups = class_groups(y)
    LaplaceKernel()(X, groups=groups)
    assert seen == [groups]


def test_squared_distances_are_the_squares():
    g = torch.Generator().manual_seed(4)
    X, Z = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                             dtype=torch.float64)
    d = pairwise_distances(X, Z)
    assert torch.allclose(pairwise_distances(X, Z, squared=True), d * d, rtol=1e-12)
    assert torch.allclose(d, torch.cdist(X, Z), rtol=1e-10)


def test_results_stay_on_the_inputs_device():
    # the meta device (shapes only) stands in for a GPU: nothing may be made on the CPU
    X = torch.empty(6, 3, device="meta")
    groups = [torch.arange(3, device="meta"), torch.arange(3, 6, device="meta")]
    assert pairwise_distances(X, groups=groups).device.type == "meta"
    assert pairwise_distances(X).device.type == "meta"


def test_zero_self_handles_chunks_past_the_diagonal():
    from agop.kernels import _zero_self

    m = torch.ones(3, 2)
    _zero_self(m, 1)  # rows 0..2 of a chunk starting at column 1: only (0, 1) is a self term
    assert m.tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    m = torch.ones(2, 3)
    _zero_self(m, 5)  # the chunk's self terms lie beyond its columns: nothing to do
    assert bool((m == 1).all())
