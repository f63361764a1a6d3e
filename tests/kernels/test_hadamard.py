"""Hadamard matrices (Sylvester, Paley I/II, Kronecker products), the fast transform, randomized Hadamard."""

import pytest
import torch

from quantbench.kernels.hadamard import (
    fwht,
    hadamard_exists,
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 60, 64, 576, 1536])
def test_hadamard_is_exactly_hadamard(n):
    H = hadamard_matrix(n, dtype=torch.int64)
    assert H.shape == (n, n)
    assert bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))


@pytest.mark.parametrize("n, factors", [(12, (12, 1)), (20, (20, 1)), (28, (28, 1)), (36, (36, 1)),
                                        (576, (36, 16)), (1536, (12, 128)), (64, (1, 64)), (24, (12, 2))])
def test_factorization_keeps_the_largest_power_of_two(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [3, 9, 52, 100])
def test_orders_without_a_construction_name_the_order(n):
    # 9: odd; 52 = 4 * 13 needs Paley II over GF(25) (a prime power, not built); 100 = 4 * 25 likewise
    assert not hadamard_exists(n)
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [12, 36, 64, 576, 1536])
def test_fast_transform_equals_dense_matmul(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    dense = x.double() @ hadamard_matrix(n, normalized=True).T
    assert (hadamard_transform(x) - dense).abs().max() < 1e-5
    # along another dimension
    xt = x.transpose(1, 2).contiguous()  # [3, n, 5]
    assert (hadamard_transform(xt, dim=1) - dense.transpose(1, 2)).abs().max() < 1e-5
    # normalized: norms preserved; unnormalized is sqrt(n) times it
    assert torch.allclose(hadamard_transform(x, normalized=False), hadamard_transform(x) * n**0.5, atol=1e-3)


def test_fwht_is_sylvester_and_refuses_other_lengths():
    x = torch.randn(4, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(32))
    with pytest.raises(ValueError, match="24"):
        fwht(torch.randn(24))


@pytest.mark.parametrize("n", [576, 64])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    Q = random_hadamard_matrix(n, seed=3)
    assert (Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(Q, random_hadamard_matrix(n, seed=3))
    Q2 = random_hadamard_matrix(n, seed=4)
    assert not torch.equal(Q, Q2)
    # Q = H diag(s): each column is a column of H / sqrt(n) up to its sign
    H = hadamard_matrix(n, normalized=True)
    assert torch.allclose((Q / H).abs(), torch.ones(n, n, dtype=torch.float64))
    assert bool(((Q / H)[0].unsqueeze(0) == Q / H).all())
