"""The Generalized Integrate-and-Fire (GIF) neuron, in its fake-quant and explicit spike forms.

A GIF neuron with L levels emits per step an integer spike s(t) in {0..L-1} with soft reset
(the membrane keeps what was not emitted). T binary IF steps merged L at a time give T/L GIF
steps of log2 L bits: a spike train of (T/L)*log2 L bits. One GIF step is ordinary uniform
quantization; `steps` GIF steps of L levels over one per-token range equal a finer uniform
quantizer of log2(steps*(L-1)+1) levels (SpikeLLM uses the (b+a)-bit quantizer with
steps = 2**a; the spike form can represent codes only up to steps*(L-1), method.md §2.3).

The ternary (bi-directional) GIF used for weights emits s(t) in {-1, 0, +1}; T steps of one
threshold alpha form the symmetric (2T+1)-level quantizer alpha * {-T..T}.
"""
from __future__ import annotations

import math

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (d round(x)/dx := 1)."""
    return (x.round() - x).detach() + x


def gif_bits(binary_steps: int, levels: int) -> float:
    """Spike-train length in bits of T binary IF steps merged into GIF steps of L levels: (T/L)*log2 L."""
    if binary_steps <= 0 or levels < 2:
        raise ValueError("binary_steps must be > 0 and levels >= 2")
    return binary_steps / levels * math.log2(levels)


# ----------------------------------------------------------------------------- activations

def range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one asymmetric affine grid of the activation, KV and LWC weight quantizers: the
    range [xmin, xmax] on 2**bits levels -> (scale, zero point), both shaped like xmin/xmax.
    The zero point is rounded without a gradient, as OmniQuant's quantizer does. (The GPTQ
    family's `quantizers.UniformQuantizer` keeps GPTQ's own find_params: the range always
    includes 0 and the scale is unclamped, bit-equal to the reference solver.)"""
    scale = ((xmax - xmin) / (2 ** bits - 1)).clamp(min=1e-5, max=1e4)
    zero = (-xmin / scale).clamp(-1e4, 1e4).round()
    return scale, zero


def per_token_params(x: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max range over the last dim: x [..., C] -> scale, zero_point [..., 1].
    `clip` < 1 shrinks the range to [clip·min, clip·max] (QuaRot's clip ratio; values outside
    clamp to the end codes)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if clip != 1.0:
        lo, hi = lo * clip, hi * clip
    return range_params(lo, hi, bits)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Uniform affine fake quantization with STE rounding: codes clamp(round(x/scale)+zero, 0, qmax)."""
    q = (round_ste(x / scale) + zero).clamp(0, qmax)
    return (q - zero) * scale


def integer_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes (no gradient) of the same quantizer as `fake_quant`."""
    return (torch.round(x / scale) + zero).clamp(0, qmax)


def spike_train(codes: torch.Tensor, levels: int, steps: int) -> torch.Tensor:
    """Explicit GIF firing: the membrane starts at the integer charge `codes`; each of `steps`
    steps emits s = min(mem, L-1) and soft-resets mem -= s. Returns spikes [steps, *codes.shape],
    each in {0..L-1}. Charges above steps*(L-1) are clipped (the documented top-code loss)."""
    mem = codes.clone()
    out = []
    for _ in range(steps):
        s = torch.clamp(mem, max=levels - 1)
        out.append(s)
        mem = mem - s
    return torch.stack(out)


def gif_fake_quant(x: torch.Tensor, bits: int, salient: torch.Tensor | None = None,
                   addbit: int = 1, clip: float = 1.0) -> torch.Tensor:
    """SpikeLLM activation GIF (fake-quant form): per-token asymmetric `bits` on normal
    channels, `bits+addbit` (2**addbit GIF steps) on salient channels over the same range
    ([clip·min, clip·max] per token, `per_token_params`).

    x [..., C]; salient: bool [C] or None.
    """
    scale, zero = per_token_params(x, bits, clip)
    xq = fake_quant(x, scale, zero, 2 ** bits - 1)
    if salient is None or not bool(salient.any()):
        return xq
    hb = bits + addbit
    hscale, hzero = per_token_params(x, hb, clip)
    xh = fake_quant(x, hscale, hzero, 2 ** hb - 1)
    return torch.where(salient, xh, xq)


def gif_spike_decode(x: torch.Tensor, bits: int, addbit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spike form of the salient-channel quantizer: (decoded x_hat, spikes [2**addbit, ...]).

    Decoding is Δ_high * (Σ_t s_t − z_high); equal to `fake_quant` at bits+addbit except for
    codes above 2**addbit * (2**bits − 1)."""
    hb = bits + addbit
    scale, zero = per_token_params(x, hb)
    codes = integer_codes(x, scale, zero, 2 ** hb - 1)
    spikes = spike_train(codes, 2 ** bits, 2 ** addbit)
    return (spikes.sum(0) - zero) * scale, spikes


# ----------------------------------------------------------------------------- ternary weights

def ternary_codes(w: torch.Tensor, alpha: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """(2T+1)-level symmetric codes clip(round(w/alpha), -T, T); alpha broadcasts against w."""
    t = torch.as_tensor(steps, dtype=w.dtype, device=w.device)
    return torch.maximum(torch.minimum(torch.round(w / alpha), t), -t)


def ternary_quant(w: torch.Tensor, alpha: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """Fake-quant form of a T-step ternary GIF: alpha * clip(round(w/alpha), -T, T)."""
    return alpha * ternary_codes(w, alpha, steps)


def ternary_spike_train(w: torch.Tensor, alpha: torch.Tensor, steps: int) -> torch.Tensor:
    """Explicit bi-directional GIF: the membrane starts at w/alpha; each step fires +1 when
    mem >= 1/2, -1 when mem <= -1/2, else 0, and soft-resets mem -= s. Returns spikes
    [steps, *w.shape] in {-1, 0, +1}; alpha * Σ_t s_t equals `ternary_quant`
    (ties at exactly k+1/2 aside)."""
    mem = w / alpha
    out = []
    for _ in range(steps):
        s = (mem >= 0.5).to(w.dtype) - (mem <= -0.5).to(w.dtype)
        out.append(s)
        mem = mem - s
    return torch.stack(out)
