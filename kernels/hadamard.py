"""Hadamard matrices and the fast (normalized) Hadamard transform.

Orders ``n = m * 2**k`` where ``m`` has a construction here:

- Sylvester: ``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]`` (the powers of two);
- Paley I, ``q`` a prime with ``q = 3 (mod 4)``: order ``q + 1`` (4, 8, 12, 20, 24, 32, 44, 48, 60, ...);
- Paley II, ``q`` a prime with ``q = 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, 76, 84, ...);

both Paley constructions are built from the quadratic residues mod ``q`` (the Jacobsthal matrix
``Q[i, j] = chi(j - i)``).  Prime powers (GF(p^k), e.g. q = 25 for order 52) are not constructed;
an order without a construction raises ``ValueError`` naming it.  A larger order is the Kronecker
product ``H_m (x) H_{2^k}`` with the largest power of two that leaves a constructible ``m``.

:func:`hadamard_transform` applies the normalized matrix ``H / sqrt(n)`` (orthogonal) to vectors along
a dimension: ``y = x @ (H / sqrt(n)).T``, i.e. each vector ``v`` becomes ``H v / sqrt(n)``.  The
power-of-two factor is an O(n log n) butterfly (fast Walsh-Hadamard transform) in torch, the small
factor ``H_m`` a dense [m, m] matmul.  A weight absorbs an online transform of its input by having
its rows transformed the same way: ``W x = T(W) T(x)`` row-wise, since ``T`` is orthogonal.

:func:`random_hadamard_matrix` is ``Q = (H / sqrt(n)) diag(s)`` with signs ``s`` from a seeded generator.
"""

from __future__ import annotations

import math
from functools import cache

import torch

__all__ = [
    "hadamard_matrix",
    "hadamard_exists",
    "hadamard_factors",
    "hadamard_transform",
    "random_hadamard_matrix",
    "fwht",
]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``: the quadratic character mod the prime ``q`` (0 on the diagonal)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64, device="cpu")
    idx = (torch.arange(q, device="cpu")[None, :] - torch.arange(q, device="cpu")[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: ``H = I + S``, S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64, device="cpu")
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(n, dtype=torch.int64, device="cpu")


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4: the symmetric conference matrix C = [[0, 1^T], [1, Q]],
    each 0 replaced by [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.int64, device="cpu")
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64, device="cpu")
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64, device="cpu")
    return torch.kron(C, A) + torch.kron(torch.eye(n, dtype=torch.int64, device="cpu"), B)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64, device="cpu")
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@cache
def _base(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` from Sylvester or Paley I/II, or None."""
    if m == 1 or (m & (m - 1)) == 0:
        return _sylvester(m)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@cache
def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` the largest power of two leaving a constructible ``m``.

    Raises ``ValueError`` naming ``n`` when no construction here reaches it."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if _base(m) is not None:
            return m, p
        p //= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} can be built here (n = m * 2^k needs m from Sylvester, Paley I "
        f"(prime q = 3 mod 4, m = q + 1) or Paley II (prime q = 1 mod 4, m = 2 (q + 1)))"
    )


def hadamard_exists(n: int) -> bool:
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


@cache
def _hadamard_int(n: int) -> torch.Tensor:
    m, p = hadamard_factors(n)
    base = _base(m)
    assert base is not None  # hadamard_factors checked it
    return torch.kron(base, _sylvester(p)) if p > 1 else base


def hadamard_matrix(n: int, normalized: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The order-``n`` Hadamard matrix ``H_m (x) H_{2^k}`` (entries +-1, ``H H^T = n I``); ``normalized``
    divides by sqrt(n) (orthogonal).  int64 entries with ``dtype=torch.int64``."""
    H = _hadamard_int(n).clone()
    if dtype == torch.int64:
        if normalized:
            raise ValueError("a normalized Hadamard matrix is not integer")
        return H
    H = H.to(dtype)
    return H / math.sqrt(n) if normalized else H


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dimension (a power of two): x @ H_p."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht: the length {p} is not a power of two")
    shape = x.shape
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.reshape(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return y.reshape(shape)


def hadamard_transform(x: torch.Tensor, dim: int = -1, normalized: bool = True) -> torch.Tensor:
    """``H v / sqrt(n)`` for each vector ``v`` of ``x`` along ``dim`` (``n = x.shape[dim]``): the Kronecker
    factor ``H_m`` as a dense matmul, the power-of-two factor as :func:`fwht`."""
    n = x.shape[dim]
    m, p = hadamard_factors(n)
    y = x.movedim(dim, -1)
    lead = y.shape[:-1]
    y = y.reshape(*lead, m, p)
    if p > 1:
        y = fwht(y)  # along p (Sylvester matrices are symmetric)
    if m > 1:
        Hm = _hadamard_int(m).to(device=x.device, dtype=x.dtype)
        y = torch.matmul(Hm, y)  # (H_m (x) H_p) v = vec(H_m V H_p^T) for V = v viewed [m, p]
    y = y.reshape(*lead, n)
    if normalized:
        y = y / math.sqrt(n)
    return y.movedim(-1, dim)


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Q = (H / sqrt(n)) diag(s)``, ``s`` random signs from ``torch.Generator().manual_seed(seed)``; built on
    the CPU (the same matrix on every device: callers move it)."""
    g = torch.Generator("cpu").manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g, device="cpu").to(torch.float64) * 2 - 1
    return (hadamard_matrix(n, normalized=True) * s[None, :]).to(dtype)
