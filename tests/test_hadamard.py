"""Hadamard construction (`spikellm.hadamard`): orthogonal for every size the embedded model
and the LLaMA family use, the fast transform equals multiplication by the matrix, and the
randomized rotation is orthogonal (random orthogonal where no Hadamard order is known)."""
from __future__ import annotations

import pytest
import torch

from spikellm.hadamard import hadamard, hadamard_transform, paley_order, rotation_matrix, split_order

#: SmolLM2-135M (hidden, intermediate, head, K/V width) and the Paley orders of LLaMA sizes
SIZES = [576, 1536, 64, 192, 12, 20, 28, 36, 108, 140, 344]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrices_are_hadamard(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.t(), n * torch.eye(n, dtype=torch.float64))


def test_paley_orders_and_splits_of_the_model_sizes():
    assert paley_order(12) == ("I", 11) and paley_order(36) == ("II", 17) and paley_order(172) is None
    # prime powers: GF(7^3) gives H_344, so LLaMA-7B's 11008 = 344 x 32 (not 5504 x 2)
    assert paley_order(344) == ("I", 343) and paley_order(28) == ("I", 27) and split_order(11008) == (344, 32)
    assert split_order(576) == (36, 16) and split_order(1536) == (12, 128) and split_order(64) == (1, 64)
    for n in (8192, 11008, 13824, 14336, 28672):          # the larger LLaMA sizes split too
        m, p = split_order(n)
        assert m * p == n and (m == 1 or paley_order(m) is not None) and m <= 344
    assert split_order(188) is None                          # 4 * 47: no Paley order fits


@pytest.mark.parametrize("n", [576, 1536, 64, 12, 2, 1, 688, 512, 4096, 5120])   # 4096: H_16 ⊗ H_256
def test_fast_transform_equals_the_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard(n) / n ** 0.5, rtol=1e-12, atol=1e-12)
    y = hadamard_transform(x.float())                       # float32 stays float32
    assert y.dtype == torch.float32 and torch.allclose(y.double(), x @ hadamard(n) / n ** 0.5, atol=1e-5)


def test_rotations_are_orthogonal_and_seeded():
    for n, kind in ((576, "hadamard"), (188, "random_orthogonal")):     # 188: no split
        R, k = rotation_matrix(n, seed=3)
        assert k == kind
        torch.testing.assert_close(R @ R.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
        assert torch.equal(R, rotation_matrix(n, seed=3)[0]) and not torch.equal(R, rotation_matrix(n, seed=4)[0])
    with pytest.raises(ValueError, match="rotation_matrix"):
        hadamard(188)


def test_every_paley_order_below_400_gives_a_hadamard_matrix():
    """Prime and prime-power fields (GF(p^k), k <= 3), Paley I and II."""
    orders = [m for m in range(4, 400, 4) if paley_order(m) is not None]
    assert {28, 344, 52, 100} <= set(orders)         # 27 = 3^3, 343 = 7^3, 25 = 5^2 (II), 49 = 7^2 (II)
    for m in orders:
        H = hadamard(m)
        assert torch.equal(H @ H.t(), m * torch.eye(m, dtype=torch.float64)), m
