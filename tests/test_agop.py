"""kernel_agop and model_agop against autograd (torch.func) in float64."""

from __future__ import annotations

import pytest
import torch

from agop.agop import agop_cost, choose_method, kernel_agop, model_agop
from agop.kernels import GaussianKernel, LaplaceKernel

KERNELS = [LaplaceKernel(2.0), LaplaceKernel(0.7), GaussianKernel(1.3)]


def _data(N=40, D=7, K=3, n_new=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = C / C.norm(dim=1, keepdim=True)
    A = torch.randn(N, K, generator=g, dtype=torch.float64)
    P = torch.randn(n_new, D, generator=g, dtype=torch.float64)
    return C, A, P


def _kernel_fn(kernel, centers, coef):
    """f(x) = Σ_j coef_j k(x, c_j) written with plain torch ops (distance by sqrt of a sum)."""

    def f(x):  # x: (D,)
        d = torch.sqrt(((x[None, :] - centers) ** 2).sum(dim=1))
        return kernel.from_distances(d) @ coef

    return f


def _reference_agop(kernel, C, A, P=None):
    """(1/n) Σ_i J_iᵀ J_i by torch.func.jacrev, one point at a time; at the centers the
    term j = i is removed from the sum defining f before differentiating (self term dropped)."""
    total = torch.zeros(C.shape[1], C.shape[1], dtype=torch.float64)
    if P is None:
        for i in range(C.shape[0]):
            keep = torch.arange(C.shape[0]) != i
            J = torch.func.jacrev(_kernel_fn(kernel, C[keep], A[keep]))(C[i])  # (K, D)
            total += J.T @ J
        return total / C.shape[0]
    f = _kernel_fn(kernel, C, A)
    for x in P:
        J = torch.func.jacrev(f)(x)
        total += J.T @ J
    return total / P.shape[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_kernel_agop_matches_autograd_at_centers(kernel, method):
    C, A, _ = _data()
    M = kernel_agop(kernel, C, A, method=method)
    assert _rel(M, _reference_agop(kernel, C, A)) < 1e-8


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_kernel_agop_matches_autograd_at_new_points(kernel):
    C, A, P = _data()
    M = kernel_agop(kernel, C, A, points=P)
    assert _rel(M, _reference_agop(kernel, C, A, P)) < 1e-8


def test_self_term_is_dropped_by_index_even_when_computed_distance_is_not_zero():
    # Points whose self-distance would come out nonzero from ‖x‖² + ‖z‖² − 2xᵀz in float32:
    # the AGOP must equal the float64 one (computed with exact zero self-distances).
    C, A, _ = _data(N=60, D=30, K=2, seed=3)
    C = C * 37.0  # large norms make the cancellation noise large
    M64 = kernel_agop(LaplaceKernel(40.0), C, A)
    M32 = kernel_agop(LaplaceKernel(40.0), C.float(), A.float())
    assert _rel(M32.double(), M64) < 1e-4


def test_both_methods_and_chunking_agree():
    C, A, _ = _data(N=97, D=11, K=4, seed=1)
    k = LaplaceKernel(2.0)
    ref = kernel_agop(k, C, A, method="direct", chunk_rows=97)
    for method in ("direct", "gram"):
        for rows in (1, 7, 32, 97):
            M = kernel_agop(k, C, A, method=method, chunk_rows=rows)
            assert _rel(M, ref) < 1e-12, (method, rows)


def test_passing_centers_as_points_counts_as_same_points():
    C, A, _ = _data()
    k = LaplaceKernel()
    assert torch.equal(kernel_agop(k, C, A, points=C), kernel_agop(k, C, A))


def test_agop_is_symmetric_psd_and_scales_quadratically_in_coef():
    C, A, _ = _data()
    k = LaplaceKernel()
    M = kernel_agop(k, C, A)
    assert torch.equal(M, M.T)
    assert float(torch.linalg.eigvalsh(M).min()) > -1e-12 * float(M.norm())
    assert _rel(kernel_agop(k, C, 3.0 * A), 9.0 * M) < 1e-12


def test_single_output_coef_vector():
    C, A, _ = _data(K=1)
    k = GaussianKernel(1.0)
    assert torch.allclose(kernel_agop(k, C, A[:, 0]), kernel_agop(k, C, A))


def test_cost_model_prefers_gram_when_n_below_kd():
    # CIFAR's first layer (D = 3072, K = 10) at N = 5000: gram; MNIST at N = 50,000: direct.
    assert choose_method(5000, 5000, 10, 3072, True) == "gram"
    assert choose_method(50000, 50000, 10, 784, True) == "direct"
    assert choose_method(100, 100, 10, 3072, False) == "direct"
    assert agop_cost(10, 10, 2, 5, "gram") > 0
    with pytest.raises(ValueError, match="method"):
        agop_cost(1, 1, 1, 1, "other")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coef=torch.ones(5, 2)), "one row per center"),
        (dict(points=torch.ones(4, 3)), "D = 7"),
        (dict(method="fast"), "method"),
    ],
)
def test_kernel_agop_bad_input(kwargs, match):
    C, A, _ = _data()
    args = dict(coef=A)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernel_agop(LaplaceKernel(), C, **args)


def test_kernel_agop_rejects_nan_and_gram_with_new_points():
    C, A, P = _data()
    C2 = C.clone()
    C2[3, 1] = float("nan")
    with pytest.raises(ValueError, match="centers contains NaN"):
        kernel_agop(LaplaceKernel(), C2, A)
    with pytest.raises(ValueError, match="points = centers"):
        kernel_agop(LaplaceKernel(), C, A, points=P, method="gram")


# ----------------------------------------------------------------------------- model_agop
def test_model_agop_linear_model_is_exact():
    # f(x) = R x has Jacobian R everywhere: AGOP = RᵀR.
    g = torch.Generator().manual_seed(0)
    R = torch.randn(4, 6, generator=g, dtype=torch.float64)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    M = model_agop(lambda x: x @ R.T, X, batch_size=7)
    assert _rel(M, R.T @ R) < 1e-14


def test_model_agop_matches_per_sample_jacobian_loop_and_kernel_agop():
    C, A, P = _data()
    k = LaplaceKernel(2.0)
    f_single = _kernel_fn(k, C, A)
    fn = lambda x: torch.stack([f_single(xi) for xi in x])  # noqa: E731
    # a loop over per-sample jacobians through torch.autograd.functional (independent path)
    loop = sum(
        (lambda J: J.T @ J)(torch.autograd.functional.jacobian(f_single, x)) for x in P
    ) / P.shape[0]
    M = model_agop(fn, P, batch_size=4)
    assert _rel(M, loop) < 1e-12
    assert _rel(M, kernel_agop(k, C, A, points=P)) < 1e-10


def test_model_agop_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        model_agop(lambda x: x, torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="sample dimension"):
        model_agop(lambda x: x, torch.ones(3))


def test_groups_give_the_same_agop_in_float64():
    from agop.kernels import class_groups

    C, A, _ = _data(N=60, seed=4)
    y = torch.arange(60) % 3
    ref = kernel_agop(LaplaceKernel(), C, A, method="direct")
    for method in ("direct", "gram"):
        M = kernel_agop(LaplaceKernel(), C, A, method=method, groups=class_groups(y))
        assert _rel(M, ref) < 1e-12, method


def test_groups_must_partition_the_centers():
    C, A, _ = _data(N=10)
    with pytest.raises(ValueError, match="partition"):
        kernel_agop(LaplaceKernel(), C, A, groups=[torch.arange(5)])


def _collapsed_problem(spread, K=4, per=30, D=12, seed=0):
    """Late Deep RFM layers: classes collapsed to ``spread`` around unit-norm means; the
    float64 ridgeless coefficients and class groups."""
    from agop.kernels import class_groups
    from agop.solve import kernel_ridge

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    y = torch.arange(K).repeat_interleave(per)
    X = means[y] / means[y].norm(dim=1, keepdim=True)
    X = X + spread * torch.randn(K * per, D, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    Y = -torch.ones(K * per, K, dtype=torch.float64)
    Y[torch.arange(K * per), y] = 1
    coef = kernel_ridge(LaplaceKernel(2.0)(X), Y).coef
    return X, coef, class_groups(y)


@pytest.mark.parametrize("method", ["direct", "gram"])
def test_groups_keep_float32_agop_accurate_after_collapse(method):
    # Plain ‖x‖² + ‖z‖² − 2xᵀz distances, and gradients assembled from raw positions, lose
    # everything in float32 at a spread of 1e-4; per-class coordinates keep float32 rounding.
    X, coef, groups = _collapsed_problem(1e-4)
    k = LaplaceKernel(2.0)
    ref = kernel_agop(k, X, coef, groups=groups, method="direct")
    assert _rel(kernel_agop(k, X, coef, method="direct"), ref) < 1e-8  # float64 agrees
    grouped = kernel_agop(k, X.float(), coef.float(), groups=groups, method=method).double()
    assert _rel(grouped, ref) < 1e-3
    if method == "direct":
        plain = kernel_agop(k, X.float(), coef.float(), method=method).double()
        assert _rel(plain, ref) > 0.1  # what the per-class coordinates prevent


def test_gram_form_keeps_float32_only_when_its_error_estimate_allows():
    from agop.agop import GRAM_TOLERANCE, _gram_form, _weight_matrix

    k = LaplaceKernel(2.0)
    # spread data: the float32 gram form is accurate and kept
    C, A, _ = _data(N=80, D=9, seed=5)
    info = {}
    M = kernel_agop(k, C.float(), A.float(), method="gram", info=info)
    ref = kernel_agop(k, C.float().double(), A.float().double(), method="direct")
    assert info["precision"] == "float32" and info["error_estimate"] <= GRAM_TOLERANCE
    assert _rel(M.double(), ref) < 1e-5
    # collapsed data: float32 would be wrong (checked), so it is recomputed
    X, coef, groups = _collapsed_problem(1e-3)
    X32, A32 = X.float(), coef.float()
    ref = kernel_agop(k, X32.double(), A32.double(), groups=groups, method="direct")
    W = _weight_matrix(k, X32, groups, None)
    float32_only = _gram_form(W, X32, A32, None)[0].double() / X.shape[0]
    info = {}
    M = kernel_agop(k, X32, A32, groups=groups, method="gram", info=info).double()
    assert info["error_estimate"] > GRAM_TOLERANCE
    assert (info["method"], info["precision"]) != ("gram", "float32")
    assert _rel(float32_only, ref) > 1e-3  # the estimate was right to refuse it
    assert _rel(M, ref) < 1e-5


def test_gram_error_estimate_tracks_the_actual_error():
    from agop.agop import _gram_form, _weight_matrix

    k = LaplaceKernel(2.0)
    for spread in (1e-1, 1e-2, 1e-3):
        X, coef, groups = _collapsed_problem(spread, K=5, per=60, D=20, seed=1)
        X32, A32 = X.float(), coef.float()
        M32, est = _gram_form(_weight_matrix(k, X32, groups, None), X32, A32, None,
                              estimate=True)
        exact = _gram_form(_weight_matrix(k, X32.double(), groups, None), X32.double(),
                           A32.double(), None)[0]
        actual = float((M32.double() - exact).norm())
        if spread >= 1e-2:  # where the float32 result is usable, the estimate is close
            assert actual / 4 < est < 4 * actual, (spread, actual, est)
        else:  # hopeless float32: underestimated, but still far above any tolerance
            assert est / float(exact.norm()) > 1e-3 and actual > 0.1 * float(exact.norm())


def test_precomputed_distances_give_the_same_agop():
    from agop.kernels import pairwise_distances

    C, A, _ = _data(N=50, seed=7)
    k = LaplaceKernel(2.0)
    ref = kernel_agop(k, C, A, method="gram")
    assert _rel(kernel_agop(k, C, A, method="gram", distances=pairwise_distances(C)), ref) < 1e-13
    with pytest.raises(ValueError, match="N × N"):
        kernel_agop(k, C, A, distances=torch.zeros(3, 3))


def test_direct_form_sums_in_the_same_order_whatever_memory_is_free(monkeypatch):
    # resume must reproduce the bits of M: chunking may not follow the free memory
    g = torch.Generator().manual_seed(3)
    C = torch.randn(2600, 6, generator=g)
    C = C / C.norm(dim=1, keepdim=True)
    A = torch.randn(2600, 2, generator=g)
    results = []
    for gb in ("0.05", "4"):  # without the cap: chunks of about 1,700 and 2,600 rows
        monkeypatch.setenv("AGOP_MEMORY_GB", gb)
        results.append(kernel_agop(LaplaceKernel(), C, A, method="direct"))
    assert torch.equal(results[0], results[1])


def test_skipping_a_refused_float32_gram_try_gives_the_same_bits():
    X, coef, groups = _collapsed_problem(1e-3)
    X32, A32 = X.float(), coef.float()
    tried, skipped = {}, {}
    a = kernel_agop(LaplaceKernel(), X32, A32, groups=groups, method="gram", info=tried)
    b = kernel_agop(LaplaceKernel(), X32, A32, groups=groups, method="gram", info=skipped,
                    try_float32=False)
    assert tried["fallback"] and skipped["fallback"] and "error_estimate" not in skipped
    assert torch.equal(a, b)


@pytest.mark.parametrize("spread", [3e-2, 1e-2, 3e-3])
def test_float32_gram_agop_is_as_accurate_as_float64_on_collapsed_data(spread):
    # A fixed accuracy bound, not one derived from GRAM_TOLERANCE: across spreads where the
    # float32 gram form loses 1e-5 to 1e-2 of M (the cancellation grows like 1/spread²), the
    # AGOP kernel_agop returns for float32 inputs must stay within 1e-6 of the float64 AGOP of
    # the same (rounded) inputs, whichever way (gram, float64 redo, direct) it gets there.
    X, coef, groups = _collapsed_problem(spread)
    X32, A32 = X.float(), coef.float()
    k = LaplaceKernel(2.0)
    ref = kernel_agop(k, X32.double(), A32.double(), groups=groups, method="direct")
    for method in ("gram", "auto"):
        M = kernel_agop(k, X32, A32, groups=groups, method=method)
        assert M.dtype == torch.float32
        assert _rel(M.double(), ref) < 1e-6, (spread, method)


@pytest.mark.parametrize("method", ["direct", "gram"])
def test_self_term_is_dropped_where_it_would_dominate_the_agop(method):
    # With a bandwidth far below the spacing of the points (here L = 0.02, nearest neighbours
    # ≥ 0.38 apart) every true gradient carries a factor e^{−d/L} ≤ e^{−19}, while a self
    # term j = i evaluated at the rounding-noise self-distance of ‖x‖² + ‖z‖² − 2xᵀz (about
    # 1e-8) would weigh 1/(L·1e-8) and, through the cancellation of its (x_i − x_i), swamp
    # M by orders of magnitude. Dropped by index, M matches autograd to float64 rounding.
    from agop.kernels import pairwise_distances

    C, A, _ = _data()
    noisy = pairwise_distances(C, C.clone()).diagonal()  # Z not X: no self terms zeroed
    assert float(noisy.max()) > 0.0  # precondition: the formula leaves nonzero self-distances
    k = LaplaceKernel(0.02)
    ref = _reference_agop(k, C, A)
    assert _rel(kernel_agop(k, C, A, method=method), ref) < 1e-12


def test_model_agop_plans_its_batches_from_the_jacobian_size(monkeypatch):
    # without batch_size: 8·K·D·itemsize bytes per sample (the vmapped jacobian and its
    # float64 copy, with headroom), a quarter of the free memory; K from one forward pass
    import agop.agop as agop_module

    g = torch.Generator().manual_seed(2)
    R = torch.randn(3, 5, generator=g, dtype=torch.float64)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    fn = lambda x: torch.tanh(x) @ R.T  # noqa: E731
    calls = []

    def plan(bytes_per_row, total_rows, device, **kw):
        calls.append((bytes_per_row, total_rows, torch.device(device), kw))
        return 4

    monkeypatch.setattr(agop_module, "plan_rows", plan)
    M = model_agop(fn, X)
    assert calls == [(8 * 3 * 5 * 8, 11, torch.device("cpu"), {"fraction": 0.25})]
    assert _rel(M, model_agop(fn, X, batch_size=11)) < 1e-14
    model_agop(fn, X, batch_size=5)
    assert len(calls) == 1  # an explicit batch size is not replanned


def test_model_agop_single_sample_and_empty_input():
    R = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    M = model_agop(lambda x: x @ R.T, torch.ones(1, 3, dtype=torch.float64))
    assert torch.allclose(M, R.T @ R, rtol=1e-14)
    with pytest.raises(ValueError, match="sample dimension"):
        model_agop(lambda x: x, torch.ones(0, 3))


def test_cost_model_formulas_and_the_choice_they_make():
    from agop.agop import resolve_method

    n, N, K, D = 7, 11, 3, 5
    assert agop_cost(n, N, K, D, "direct") == 2 * n * N * (D + K + K * D) + 2 * n * K * D * D
    gram = N**3 + 4 * N * N * D + 8 * N * N * K + 2 * N * D * D
    assert agop_cost(n, N, K, D, "gram") == gram
    assert agop_cost(n, N, K, D, "gram", float64_slowdown=3.0) == 3 * gram
    # N = 100, K = D = 10: gram 2.22e6 against direct 2.6e6 FLOPs; a float64 redo at twice the
    # cost tips it; "auto" resolves to the cheaper one, for points = centers only
    assert choose_method(100, 100, 10, 10, True) == "gram"
    assert choose_method(100, 100, 10, 10, True, float64_slowdown=2.0) == "direct"
    assert resolve_method("auto", 100, 100, 10, 10, True) == "gram"
    assert resolve_method("auto", 100, 100, 10, 10, False) == "direct"
    assert resolve_method("direct", 100, 100, 10, 10, True) == "direct"


def test_info_reports_what_was_done_and_auto_picks_gram_for_wide_features():
    C, A, _ = _data(N=30, D=40, K=5, seed=8)  # N < K·D: the gram form is cheaper
    info = {}
    M = kernel_agop(LaplaceKernel(), C, A, info=info)
    assert info == {"method": "gram", "precision": "float64"}
    assert _rel(M, kernel_agop(LaplaceKernel(), C, A, method="direct")) < 1e-12
    info = {}
    kernel_agop(LaplaceKernel(), C, A, method="direct", info=info)
    assert info == {"method": "direct", "precision": "float64"}


def test_error_messages_name_the_input():
    C, A, P = _data()
    bad = A.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^coef contains NaN or inf"):
        kernel_agop(LaplaceKernel(), C, bad)
    P = P.clone()
    P[1, 1] = float("nan")
    with pytest.raises(ValueError, match="^points contains NaN or inf"):
        kernel_agop(LaplaceKernel(), C, A, points=P)


def test_two_groups_and_chunks_with_groups_give_the_same_agop():
    from agop.kernels import class_groups

    C, A, _ = _data(N=45, seed=9)
    k = LaplaceKernel()
    ref = kernel_agop(k, C, A, method="direct")
    for y in (torch.arange(45) % 2, torch.arange(45) % 3):
        for method in ("direct", "gram"):
            for rows in (7, 45):
                M = kernel_agop(k, C, A, method=method, groups=class_groups(y), chunk_rows=rows)
                assert _rel(M, ref) < 1e-12, (int(y.max()) + 1, method, rows)


def test_coef_in_another_dtype_is_converted_to_the_centers():
    C, A, _ = _data()
    M = kernel_agop(LaplaceKernel(), C, A.float())
    assert M.dtype == torch.float64
    assert torch.equal(M, kernel_agop(LaplaceKernel(), C, A.float().double()))


def test_refused_float32_gram_is_redone_in_float64_where_that_is_cheaper(monkeypatch):
    # wide features (N = 60 < K·D): the float64 gram form costs less than the direct form,
    # so a refused float32 try is redone by it, and the result is exact to float32 rounding
    import agop.agop as agop_module
    from agop.kernels import class_groups

    monkeypatch.setattr(agop_module, "float64_slowdown", lambda device: 1.0)
    g = torch.Generator().manual_seed(6)
    K, per, D = 3, 20, 150
    y = torch.arange(K).repeat_interleave(per)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    X = means[y] / means[y].norm(dim=1, keepdim=True) + 1e-3 * torch.randn(K * per, D,
                                                                            generator=g,
                                                                            dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    Y = -torch.ones(K * per, K, dtype=torch.float64)
    Y[torch.arange(K * per), y] = 1
    from agop.solve import kernel_ridge

    coef = kernel_ridge(LaplaceKernel(2.0)(X), Y).coef
    X32, A32 = X.float(), coef.float()
    groups = class_groups(y)
    ref = kernel_agop(LaplaceKernel(2.0), X32.double(), A32.double(), groups=groups,
                      method="direct")
    info = {}
    M = kernel_agop(LaplaceKernel(2.0), X32, A32, groups=groups, method="gram", info=info)
    assert info["fallback"] and (info["method"], info["precision"]) == ("gram", "float64")
    assert M.dtype == torch.float32
    assert _rel(M.double(), ref) < 1e-6
    # the refused try with small features is redone by the direct form, in float32
    Xs, As, gs = _collapsed_problem(1e-3)
    info = {}
    kernel_agop(LaplaceKernel(2.0), Xs.float(), As.float(), groups=gs, method="gram", info=info)
    assert info["fallback"] and (info["method"], info["precision"]) == ("direct", "float32")


def test_overlapping_groups_that_miss_a_center_are_refused():
    C, A, _ = _data(N=3)
    with pytest.raises(ValueError, match="partition"):  # 2 + 1 = N indices, but center 2 in none
        kernel_agop(LaplaceKernel(), C, A, groups=[torch.tensor([0, 1]), torch.tensor([1])])


def test_model_agop_of_float32_inputs_accumulates_in_float64():
    R = torch.arange(6.0).reshape(2, 3)
    M = model_agop(lambda x: x @ R.T, torch.ones(4, 3), batch_size=3)
    assert M.dtype == torch.float64 and torch.equal(M, (R.T @ R).double())


# ------------------------------------------------------------------ memory plans and chunks
def _spy_plans(monkeypatch, rows=7):
    """Replace agop.agop.plan_rows by a recorder that plans ``rows`` rows per chunk."""
    import agop.agop as agop_module

    calls = []

    def plan(bytes_per_row, total_rows, device, **kw):
        calls.append((bytes_per_row, total_rows, torch.device(device), kw))
        return rows

    monkeypatch.setattr(agop_module, "plan_rows", plan)
    return calls


def test_direct_form_plans_its_chunks_from_the_arrays_it_allocates(monkeypatch):
    # Per row of P: its distances, kernel values and weights (3 rows of N), its K gradient rows
    # (K·D), its row of X̃ or P (D) and its G × K block of F; fixed: the shifted centers and one
    # scaled copy of them (2 of N × D) and M (D × D); all in the centers' itemsize. N, n, D, K, G
    # are distinct, so a wrong term or factor changes the numbers.
    from agop.kernels import class_groups

    cpu = torch.device("cpu")
    C, A, P = _data(N=37, D=5, K=3, n_new=23, seed=10)
    N, D, K = 37, 5, 3
    k = LaplaceKernel()
    cases = [  # (centers, coef, points, groups, n, G, itemsize)
        (C.float(), A.float(), None, class_groups(torch.arange(N) % 4), N, 4, 4),
        (C, A, P, None, 23, 1, 8),
    ]
    for Ci, Ai, Pi, groups, n, G, item in cases:
        calls = _spy_plans(monkeypatch)
        M = kernel_agop(k, Ci, Ai, points=Pi, method="direct", groups=groups)
        per_row = (3 * N + K * D + D + G * K) * item
        fixed = (2 * N * D + D * D) * item
        assert calls == [(per_row, n, cpu, {"fixed_bytes": fixed})], (n, G, item)
        # the planned 7 rows are what it chunks by (the same sums as chunk_rows=7)
        assert torch.equal(M, kernel_agop(k, Ci, Ai, points=Pi, method="direct", groups=groups,
                                          chunk_rows=7))
        assert len(calls) == 1  # an explicit chunk_rows is not replanned


def test_gram_form_plans_its_chunks_from_the_arrays_it_allocates(monkeypatch):
    # W: 3 rows of N per row (distances, kernel values, weights), fixed 3 N × N (W and the
    # products of the gram form that follow it); the gram form: 4 rows of N per row (the chunk
    # products it forms), fixed 2 N × N (W and W²); in the dtype each step runs in. A refused
    # float32 try plans again for its float64 redo. An explicit chunk_rows plans nothing.
    import agop.agop as agop_module

    cpu = torch.device("cpu")

    def plans(N, item):
        return [(3 * N * item, N, cpu, {"fixed_bytes": 3 * N * N * item}),
                (4 * N * item, N, cpu, {"fixed_bytes": 2 * N * N * item})]

    k = LaplaceKernel(2.0)
    C, A, _ = _data(N=80, D=9, seed=5)  # spread: the float32 try is kept
    for Ci, Ai, item in ((C, A, 8), (C.float(), A.float(), 4)):
        calls = _spy_plans(monkeypatch)
        info = {}
        M = kernel_agop(k, Ci, Ai, method="gram", info=info)
        assert info["precision"] == str(Ci.dtype).replace("torch.", "")
        assert calls == plans(80, item), item
        assert torch.equal(M, kernel_agop(k, Ci, Ai, method="gram", chunk_rows=7))
        assert len(calls) == 2
    # a refused float32 try redone by the float64 gram form (wide features, cheap float64)
    monkeypatch.setattr(agop_module, "float64_slowdown", lambda device: 1.0)
    X, coef, groups = _wide_collapsed_problem()
    calls = _spy_plans(monkeypatch)
    info = {}
    M = kernel_agop(k, X.float(), coef.float(), groups=groups, method="gram", info=info)
    assert info["fallback"] and (info["method"], info["precision"]) == ("gram", "float64")
    assert calls == plans(60, 4) + plans(60, 8)
    M7 = kernel_agop(k, X.float(), coef.float(), groups=groups, method="gram", chunk_rows=7)
    assert torch.equal(M, M7) and len(calls) == 4


def _wide_collapsed_problem(seed=6, K=3, per=20, D=150, spread=1e-3):
    """N = 60 < K·D collapsed classes: a refused float32 gram try, whose float64 redo by the
    gram form is cheaper than the direct form where float64 is fast."""
    from agop.kernels import class_groups
    from agop.solve import kernel_ridge

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(per)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    X = means[y] / means[y].norm(dim=1, keepdim=True)
    X = X + spread * torch.randn(K * per, D, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    Y = -torch.ones(K * per, K, dtype=torch.float64)
    Y[torch.arange(K * per), y] = 1
    return X, kernel_ridge(LaplaceKernel(2.0)(X), Y).coef, class_groups(y)


def _spy_distances(monkeypatch):
    """Wrap agop.agop.pairwise_distances: record (rows of X, groups) of every call."""
    import agop.agop as agop_module

    calls = []
    real = agop_module.pairwise_distances

    def spy(X, Z=None, **kw):
        calls.append((X.shape[0], kw.get("groups")))
        return real(X, Z, **kw)

    monkeypatch.setattr(agop_module, "pairwise_distances", spy)
    return calls


def test_every_distance_is_computed_once_per_class_frame_and_given_distances_are_reused(
        monkeypatch):
    # ``groups``: every distance to the centers is computed about the class means — in the
    # direct form, the float64 gram form, the float32 gram try and its float64 redo — each
    # row of the centers once, in chunks of chunk_rows; given ``distances`` are not recomputed.
    import agop.agop as agop_module
    from agop.kernels import class_groups, pairwise_distances

    k = LaplaceKernel(2.0)
    C, A, _ = _data(N=80, D=9, seed=5)
    groups = class_groups(torch.arange(80) % 3)
    for Ci, Ai, method in ((C, A, "direct"), (C, A, "gram"), (C.float(), A.float(), "gram")):
        calls = _spy_distances(monkeypatch)
        info = {}
        kernel_agop(k, Ci, Ai, method=method, groups=groups, chunk_rows=7, info=info)
        assert info["precision"] == str(Ci.dtype).replace("torch.", "")  # float32 kept
        assert [r for r, _ in calls] == [7] * 11 + [3], (method, Ci.dtype)
        assert all(g is groups for _, g in calls), (method, Ci.dtype)
        calls.clear()
        kernel_agop(k, Ci, Ai, method="gram", groups=groups, distances=pairwise_distances(Ci))
        assert calls == [], Ci.dtype
    monkeypatch.setattr(agop_module, "float64_slowdown", lambda device: 1.0)
    X, coef, groups = _wide_collapsed_problem()
    calls = _spy_distances(monkeypatch)
    info = {}
    kernel_agop(k, X.float(), coef.float(), groups=groups, method="gram", info=info)
    assert info["fallback"] and info["precision"] == "float64"
    assert len(calls) == 2 and all(g is groups for _, g in calls)


def test_refused_float32_gram_is_redone_by_the_direct_form_where_float64_is_slow(monkeypatch):
    # the same wide problem as in the float64 redo above, where float64 products are 32 times
    # slower than float32 ones (most GPUs): the direct form in float32 is cheaper
    import agop.agop as agop_module

    X, coef, groups = _wide_collapsed_problem()
    X32, A32 = X.float(), coef.float()
    k = LaplaceKernel(2.0)
    monkeypatch.setattr(agop_module, "float64_slowdown", lambda device: 32.0)
    info = {}
    M = kernel_agop(k, X32, A32, groups=groups, method="gram", info=info)
    assert info["fallback"] and (info["method"], info["precision"]) == ("direct", "float32")
    ref = kernel_agop(k, X32.double(), A32.double(), groups=groups, method="direct")
    assert _rel(M.double(), ref) < 1e-6


def _estimate_reference(W, C, A):
    """The gram form's documented error estimate ε‖T ∘ ccᵀ‖_F, in float64 from W's dtype's
    inputs: T = W²∘|A||A|ᵀ + W∘(|A|B̂ᵀ + B̂|A|ᵀ) + diag(Σ_k B̂_k²), B̂ = |B| + √((W∘W)(A∘A)),
    B = WA as formed in W's dtype, c the norms of the rows of C minus its column means."""
    eps = torch.finfo(W.dtype).eps
    B = (W @ A).double()
    W, C, A = W.double(), C.double(), A.double()
    Bh = B.abs() + ((W * W) @ (A * A)).sqrt()
    Aa = A.abs()
    T = (W @ W.T) * (Aa @ Aa.T) + W * (Aa @ Bh.T + Bh @ Aa.T) + torch.diag((Bh * Bh).sum(dim=1))
    c = (C - C.mean(dim=0)).norm(dim=1)
    return eps * float((T * c[:, None] * c[None, :]).norm())


def test_gram_error_estimate_is_the_documented_bound():
    # every ingredient of the estimate (|A|∘|A| with W², the random-walk term of B̂ in every
    # row, the diagonal term, the centered row norms, the sum over row chunks), on spread and
    # collapsed data, uncentered, with coefficients of any scale (the estimate is quadratic in
    # them: ε‖T‖ scales by s², whatever s)
    from agop.agop import _gram_form, _weight_matrix

    k = LaplaceKernel(2.0)
    C, A, _ = _data(N=30, D=6, K=2, seed=11)
    cases = [(C.float() + 0.5, A.float(), None)]
    for spread in (1e-1, 1e-2):
        X, coef, groups = _collapsed_problem(spread, K=3, per=10, D=8, seed=2)
        cases.append((X.float(), coef.float(), groups))
    for X32, A32, groups in cases:
        W = _weight_matrix(k, X32, groups, None)
        ref = _estimate_reference(W, X32, A32)
        for rows in (None, 7, 1):
            for s in (1.0, 1e-6):
                est = _gram_form(W, X32, s * A32, rows, estimate=True)[1]
                assert abs(est - s * s * ref) <= 1e-4 * s * s * ref, (rows, s, est, ref)


def test_gram_form_works_in_the_dtype_of_w():
    from agop.agop import _gram_form, _weight_matrix

    C, A, _ = _data(N=20, seed=12)
    W = _weight_matrix(LaplaceKernel(), C.float(), None, None)
    M, est = _gram_form(W, C, A, None, estimate=True)
    M32, est32 = _gram_form(W, C.float(), A.float(), None, estimate=True)
    assert M.dtype == torch.float32 and torch.equal(M, M32) and est == est32


def test_precomputed_distances_are_used_in_the_centers_dtype():
    # float64 distances for float32 centers: the weights are computed from their float32
    # rounding, as from float32 distances (the precision info reports)
    from agop.kernels import pairwise_distances

    C, A, _ = _data(N=80, D=9, seed=5)
    d = pairwise_distances(C)
    k = LaplaceKernel(2.0)
    info = {}
    M = kernel_agop(k, C.float(), A.float(), method="gram", distances=d, info=info)
    assert info["precision"] == "float32"
    assert torch.equal(M, kernel_agop(k, C.float(), A.float(), method="gram",
                                      distances=d.float()))
