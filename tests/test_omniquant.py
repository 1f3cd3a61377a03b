"""The OmniQuant pipeline: quantizers, LET exactness, quantized attention, the spike-train path,
masks saved with the weights, training, and the NaN guard. Real SmolLM2-135M blocks and text."""
import pytest
import torch

from spikellm.blockwise import capture_block_inputs, forward_block
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.models import blocks_of, family_of, load_model, resolve_source
from spikellm.omni_attention import KVQuantizer, use_spiking_attention
from spikellm.omni_quantizers import GIFActQuantizer, LWCWeightQuantizer
from spikellm import omniquant as oq


@pytest.fixture()
def model():
    """A fresh copy of the embedded model (tests here replace its modules)."""
    torch.manual_seed(0)
    return load_model(resolve_source("embedded", None))


@pytest.fixture(scope="module")
def text_ids(data_root):
    from spikellm.data import CalibSpec, calibration_set
    lm = load_model(resolve_source("embedded", None))
    # the whole validation text (no dev hold-out): the windows these tests were written on
    return calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 4, 64, 2, dev_fraction=0.0),
                           data_root)


def test_lwc_quantizer_starts_at_0982_of_the_range_and_has_bits_levels():
    w = torch.randn(8, 64)
    wq = LWCWeightQuantizer(3, (8, 64), lwc=True)
    out = wq(w)
    for r in range(8):
        levels = out[r].detach().unique()
        assert levels.numel() <= 8
        # grid step = sigmoid(4) * (max - min) / (2**3 - 1): LWC starts at 0.982 of the range
        step = levels.diff().min()
        assert torch.isclose(step, 0.98201 * (w[r].max() - w[r].min()) / 7, rtol=1e-4)
    wq.salient_cols[:8] = True            # weight spiking: salient columns one bit finer
    assert (wq(w)[:, :8] - w[:, :8]).abs().mean() < (out[:, :8] - w[:, :8]).abs().mean()


def test_gif_act_quantizer_salient_channels_are_finer_over_the_same_range():
    x = torch.randn(4, 16, 32) * torch.linspace(0.1, 3, 32)
    aq = GIFActQuantizer(4, 32, addbit=1)
    plain = aq(x)
    aq.set_salient(torch.arange(32) < 8)
    mixed = aq(x)
    assert torch.equal(mixed[..., 8:], plain[..., 8:])
    assert (mixed[..., :8] - x[..., :8]).abs().mean() < (plain[..., :8] - x[..., :8]).abs().mean()
    aq.bits = 16
    assert torch.equal(aq(x), x)


def test_spike_train_path_equals_fake_quant_except_top_codes():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 16)
    ql = oq.QuantLinear(lin, GIFActQuantizer(4, 64, addbit=2))
    ql.act_quant.set_salient(torch.arange(64) % 7 == 0)
    x = torch.randn(3, 20, 64)
    fake, spike = ql(x), ql.spike_forward(x)
    # tokens whose salient codes exceed 2**a * (L-1) = 60 are clipped in the spike form
    from spikellm.gif import integer_codes, per_token_params
    s, z = per_token_params(x, 6)
    codes = integer_codes(x, s, z, 63)[..., ql.act_quant.salient]
    clean = (codes <= 60).all(-1)
    assert clean.sum() > 10 and (~clean).sum() > 0
    assert torch.allclose(fake[clean], spike[clean], atol=1e-4)
    assert not torch.allclose(fake[~clean], spike[~clean], atol=1e-4)


def test_let_is_an_exact_equivalence_on_a_real_block_and_folds(model, text_ids):
    from test_families import assert_let_is_exact
    assert_let_is_exact(model.model, text_ids[:2])


def test_spiking_attention_without_quantizers_equals_the_stock_attention(model, text_ids):
    m = model.model
    ref = m(text_ids[:2]).logits
    use_spiking_attention(m)
    assert torch.allclose(m(text_ids[:2]).logits, ref, atol=1e-3)


def test_kv_quantizer_axes():
    # square [tokens = head_dim = 8] so that transposing swaps the two axes exactly
    k = torch.randn(2, 3, 8, 8) * torch.linspace(0.1, 5, 8)      # channel scales differ
    by_channel = KVQuantizer(4, 3, 8, "channel").quant_k(k)
    by_token = KVQuantizer(4, 3, 8, "token").quant_k(k)
    assert by_channel.shape == k.shape
    # per channel over tokens == per token quantization of the transposed operand
    transposed = KVQuantizer(4, 3, 8, "token").quant_k(k.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(by_channel, transposed)
    # each (head, channel) column over tokens takes at most 16 levels, and the axes differ
    assert all(by_channel[0, 0, :, c].unique().numel() <= 16 for c in range(8))
    assert not torch.allclose(by_channel, by_token)
    # per-channel ranges follow the channels' scales: smaller error on the small channels
    err = (by_channel - k).abs().mean(dim=(0, 1, 2))
    assert err[0] < err[-1]


@pytest.mark.parametrize("k_axis", ["channel", "token"])
def test_omniquant_w4a4_spiking_trains_saves_masks_and_reloads(model, text_ids, k_axis):
    m = model.model
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=2, k_axis=k_axis)
    s = SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)
    with torch.no_grad():
        fp_logits = m(text_ids[:1]).logits
    stats, params = oq.omniquant(m, text_ids, q, s, progress=False)
    assert len(stats) == len(blocks_of(m))
    # training lowers the first block's loss over its epochs
    assert params["0.epoch_loss"][-1] < params["0.epoch_loss"][0]
    # masks: 10% of each linear's input channels, 10% of the K and V channels
    ql = blocks_of(m)[3].self_attn.q_proj
    assert int(ql.act_quant.salient.sum()) == round(0.1 * ql.in_features)
    assert int(blocks_of(m)[3].self_attn.kv_quant.k.salient.sum()) == round(0.1 * 3 * 64)
    with torch.no_grad():
        logits = m(text_ids[:1]).logits
    assert not torch.allclose(logits, fp_logits, atol=1e-2)
    # the state dict carries the masks (bug B1): a fresh model loads it and scores the same
    fresh = load_model(resolve_source("embedded", None)).model
    oq.wrap_for_inference(fresh, q, s)
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(text_ids[:1]).logits, logits)


def test_non_finite_training_loss_fails_with_a_clear_message(model, text_ids):
    with pytest.raises(ValueError, match="quant.let_lr=nan is invalid"):
        QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, let_lr=float("nan"))
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1)
    q.let_lr = float("nan")        # past the config's check: the training loop's own guard
    with pytest.raises(FloatingPointError, match="quant.nan_policy"):
        oq.omniquant(model.model, text_ids[:2], q, SpikingConfig(), progress=False)


def test_resume_after_a_crash_equals_an_uninterrupted_run(text_ids, tmp_path, monkeypatch):
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1)
    s = SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)
    ids = text_ids[:2, :32]
    ref_model = load_model(resolve_source("embedded", None)).model
    oq.omniquant(ref_model, ids, q, s, progress=False)
    ref = ref_model.state_dict()

    real = oq._train_block

    def crash_in_block_3(block, linears, let, q_in, fp_out, qc, i, *a, **kw):
        if i == 3:
            raise KeyboardInterrupt("killed")            # like a SIGKILL mid-block
        return real(block, linears, let, q_in, fp_out, qc, i, *a, **kw)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(oq, "_train_block", crash_in_block_3)
    with pytest.raises(KeyboardInterrupt):
        oq.omniquant(load_model(resolve_source("embedded", None)).model, ids, q, s, progress=False,
                     checkpoint_dir=ckpt)
    assert len(list(ckpt.glob("block-*.pt"))) == 3       # blocks 0..2 committed
    monkeypatch.setattr(oq, "_train_block", real)
    trained = []
    monkeypatch.setattr(oq, "_train_block", lambda *a, **kw: trained.append(a[6]) or real(*a, **kw))
    resumed = load_model(resolve_source("embedded", None)).model      # a fresh process
    oq.omniquant(resumed, ids, q, s, progress=False, checkpoint_dir=ckpt)
    assert trained[0] == 3 and len(trained) == len(blocks_of(resumed)) - 3
    state = resumed.state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------ K axes and causality

def _quantized(k_axis: str, ids: torch.Tensor, epochs: int = 0, **kw):
    """A fresh embedded model quantized W4A4 with t2 spiking and the given K axis."""
    m = load_model(resolve_source("embedded", None)).model
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=epochs, k_axis=k_axis, **kw)
    s = SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)
    oq.omniquant(m, ids, q, s, progress=False)
    return m, q, s


@pytest.mark.parametrize("k_axis,causal", [("token", True), ("channel_static", True), ("channel", False)])
def test_a_later_token_never_changes_earlier_positions_except_with_per_channel_k(text_ids, k_axis, causal):
    m, q, s = _quantized(k_axis, text_ids[:2, :32])
    x = text_ids[2:3, :48]
    y = x.clone()
    y[0, 40:] = (y[0, 40:] + 17) % 1000                  # other tokens from position 40 on
    with torch.no_grad():
        a, b = m(x).logits[0], m(y).logits[0]
    early = (a[:40] - b[:40]).abs().max().item()
    if causal:
        assert early <= 1e-5
    else:                                                # SpikeLLM's per-channel K: non-causal
        assert early > 1e-2
    assert (a[40:] - b[40:]).abs().max() > 1e-2         # the changed positions do change
    if k_axis == "channel_static":
        # fitted ranges are buffers: a fresh model restores them from the state dict
        fresh = load_model(resolve_source("embedded", None)).model
        oq.wrap_for_inference(fresh, q, s)
        with pytest.raises(RuntimeError, match="never fitted"):
            fresh(x)
        fresh.load_state_dict(m.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(fresh(x).logits[0], a)


def test_static_range_quantizer_clamps_and_spikes_over_the_fitted_range():
    from spikellm.omni_quantizers import StaticRangeActQuantizer
    torch.manual_seed(0)
    sq = StaticRangeActQuantizer(4, (3, 1, 8), addbit=1)       # K [b, kv_heads=3, l, d=8]
    calib = torch.randn(2, 3, 20, 8) * torch.linspace(0.5, 4, 8)
    sq.begin_fit()
    for half in calib.split(10, dim=2):                     # two forwards: the ranges accumulate
        assert torch.equal(sq(half), half)                  # nothing to quantize with yet
    sq.end_fit()
    torch.testing.assert_close(sq.xmin, calib.amin(dim=(0, 2), keepdim=True)[0])
    torch.testing.assert_close(sq.xmax, calib.amax(dim=(0, 2), keepdim=True)[0])
    out = sq(calib)
    assert all(out[:, h, :, c].unique().numel() <= 16 for h in range(3) for c in range(8))
    # a value beyond the range clamps to the top code, within one grid step of the range's end
    big = calib.clone()
    big[0, 0, 0, 0] = 100.0
    step = (sq.xmax - sq.xmin)[0, 0, 0] / 15
    assert sq(big)[0, 0, 0, 0] == sq(torch.full_like(big, 1e3))[0, 0, 0, 0]
    assert sq(big)[0, 0, 0, 0] <= sq.xmax[0, 0, 0] + step
    # salient (head, channel) pairs: bits+1 over the same range, the rest unchanged
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :2] = True
    sq.set_salient(mask)
    mixed = sq(calib)
    assert torch.equal(mixed[..., 2:], out[..., 2:])
    assert (mixed[..., :2] - calib[..., :2]).abs().mean() < (out[..., :2] - calib[..., :2]).abs().mean()


def test_static_k_ranges_are_refitted_on_the_folded_block(text_ids, monkeypatch):
    """The saved ranges are those of the final (folded) block's K on its calibration inputs,
    not the ones fitted before training."""
    ids = text_ids[:2, :32]
    first = {}
    real = oq.fit_k_ranges

    def spy(block, spec, inputs, batch_size=8):
        done = real(block, spec, inputs, batch_size)
        kvq = block.self_attn.kv_quant
        first.setdefault(id(block), (kvq.k.xmin.clone(), kvq.k.xmax.clone()))
        return done

    monkeypatch.setattr(oq, "fit_k_ranges", spy)
    m, _, _ = _quantized("channel_static", ids, epochs=1)
    block = blocks_of(m)[0]
    kvq = block.self_attn.kv_quant
    saved = kvq.k.xmin.clone(), kvq.k.xmax.clone()
    assert torch.isfinite(saved[0]).all() and (saved[0] < saved[1]).all()
    inputs = capture_block_inputs(m, family_of(m), ids)     # block 0's inputs: the embeddings
    real(block, family_of(m), inputs)
    assert torch.equal(kvq.k.xmin, saved[0]) and torch.equal(kvq.k.xmax, saved[1])
    assert not torch.equal(first[id(block)][1], saved[1])   # training moved K: the refit matters


# ------------------------------------------------------------------------------ OmniQuant's recipe

def test_aug_loss_adds_the_mse_to_the_fp_block_on_the_quantized_inputs(model, text_ids):
    m = model.model
    spec = family_of(m)
    fp_in = capture_block_inputs(m, spec, text_ids[:2, :32])
    q_in = type(fp_in)(hidden=fp_in.hidden + 0.02 * torch.randn_like(fp_in.hidden), kwargs=fp_in.kwargs)
    block = blocks_of(m)[1]
    with torch.no_grad():
        fp_out = forward_block(block, fp_in)            # the targets
        fp_aug = forward_block(block, q_in)             # OmniQuant's fp_inps_2
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, let=False, train_batch=2)
    linears = oq.wrap_block(block, spec, q, SpikingConfig())
    with torch.no_grad():
        out = forward_block(block, q_in)
    by_hand = ((out - fp_out) ** 2).mean() + ((out - fp_aug) ** 2).mean()
    torch.testing.assert_close(oq.block_loss(out, fp_out, fp_aug), by_hand)
    torch.testing.assert_close(oq.block_loss(out, fp_out), ((out - fp_out) ** 2).mean())
    # one training step (2 samples, one batch): the loss it logs is the augmented one, and the
    # LWC factors it reaches differ from the plain loss's
    start = {k: v.clone() for k, v in block.state_dict().items() if "bound_factor" in k}
    hist_aug = oq._train_block(block, linears, None, q_in, fp_out, q, 1, False, None, fp_aug=fp_aug)
    after_aug = {k: v.clone() for k, v in block.state_dict().items() if "bound_factor" in k}
    block.load_state_dict(start, strict=False)
    hist = oq._train_block(block, linears, None, q_in, fp_out, q, 1, False, None)
    after = {k: v for k, v in block.state_dict().items() if "bound_factor" in k}
    assert hist_aug[0] == pytest.approx(by_hand.item(), rel=1e-5)
    assert hist[0] == pytest.approx(((out - fp_out) ** 2).mean().item(), rel=1e-5)
    assert any(not torch.equal(after_aug[k], after[k]) for k in after)


class _Stop(Exception):
    pass


def test_omniquant_passes_the_fp_block_on_quantized_inputs_with_aug_loss(text_ids, monkeypatch):
    seen = []
    real = oq._train_block

    def spy(block, linears, let, q_in, fp_out, q, i, *a, fp_aug=None, **kw):
        seen.append((fp_out, fp_aug))
        if i == 1:
            raise _Stop
        return real(block, linears, let, q_in, fp_out, q, i, *a, fp_aug=fp_aug, **kw)

    monkeypatch.setattr(oq, "_train_block", spy)
    for aug in (False, True):
        seen.clear()
        m = load_model(resolve_source("embedded", None)).model
        q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, aug_loss=aug)
        with pytest.raises(_Stop):
            oq.omniquant(m, text_ids[:2, :32], q, SpikingConfig(), progress=False)
        if not aug:
            assert all(a is None for _, a in seen)
            continue
        # block 0: the quantized prefix is empty, so fp_aug is the target; block 1: it is not
        assert torch.equal(seen[0][1], seen[0][0])
        assert seen[1][1].shape == seen[1][0].shape and not torch.allclose(seen[1][1], seen[1][0])


def test_lwc_zero_point_passes_no_gradient():
    """OmniQuant rounds the LWC zero point with a plain round(): the gradient w.r.t. the LWC
    factors is the one with the zero point detached (not a straight-through one)."""
    from spikellm.gif import fake_quant, round_ste
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    wq = LWCWeightQuantizer(3, (16, 64), lwc=True)
    with torch.no_grad():
        wq.upbound_factor.add_(torch.randn_like(wq.upbound_factor))
        wq.lowbound_factor.add_(torch.randn_like(wq.lowbound_factor))
    target = torch.randn(16, 64)

    def grads(zero_fn):
        ub = wq.upbound_factor.detach().clone().requires_grad_()
        lb = wq.lowbound_factor.detach().clone().requires_grad_()
        wmax = torch.sigmoid(ub) * w.amax(-1, keepdim=True)
        wmin = torch.sigmoid(lb) * w.amin(-1, keepdim=True)
        scale = ((wmax - wmin) / 7).clamp(min=1e-5, max=1e4)
        out = fake_quant(w, scale, zero_fn(-wmin / scale).clamp(-1e4, 1e4), 7)
        ((out - target) ** 2).sum().backward()
        return ub.grad, lb.grad

    ((wq(w) - target) ** 2).sum().backward()
    detached = grads(lambda z: z.round().detach())
    torch.testing.assert_close(wq.upbound_factor.grad, detached[0])
    torch.testing.assert_close(wq.lowbound_factor.grad, detached[1])
    ste = grads(round_ste)                                # the former, straight-through zero point
    assert not torch.allclose(wq.lowbound_factor.grad, ste[1])
