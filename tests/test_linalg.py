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
