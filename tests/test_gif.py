import math

import pytest
import torch

from spikellm.gif import (fake_quant, gif_bits, gif_fake_quant, gif_spike_decode, integer_codes,
                          per_token_params, spike_train, ternary_quant, ternary_spike_train)


def test_gif_bit_count_follows_T_over_L_log2_L():
    assert gif_bits(16, 16) == 4.0            # one GIF step of 16 levels = 4-bit quantization
    assert gif_bits(32, 16) == 8.0            # two steps of 4 bits
    assert gif_bits(8, 2) == 4.0              # binary IF: 1 bit per step
    assert math.isclose(gif_bits(12, 4), 6.0)


@pytest.mark.parametrize("bits,addbit", [(4, 1), (4, 2), (3, 1), (2, 3)])
def test_spike_train_equals_fake_quant_on_every_representable_code(bits, addbit):
    L, T = 2 ** bits, 2 ** addbit
    codes = torch.arange(0, T * (L - 1) + 1, dtype=torch.float32)   # every representable charge
    spikes = spike_train(codes, L, T)
    assert spikes.shape == (T, codes.numel())
    assert spikes.min() >= 0 and spikes.max() <= L - 1               # multi-level spikes
    assert torch.equal(spikes.sum(0), codes)


def test_top_codes_are_clipped_as_documented():
    # b=4, a=1: only code 31 is lost (-> 30); b=4, a=2: codes 61..63 -> 60 (method.md §2.3)
    s = spike_train(torch.arange(32.0), 16, 2).sum(0)
    assert torch.equal(s[:31], torch.arange(31.0)) and s[31] == 30
    s = spike_train(torch.arange(64.0), 16, 4).sum(0)
    assert torch.equal(s[:61], torch.arange(61.0)) and torch.equal(s[61:], torch.full((3,), 60.0))


def test_spike_decode_equals_high_bit_fake_quant_except_top_codes():
    torch.manual_seed(0)
    x = torch.randn(64, 128) * 3
    xhat, spikes = gif_spike_decode(x, 4, 1)
    scale, zero = per_token_params(x, 5)
    fq = fake_quant(x, scale, zero, 31)
    codes = integer_codes(x, scale, zero, 31)
    ok = codes <= 30
    assert ok.float().mean() > 0.9
    torch.testing.assert_close(xhat[ok], fq[ok])
    # the clipped top code decodes one step below the fake-quant value
    torch.testing.assert_close((fq - xhat)[~ok], scale.expand_as(x)[~ok])


def test_salient_channels_get_finer_steps_over_the_same_range():
    torch.manual_seed(1)
    x = torch.randn(32, 64)
    sal = torch.zeros(64, dtype=torch.bool)
    sal[:8] = True
    y = gif_fake_quant(x, 4, sal, addbit=2)
    err_sal = (y - x)[:, :8].abs().mean()
    err_norm = (y - x)[:, 8:].abs().mean()
    assert err_sal < err_norm / 2.5           # 4x finer steps on salient channels
    torch.testing.assert_close(y[:, 8:], gif_fake_quant(x, 4)[:, 8:])


def test_ste_gradient_passes_through_rounding():
    x = torch.randn(4, 16, requires_grad=True)
    gif_fake_quant(x, 4).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_ternary_gif_is_symmetric_2T_plus_1_level_quantizer(T):
    torch.manual_seed(T)
    w = torch.randn(256, 64) * 0.1
    alpha = torch.full((256, 1), 0.04)
    q = ternary_quant(w, alpha, T)
    levels = torch.unique(torch.round(q / alpha))
    assert levels.min() >= -T and levels.max() <= T
    assert set(levels.tolist()) == set(range(-T, T + 1))     # all 2T+1 levels used here
    spikes = ternary_spike_train(w, alpha, T)
    assert set(torch.unique(spikes).tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(alpha * spikes.sum(0), q)
