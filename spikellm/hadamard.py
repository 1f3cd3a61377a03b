"""Hadamard matrices of the sizes LLaMA-family models use, and their fast transform (the rotation
of QuaRot, Ashkboos et al. 2024; issue "Rotations").

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I; H / √n is orthogonal. Orders that
are not powers of two are built as a Kronecker product H_m ⊗ H_{2^k} of a Paley matrix H_m and
Sylvester's H_{2^k}:

- Sylvester: H_1 = [1], H_{2n} = [[H, H], [H, −H]].
- Paley I (q a prime power, q ≡ 3 mod 4): order q + 1, H = I + S with S = [[0, 1ᵀ], [−1, Q]],
  Q the Jacobsthal matrix Q_ij = χ(x_j − x_i) (χ the quadratic character of GF(q), built as
  polynomials over GF(p) modulo an irreducible one). H_12 from q = 11, H_344 from q = 7³.
- Paley II (q a prime power, q ≡ 1 mod 4): order 2(q + 1), from the symmetric conference matrix
  C = [[0, 1ᵀ], [1, Q]]: H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]. H_36 from q = 17.

SmolLM2-135M: hidden 576 = 36 · 16, intermediate 1536 = 12 · 128, head 64 = 2^6. LLaMA:
4096 = 2^12, 5120 = 20 · 256, 8192 = 2^13, 13824 = 108 · 128, 14336 = 28 · 512, 28672 = 28 · 1024,
and 11008 = 344 · 32 (H_344 from GF(7³); QuaRot uses 172 · 64 from a table of known matrices,
which this module does not have: its transform costs 344 + 5 adds per value, QuaRot's 172 + 6).
Where no split exists, `hadamard` raises and `rotation_matrix` falls back to a seeded random
orthogonal matrix and says so.

`hadamard(n)` -> H [n, n] (±1, float64); `hadamard_transform(x)` applies x @ (H / √n) along the
last axis in O(n log n + n m) without building H; `rotation_matrix(n, seed)` -> an orthogonal
[n, n] (H / √n times a seeded random ±1 diagonal, QuaRot's randomized Hadamard) and its kind.
"""
from __future__ import annotations

import functools

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


#: largest extension degree of the finite fields GF(p^k) used (an irreducible polynomial of
#: degree <= 3 is one without roots, which a search finds)
_MAX_DEGREE = 3


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k <= 3; else None."""
    for k in range(1, _MAX_DEGREE + 1):
        p = round(q ** (1 / k))
        for c in (p - 1, p, p + 1):
            if c >= 2 and c ** k == q and _is_prime(c):
                return c, k
    return None


def _irreducible(p: int, k: int) -> list[int]:
    """Coefficients c_0..c_{k-1} of a monic irreducible x^k + Σ c_i x^i over GF(p) (k <= 3: no
    root in GF(p)); the first one in lexicographic order."""
    import itertools
    for cs in itertools.product(range(p), repeat=k):
        if all((x ** k + sum(c * x ** i for i, c in enumerate(cs))) % p for x in range(p)):
            return list(cs)
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


def _field_squares(p: int, k: int) -> set[int]:
    """The nonzero squares of GF(p^k), elements encoded as integers Σ a_i p^i (a_i the
    coefficients of the polynomial Σ a_i x^i modulo the irreducible `_irreducible(p, k)`)."""
    if k == 1:
        return {(x * x) % p for x in range(1, p)}
    mod = _irreducible(p, k)

    def digits(a):
        return [(a // p ** i) % p for i in range(k)]

    def mul(a, b):
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(digits(a)):
            for j, y in enumerate(digits(b)):
                prod[i + j] = (prod[i + j] + x * y) % p
        for d in range(2 * k - 2, k - 1, -1):          # x^d = x^(d-k) · (−Σ c_i x^i)
            c, prod[d] = prod[d], 0
            for i, m in enumerate(mod):
                prod[d - k + i] = (prod[d - k + i] - c * m) % p
        return sum(v * p ** i for i, v in enumerate(prod[:k]))

    return {mul(a, a) for a in range(1, p ** k)}


def _jacobsthal(q: int) -> torch.Tensor:
    """Q [q, q], Q_ij = χ(x_j − x_i) over GF(q) (q a prime power; elements as in
    `_field_squares`): +1 for a nonzero square, −1 for a non-square, 0 on i = j."""
    p, k = prime_power(q)
    squares = _field_squares(p, k)
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.zeros(q, q, dtype=torch.long)
    ar = torch.arange(q)
    for i in range(k):                                 # digit-wise x_j − x_i mod p
        d = (ar // p ** i) % p
        idx += ((d[None, :] - d[:, None]) % p) * p ** i
    return chi[idx]


def paley_order(m: int) -> tuple[str, int] | None:
    """('I', q) or ('II', q) when a Paley construction over GF(q) (q a prime power) gives
    order m, else None."""
    if m % 4 == 0 and prime_power(m - 1) and (m - 1) % 4 == 3:
        return "I", m - 1
    if m % 4 == 0 and prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    kind, q = paley_order(m)
    Q = _jacobsthal(q)
    ones = torch.ones(1, q, dtype=torch.float64)
    if kind == "I":
        S = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1),
                       torch.cat([-ones.t(), Q], 1)], 0)
        return torch.eye(q + 1, dtype=torch.float64) + S
    C = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1),
                   torch.cat([ones.t(), Q], 1)], 0)
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def split_order(n: int) -> tuple[int, int] | None:
    """n = m · 2^k with m = 1 or a Paley order (the largest power of two that leaves one)
    -> (m, 2^k), or None when no such split exists."""
    p = n & -n                                   # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or paley_order(m) is not None:
            return m, p
        p //= 2
    return None


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries ±1, H Hᵀ = n I), float64. ValueError when n has
    no split m · 2^k with a known H_m (`split_order`)."""
    split = split_order(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley; "
                         f"use rotation_matrix(n), which falls back to a random orthogonal one")
    m, p = split
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H if m == 1 else torch.kron(_paley(m), H)        # split_order: m is 1 or a Paley order


#: largest Sylvester factor applied as one dense product (BLAS) instead of a butterfly
_DENSE_MAX = 256


@functools.lru_cache(maxsize=64)
def _dense(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """hadamard(n) (a Sylvester or Paley factor) in `dtype` on `device`, cached."""
    return hadamard(n).to(device=device, dtype=dtype)


def _sylvester(y: torch.Tensor, p: int) -> torch.Tensor:
    """y [..., p] -> y @ H_p for a power of two p, as dense BLAS products: H_p itself for
    p <= 256, else H_p = H_q ⊗ H_256 (Sylvester), i.e. Y [q, 256] -> H_q · Y · H_256 with H_q
    applied the same way on the q axis (H symmetric)."""
    if p <= _DENSE_MAX:
        return y @ _dense(p, y.dtype, str(y.device)) if p > 1 else y
    r = _DENSE_MAX
    y = y.reshape(*y.shape[:-1], p // r, r) @ _dense(r, y.dtype, str(y.device))
    y = _sylvester(y.transpose(-1, -2), p // r).transpose(-1, -2)
    return y.reshape(*y.shape[:-2], p)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x @ (H_n / √n), H_n = H_m ⊗ H_{2^k} as `hadamard(n)`: the Sylvester factor
    as dense products of order <= 256 (`_sylvester`) and one [m, m] product with the Paley
    factor, in x's dtype (computed in float32 at least). The dense products run as BLAS
    matmuls (on a CPU far faster than log2 p elementwise butterfly stages); the ACE account
    (`rotation.hadamard_adds`) counts what a butterfly kernel would add."""
    n = x.shape[-1]
    split = split_order(n)
    if split is None:
        raise ValueError(f"no Hadamard transform of size {n} (see hadamard)")
    m, p = split
    ct = torch.promote_types(x.dtype, torch.float32)
    y = _sylvester(x.to(ct).reshape(*x.shape[:-1], m, p), p)
    if m > 1:                                    # (H_m ⊗ H_p): rows of x index (i, j) as i·p + j
        y = _dense(m, ct, str(y.device)).t() @ y
    return (y.reshape(x.shape) / n ** 0.5).to(x.dtype)


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An orthogonal [n, n] float64 rotation -> (R, kind): kind "hadamard" for (H_n / √n) · D
    with D a seeded random ±1 diagonal (QuaRot's randomized Hadamard), or "random_orthogonal"
    (QR of a seeded Gaussian, signs fixed) where no Hadamard order n is known."""
    g = torch.Generator().manual_seed(seed)
    if split_order(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return hadamard(n) / n ** 0.5 * signs[None, :], "hadamard"
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))[None, :], "random_orthogonal"
