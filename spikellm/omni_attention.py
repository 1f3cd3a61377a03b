"""Quantized attention with spiking K and V, without re-implementing the decoder layer.

transformers' LLaMA-family attention computes Q, K, V (after RoPE) and hands them to a function
from its attention registry. We register one, "spikellm", that quantizes the operands of the two
bilinear products when the attention module carries a `KVQuantizer` (method.md §3.2, §4):

- Q: b bits per token per head (over head_dim), no spiking (`q_bits`: 16 leaves Q unquantized,
  as QuaRot, which quantizes only the KV cache);
- K: b bits, salient (kv-head, channel) pairs with 2 GIF steps, on one of three axes
  (`quant.k_axis`, `K_AXES`):
  * "token" (default, OmniQuant): per token per head over head_dim, dynamic; causal;
  * "channel" (SpikeLLM's official code): per (kv head, channel) over all the tokens of the
    window, dynamic. NON-CAUSAL: a later token changes the range, hence the quantization, of
    every earlier position (and right-padding of a batch enters the ranges);
  * "channel_static": per (kv head, channel) against fixed min/max ranges fitted on the
    calibration set (`StaticRangeActQuantizer`); causal, realizable with a KV cache;
- V: b bits per token per head, salient channels with 2 GIF steps;
- softmax P: unquantized.

On a rotated model (`rotation`: the attention module has `qk_hadamard`), Q and K are first
multiplied by the normalized Hadamard matrix of head_dim after RoPE (QuaRot's Q/K rotation:
Q Kᵀ is unchanged, K is quantized without its outlier channels). K and V ranges may be clipped
(`clip`: [clip·min, clip·max] per token and head, QuaRot's KV clip ratio).

Attention modules without a `kv_quant` attribute run plain eager attention. With
`collect=True` the quantizer accumulates the KV saliency of the full-precision operands instead.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import K_AXES
from .omni_quantizers import GIFActQuantizer, StaticRangeActQuantizer, compute_dtype
from .saliency import kv_saliency

IMPLEMENTATION = "spikellm"

#: the K axes whose ranges use later tokens (K_AXES: all quant.k_axis values)
NON_CAUSAL_K_AXES = ("channel",)


class KVQuantizer(nn.Module):
    """Per-attention-module quantizers and KV saliency; shapes for `kv_heads` heads of `head_dim`.

    `k_axis` (see the module docstring): "token" and "channel" quantize K dynamically
    (`GIFActQuantizer`; "channel" is non-causal), "channel_static" against fitted per-(kv head,
    channel) ranges (`StaticRangeActQuantizer`, fitted with `begin_k_fit`/`end_k_fit`)."""

    def __init__(self, bits: int, kv_heads: int, head_dim: int, k_axis: str = "token",
                 kv_addbit: int = 1, q_bits: int | None = None, clip: float = 1.0):
        """`bits` of K and V; `q_bits` of Q (None: `bits`; 16: Q unquantized); `clip`: the K/V
        clip ratio of the dynamic (token, channel) axes."""
        super().__init__()
        if k_axis not in K_AXES:
            raise ValueError(f"quant.k_axis={k_axis!r} is invalid: must be one of {', '.join(K_AXES)}")
        self.k_axis, self.kv_heads, self.head_dim = k_axis, kv_heads, head_dim
        self.q = GIFActQuantizer(bits if q_bits is None else q_bits, (1,), addbit=0)
        if k_axis == "channel_static":
            self.k = StaticRangeActQuantizer(bits, (kv_heads, 1, head_dim), addbit=kv_addbit)
        else:
            k_shape = (kv_heads, head_dim, 1) if k_axis == "channel" else (kv_heads, 1, head_dim)
            self.k = GIFActQuantizer(bits, k_shape, addbit=kv_addbit, clip=clip)
        self.v = GIFActQuantizer(bits, (kv_heads, 1, head_dim), addbit=kv_addbit, clip=clip)
        self.collect = False
        self._sal = {"k": None, "v": None}
        self._batches = 0

    # -- saliency -----------------------------------------------------------------------------
    def _group(self, s: torch.Tensor) -> torch.Tensor:
        """[heads, d] per query head -> [kv_heads, d], summed over the heads sharing a kv head."""
        return s.reshape(self.kv_heads, -1, self.head_dim).sum(1)

    @torch.no_grad()
    def accumulate(self, query, key_rep, probs, value_rep) -> None:
        """query [b,h,l,d], key_rep/value_rep [b,h,l,d] (repeated to h heads), probs [b,h,l,l]."""
        sk = self._group(kv_saliency(query.float(), key_rep.float().transpose(2, 3), "k"))
        sv = self._group(kv_saliency(probs.float(), value_rep.float(), "v"))
        for name, s in (("k", sk), ("v", sv)):
            self._sal[name] = s if self._sal[name] is None else self._sal[name] + s
        self._batches += 1

    def saliency(self) -> dict[str, torch.Tensor]:
        """{"k": [kv_heads, d], "v": [kv_heads, d]} mean over the collected batches."""
        if not self._batches:
            raise RuntimeError("no KV saliency collected (run the block with collect=True first)")
        return {k: v / self._batches for k, v in self._sal.items()}

    def set_masks(self, k_mask: torch.Tensor, v_mask: torch.Tensor) -> None:
        """k_mask, v_mask [kv_heads, d] bool (True = salient)."""
        self.k.set_salient(k_mask)
        self.v.set_salient(v_mask)
        self._sal, self._batches = {"k": None, "v": None}, 0

    def set_enabled(self, on: bool) -> None:
        for m in (self.q, self.k, self.v):
            m.enabled = on

    @property
    def causal(self) -> bool:
        """False when a position's K quantization depends on later tokens (k_axis="channel")."""
        return self.k_axis not in NON_CAUSAL_K_AXES

    @property
    def static_k(self) -> bool:
        """True when K uses fitted ranges (k_axis="channel_static")."""
        return isinstance(self.k, StaticRangeActQuantizer)

    def begin_k_fit(self) -> None:
        """Start recording K's per-(kv head, channel) min/max (channel_static only)."""
        self.k.begin_fit()

    def end_k_fit(self) -> None:
        """Make the K min/max recorded since `begin_k_fit` the static ranges."""
        self.k.end_fit()

    def cancel_k_fit(self) -> None:
        """Stop recording K and keep the previous static ranges."""
        self.k.cancel_fit()

    # -- quantization -------------------------------------------------------------------------
    def quant_q(self, q: torch.Tensor) -> torch.Tensor:
        return self.q(q)

    def quant_k(self, k: torch.Tensor) -> torch.Tensor:
        """k [b, kv_heads, l, d] (after RoPE) -> fake-quantized k, same shape."""
        if self.k_axis == "channel":   # reduce over the tokens: the window's last dim after transposing
            return self.k(k.transpose(2, 3)).transpose(2, 3)
        return self.k(k)               # token: over d per token; channel_static: fixed [kvh, 1, d] ranges

    def quant_v(self, v: torch.Tensor) -> torch.Tensor:
        return self.v(v)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def spiking_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs):
    """Eager attention with quantized Q, spiking K/V. query [b,h,l,d], key/value [b,kvh,s,d];
    returns (output [b,l,h,d], probs [b,h,l,s])."""
    kvq: KVQuantizer | None = getattr(module, "kv_quant", None)
    n_rep = query.shape[1] // key.shape[1]
    if getattr(module, "qk_hadamard", False):          # rotated model: Q, K in the Hadamard basis
        from .hadamard import hadamard_transform
        query, key = hadamard_transform(query), hadamard_transform(key)
    if kvq is not None and not kvq.collect:
        query, key, value = kvq.quant_q(query), kvq.quant_k(key), kvq.quant_v(value)
    k_rep, v_rep = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, k_rep.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : k_rep.shape[-2]]
    elif query.shape[2] > 1:   # no explicit mask: causal over a full window
        l, s = query.shape[2], k_rep.shape[2]
        causal = torch.ones(l, s, dtype=torch.bool, device=query.device).tril(s - l)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=compute_dtype(scores)).to(query.dtype)
    if kvq is not None and kvq.collect:
        kvq.accumulate(query, k_rep, probs, v_rep)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, v_rep).transpose(1, 2).contiguous()
    return out, probs


def register() -> None:
    """Make `attn_implementation="spikellm"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, spiking_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_spiking_attention(model: nn.Module) -> None:
    """Switch a loaded model to the "spikellm" attention function (eager maths + quantizers)."""
    register()
    model.config._attn_implementation = IMPLEMENTATION
    for sub in (getattr(model.config, "text_config", None),):
        if sub is not None:
            sub._attn_implementation = IMPLEMENTATION
