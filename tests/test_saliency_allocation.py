import pytest
import torch

from spikellm.allocation import allocate_steps, layer_cost, n_salient, salient_mask, total_cost
from spikellm.hessian import inverse_hessian_cholesky
from spikellm.saliency import activation_saliency, hessian_column_saliency, kv_saliency


def test_activation_saliency_is_invariant_to_equivalent_smoothing():
    # LET-invariance (method.md §3.1): x' = x / s, W' = W diag(s) leaves x_i (x WᵀW)_i unchanged
    torch.manual_seed(0)
    x = torch.randn(3, 50, 32)
    W = torch.randn(48, 32)
    s = torch.rand(32) + 0.5
    torch.testing.assert_close(activation_saliency(x / s, W * s), activation_saliency(x, W),
                               rtol=1e-4, atol=1e-4)


def test_activation_saliency_sums_to_output_energy():
    torch.manual_seed(1)
    x = torch.randn(2, 40, 16)
    W = torch.randn(24, 16)
    sal = activation_saliency(x, W)
    energy = (x.reshape(-1, 16) @ W.t()).pow(2).sum(1).mean()
    torch.testing.assert_close(sal.sum(), energy, rtol=1e-4, atol=1e-4)


def test_activation_saliency_selects_planted_outlier_channels():
    torch.manual_seed(2)
    x = torch.randn(4, 64, 128)
    x[..., [7, 50, 99]] *= 20
    W = torch.randn(96, 128) / 10
    mask = salient_mask(activation_saliency(x, W), ratio=3 / 128)
    assert set(torch.nonzero(mask).flatten().tolist()) == {7, 50, 99}


def test_kv_saliency_shapes_and_outlier():
    torch.manual_seed(3)
    q = torch.randn(1, 2, 16, 8)
    k = torch.randn(1, 2, 16, 8)
    k[..., 5] *= 10
    sal = kv_saliency(q, k.transpose(-1, -2), "k")
    assert sal.shape == (2, 8)
    assert int(sal[0].argmax()) == 5 and int(sal[1].argmax()) == 5


def test_hessian_saliency_ranking_is_invariant_to_hessian_scale():
    torch.manual_seed(4)
    X = torch.randn(256, 32)
    H = 2 * X.t() @ X / 256
    W = torch.randn(16, 32)
    U1, _ = inverse_hessian_cholesky(H)
    U2, _ = inverse_hessian_cholesky(7.0 * H)
    s1, s2 = hessian_column_saliency(W, U1), hessian_column_saliency(W, U2)
    torch.testing.assert_close(s2, 7.0 * s1, rtol=1e-3, atol=1e-6)
    assert torch.equal(torch.argsort(s1), torch.argsort(s2))


def test_cholesky_failure_retries_with_more_damping():
    torch.manual_seed(6)
    X = torch.randn(2, 16)
    H = X.t() @ X                           # rank 2: singular without damping
    seen = []
    U, damp = inverse_hessian_cholesky(H, 0.0, on_retry=seen.append)
    assert seen and "retrying with damping" in seen[0]
    assert 0 < damp < float("inf") and torch.isfinite(U).all()


def test_hopeless_hessian_falls_back_to_rtn_instead_of_crashing():
    from spikellm.gptq import gptq_solve
    from spikellm.quantizers import UniformQuantizer
    H = torch.eye(8)
    H[2, 3] = H[3, 2] = float("nan")                 # e.g. overflowed fp16 activations: no damping helps
    W = torch.randn(4, 8)
    seen = []
    res = gptq_solve(W, H, UniformQuantizer(4), on_damp=seen.append)
    assert res.damp == float("inf") and "round-to-nearest" in seen[-1]
    rtn = gptq_solve(W, None, UniformQuantizer(4), error_feedback=False)
    torch.testing.assert_close(res.Q, rtn.Q)


@pytest.mark.parametrize("C,ratio,expected", [(100, 0.1, 10), (576, 0.2, 115), (64, 0.0, 0), (64, 1.0, 64)])
def test_allocation_gives_exact_salient_counts(C, ratio, expected):
    torch.manual_seed(5)
    scores = torch.randn(C)
    steps = allocate_steps(scores, ratio, 3)
    assert n_salient(C, ratio) == expected
    assert int((steps == 3).sum()) == expected if expected else int((steps == 1).sum()) == C
    if 0 < expected < C:   # salient = the top scores
        assert scores[steps == 3].min() >= scores[steps == 1].max()


def test_random_selection_is_seeded_and_same_size():
    scores = torch.arange(200.0)
    a = salient_mask(scores, 0.1, "random", seed=1)
    b = salient_mask(scores, 0.1, "random", seed=1)
    c = salient_mask(scores, 0.1, "random", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 20
    assert not torch.equal(a, salient_mask(scores, 0.1))


def test_ace_of_hand_computed_allocations():
    # 4 columns, 2 outputs; one salient column with 3 ternary steps, 16-bit activations
    steps = torch.tensor([1, 3, 1, 1])
    c = layer_cost("l", 2, 4, steps, bits_per_step=1.0, act_bits=16.0, additive=True)
    assert c.ace == 2 * 16 * (1 + 3 + 1 + 1)       # 192 bit-ops per token
    assert c.avg_steps == 1.5 and c.fp16_ace == 2 * 4 * 256
    w4 = layer_cost("w4", 2, 4, torch.ones(4, dtype=torch.long), 4.0, 16.0)
    assert w4.ace == 2 * 4 * 64
    tot = total_cost([c, w4])
    assert tot["ace"] == 192 + 512 and tot["ace_rel_fp16"] == (192 + 512) / (2 * 2048)
    assert tot["avg_steps"] == 1.25 and tot["additive_fraction"] == 0.5


def test_energy_of_hand_computed_allocations():
    from spikellm.allocation import EnergyModel, energy_cost, layer_energy
    e = EnergyModel(fp_mac=4.6, fp_add=0.9, int_mul_bitop=0.2 / 64, int_add=0.1)
    # ternary spiking weights, FP activations: every step is an add: 2*(1+3+1+1) = 12 adds
    tern = layer_cost("t", 2, 4, torch.tensor([1, 3, 1, 1]), 1.0, 16.0, additive=True)
    assert layer_energy(tern, e) == (pytest.approx(12 * 0.9), pytest.approx(8 * 4.6))
    # W4A4 with one 2-step salient activation channel: bit-ops 2*4*4*5 = 160, 10 accumulations
    w4a4 = layer_cost("q", 2, 4, torch.tensor([1, 1, 1, 2]), 4.0, 4.0)
    assert w4a4.ace == 160 and w4a4.act_bits == 4.0
    assert layer_energy(w4a4, e)[0] == pytest.approx(160 * 0.2 / 64 + 10 * 0.1)
    # weight-only W4 (FP activations, multiplier needed): the FP MAC energy, no saving
    w4 = layer_cost("w", 2, 4, torch.ones(4), 4.0, 16.0)
    assert layer_energy(w4, e)[0] == pytest.approx(8 * 4.6)
    tot = energy_cost([tern, w4a4, w4], e)
    assert tot["energy_pj"] == pytest.approx(12 * 0.9 + 1.5 + 8 * 4.6)
    assert tot["energy_rel_fp16"] == pytest.approx(tot["energy_pj"] / (3 * 8 * 4.6))
