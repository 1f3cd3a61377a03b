"""The OmniQuant pipeline: quantizers, LET exactness, quantized attention, the spike-train path,
masks saved with the weights, training, and the NaN guard. Real SmolLM2-135M blocks and text."""
import pytest
import torch

from spikellm.blockwise import capture_block_inputs, forward_block
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.let import LETParams
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
    return calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 4, 64, 2), data_root)


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
    m = model.model
    spec = family_of(m)
    inputs = capture_block_inputs(m, spec, text_ids[:2])
    block = blocks_of(m)[0]
    ref = forward_block(block, inputs)
    q = QuantConfig(method="omniquant", wbits=16, abits=16)
    linears = oq.wrap_block(block, spec, q, SpikingConfig())
    heads, kv_heads, head_dim = oq._attn_shape(block)
    let = LETParams(linears["self_attn.q_proj"].in_features, heads, kv_heads, head_dim)
    with torch.no_grad():
        for p in let.parameters():
            p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    oq._attach_let(linears, let)
    on_the_fly = forward_block(block, inputs)
    oq._finalize(block, linears, let)
    folded = forward_block(block, inputs)
    tol = 1e-5 * ref.abs().max()
    assert (on_the_fly - ref).abs().max() < tol and (folded - ref).abs().max() < tol


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
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, let_lr=float("nan"))
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
