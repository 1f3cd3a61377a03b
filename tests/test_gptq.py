import torch

from spikellm.blockwise import InputCollector, capture_block_inputs, forward_block
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.gptq import HessianAccumulator, gptq_solve, reconstruction_error
from spikellm.models import blocks_of, get_module
from spikellm.quantizers import PBLLMQuantizer, TernaryGIFQuantizer, UniformQuantizer
from spikellm.hessian import inverse_hessian_cholesky


def _rtn(W, bits, group_size=0):
    return gptq_solve(W, None, UniformQuantizer(bits, group_size), error_feedback=False).Q


def test_gptq_equals_rtn_when_hessian_is_identity():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    for bits, gs in [(4, 0), (3, 0), (2, 64)]:
        q_gptq = gptq_solve(W, torch.eye(256), UniformQuantizer(bits, gs)).Q
        torch.testing.assert_close(q_gptq, _rtn(W, bits, gs))


def test_rtn_grid_is_per_row_asymmetric_min_max():
    W = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.1, 0.2, 0.3, 0.4]])
    Q = _rtn(W, 2)
    # row 0: range [-1, 2], 4 levels of step 1 -> exact on -1, 0, 2 and 0.5 -> 0 or 1
    assert torch.allclose(Q[0, [0, 1, 3]], torch.tensor([-1.0, 0.0, 2.0]))
    assert len(torch.unique(Q[1])) <= 4


def _real_linear_inputs(smollm, data_root, name="mlp.down_proj"):
    from spikellm.data import CalibSpec, calibration_set
    ids = calibration_set(smollm.tokenizer, CalibSpec("wikitext2", "validation", 4, 128, 0), data_root)
    inputs = capture_block_inputs(smollm.model, smollm.spec, ids)
    block = blocks_of(smollm.model, smollm.spec)[0]
    layer = get_module(block, name)
    acc = HessianAccumulator(layer.in_features)
    xs = []
    with InputCollector({name: layer}, lambda n, x: (acc.add_batch(x), xs.append(x))):
        forward_block(block, inputs, 4, collect_only=True)
    return layer.weight.data.clone(), acc.H, torch.cat(xs).reshape(-1, layer.in_features)


def test_gptq_output_error_is_below_rtn_on_real_activations(smollm, data_root):
    W, H, X = _real_linear_inputs(smollm, data_root)
    for bits in (4, 3):
        q_rtn = _rtn(W, bits)
        res = gptq_solve(W, H, UniformQuantizer(bits))
        err_rtn = ((X @ (W - q_rtn).t()) ** 2).mean()
        err_gptq = ((X @ (W - res.Q).t()) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, err_gptq, err_rtn)
        # reconstruction_error is tr(ΔHΔᵀ) = 2 * mean ‖Δx‖² over tokens
        torch.testing.assert_close(torch.tensor(res.recon_error),
                                   2 * err_gptq * W.shape[0], rtol=1e-3, atol=1e-3)


def test_actorder_returns_weights_in_original_column_order():
    torch.manual_seed(1)
    X = torch.randn(512, 48) * torch.linspace(0.1, 3, 48)
    H = 2 * X.t() @ X / 512
    W = torch.randn(16, 48)
    res = gptq_solve(W, H, UniformQuantizer(4), actorder=True)
    assert res.perm is not None and not torch.equal(res.perm, torch.arange(48))
    # each column of Q is quantized close to the same column of W
    assert ((res.Q - W).abs().mean(0) < 0.5).all()
    assert res.recon_error < reconstruction_error(W, _rtn(W, 4), H)


def test_ternary_quantizer_uses_T_levels_per_column():
    torch.manual_seed(2)
    W = torch.randn(32, 64)
    steps = torch.ones(64, dtype=torch.long)
    steps[:8] = 3
    q = TernaryGIFQuantizer(steps, group_size=0, salient_scale="own")
    res = gptq_solve(W, torch.eye(64), q, error_feedback=False)
    codes = res.Q / q.alpha                                # alpha: [rows, columns] thresholds
    torch.testing.assert_close(codes, codes.round())
    assert codes[:, :8].abs().max() == 3 and codes[:, 8:].abs().max() == 1
    assert len(torch.unique(q.alpha[:, 8:])) == 32          # one threshold per row for normal columns
    assert not torch.equal(q.alpha[:, 0], q.alpha[:, 8])    # salient columns: their own threshold


def test_ternary_shared_threshold_is_the_normal_columns_one():
    torch.manual_seed(3)
    W = torch.randn(8, 32)
    steps = torch.ones(32, dtype=torch.long)
    steps[0] = 4
    q = TernaryGIFQuantizer(steps, salient_scale="shared")
    q.prepare(W, torch.eye(32))
    q.fit(0, W)
    assert torch.equal(q.alpha[:, 0], q.alpha[:, 1])


def test_element_granularity_gives_salient_weights_more_steps():
    torch.manual_seed(5)
    W = torch.randn(16, 32)
    steps = torch.ones(16, 32, dtype=torch.long)
    steps[W.abs() > 1.5] = 4                                  # the outliers are salient
    q = TernaryGIFQuantizer(steps, salient_scale="own")
    res = gptq_solve(W, torch.eye(32), q, error_feedback=False)
    codes = res.Q / q.alpha
    assert codes[steps == 1].abs().max() <= 1 and codes[steps == 4].abs().max() > 1
    err = (res.Q - W).abs()
    assert err[steps == 4].mean() < err[steps == 1].mean()


def test_pbllm_keeps_salient_fraction_at_high_bits_and_binarizes_the_rest():
    torch.manual_seed(4)
    X = torch.randn(256, 64)
    H = 2 * X.t() @ X / 256
    W = torch.randn(32, 64)
    U, _ = inverse_hessian_cholesky(H)
    q = PBLLMQuantizer(0.05, 8)
    q.prepare(W, U)
    assert abs(q.mask.float().mean().item() - 0.05) < 0.01
    Q = torch.stack([q.quantize(j, W[:, j]) for j in range(64)], 1)
    for i in range(32):
        low = Q[i][~q.mask[i]]
        assert len(torch.unique(low)) <= 2                      # binarized around the mean
    assert (Q - W)[q.mask].abs().max() < (W.max() - W.min()) / 255   # 8-bit salient weights


def test_quantize_verb_on_real_model_reports_cost(fresh_smollm, data_root):
    from spikellm.data import CalibSpec, calibration_set
    from spikellm.quantize import quantize
    lm = fresh_smollm
    ids = calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 2, 64, 0), data_root)
    before = get_module(blocks_of(lm.model)[0], "mlp.up_proj").weight.clone()
    rep = quantize(lm.model, ids, QuantConfig(method="gptq"),
                   SpikingConfig(mode="ternary", ratio=0.2, steps=3, granularity="column"), progress=False)
    after = get_module(blocks_of(lm.model)[0], "mlp.up_proj").weight
    assert not torch.equal(before, after)
    assert len(rep.stats) == 30 * 7
    assert abs(rep.cost["avg_steps"] - 1.4) < 0.01            # equal steps (1-r) + r*T
    # multiplication-free but for one scale per row and threshold (2 of 576 or 1536 columns)
    assert 0.996 < rep.cost["additive_fraction"] < 1.0
    # ACE: one 1-bit spike x 16-bit activation per step and MAC, plus the two threshold
    # multiplies (16 x 16) per output row
    expect = sum(c.c_out * (c.c_in * c.avg_steps * 16 + 2 * 256) for c in rep.costs)
    assert abs(rep.cost["ace"] - expect) / expect < 1e-6        # float32 sums per layer
    assert all(c.scale_mults == 2 for c in rep.costs)
    assert abs(rep.cost["ace_rel_baseline"] - rep.cost["avg_steps"]) < 0.03
    # storage: 80% ternary codes (log2 3) + 20% 3-step codes (log2 7) + masks + FP16 thresholds
    assert 1.85 < rep.cost["storage_bits"] < 2.0


# resume after a crash, and after a damaged block file: tests/test_store_integrity.py


def _layer(seed=0, c_out=8, c_in=128, n=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c_out, c_in, generator=g)
    X = torch.randn(n, c_in, generator=g) * torch.linspace(0.2, 3, c_in)
    return W, 2 * X.t() @ X / n


def test_grouped_pbllm_and_ternary_equal_per_row_when_the_group_is_the_whole_row():
    from spikellm.quantizers import PBLLMQuantizer, TernaryGIFQuantizer
    W, H = _layer()
    rows = gptq_solve(W, H, PBLLMQuantizer(0.05, 8, 0)).Q
    whole = gptq_solve(W, H, PBLLMQuantizer(0.05, 8, 128)).Q
    grouped = gptq_solve(W, H, PBLLMQuantizer(0.05, 8, 32)).Q
    torch.testing.assert_close(whole, rows, rtol=0, atol=0)
    assert not torch.equal(grouped, rows)
    steps = torch.ones(8, 128, dtype=torch.long)
    steps[:, ::5] = 3
    rows = gptq_solve(W, H, TernaryGIFQuantizer(steps.clone(), 0)).Q
    whole = gptq_solve(W, H, TernaryGIFQuantizer(steps.clone(), 128)).Q
    grouped = gptq_solve(W, H, TernaryGIFQuantizer(steps.clone(), 32)).Q
    torch.testing.assert_close(whole, rows, rtol=0, atol=0)
    assert not torch.equal(grouped, rows)
    # a group has one binarization (mean, a) per row: at most 2 + 2^8 distinct values per row-group
    pq = PBLLMQuantizer(0.05, 8, 32)
    Q = gptq_solve(W, H, pq).Q
    for g0 in range(0, 128, 32):
        low = Q[:, g0:g0 + 32][~pq.mask[:, g0:g0 + 32]].reshape(-1)
        assert low.numel() > 0
    assert all(Q[r, :32][~pq.mask[r, :32]].unique().numel() <= 2 for r in range(8))


def test_storage_bits_of_a_tiny_layer_match_a_hand_count():
    import math

    from spikellm.allocation import storage_bits_per_weight
    from spikellm.quantizers import PBLLMQuantizer, TernaryGIFQuantizer, UniformQuantizer
    W, H = _layer(c_out=4, c_in=64)
    # GPTQ W3 g32 asymmetric: 3-bit codes + an FP16 scale and zero per row and group
    u = UniformQuantizer(3, 32)
    gptq_solve(W, H, u)
    st = u.storage(4, 64)
    assert storage_bits_per_weight(4, 64, st["code_bits"], st["fp16_params"], st["mask_bits"]) == \
        (4 * 64 * 3 + 4 * 2 * 2 * 16) / (4 * 64)                       # 3 + 1 = 4 bits
    # ternary, 8 salient columns x 3 steps, per row: log2 3 / log2 7 codes, 2 thresholds per
    # row, the column mask log2 C(64, 8)
    steps = torch.ones(64, dtype=torch.long)
    steps[:8] = 3
    t = TernaryGIFQuantizer(steps, 0)
    gptq_solve(W, H, t)
    st = t.storage(4, 64)
    hand = 4 * (56 * math.log2(3) + 8 * math.log2(7)) + 4 * 2 * 16 + math.log2(math.comb(64, 8))
    got = storage_bits_per_weight(4, 64, st["code_bits"], st["fp16_params"], st["mask_bits"])
    assert abs(got - hand / 256) < 1e-9 and st["scale_mults"] == 2
    # PB-LLM 5% (13 of 256 weights) at 8 bits, the rest 1 bit; mean, a, scale, zero per row
    p = PBLLMQuantizer(0.05, 8)
    gptq_solve(W, H, p)
    st = p.storage(4, 64)
    k = int(p.mask.sum())
    assert k == 13
    hand = k * 8 + (256 - k) + 4 * 4 * 16 + math.log2(math.comb(256, k))
    got = storage_bits_per_weight(4, 64, st["code_bits"], st["fp16_params"], st["mask_bits"])
    assert abs(got - hand / 256) < 1e-9
