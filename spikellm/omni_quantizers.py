"""Fake quantizers of the OmniQuant pipeline, with straight-through rounding (method.md §2.4, §4).

- `GIFActQuantizer`: per-token asymmetric dynamic activations; the salient channels of a fixed
  boolean mask get 2**addbit GIF steps, i.e. a (bits+addbit)-bit quantizer over the same
  per-token range (SpikeLLM's `fake_binary_simulate`).
- `LWCWeightQuantizer`: per-output-channel (or per-group) asymmetric weights with OmniQuant's
  learnable weight clipping (LWC): range [σ(lb)·min, σ(ub)·max], lb = ub = 4 at the start
  (0.982 of the full range). Salient input columns (weight spiking, W2A8/W2A16) get
  2**addbit GIF steps over the same clipped range.

Both quantizers hold only their masks and LWC parameters; `bits >= 16` disables them.
"""
from __future__ import annotations

import torch
from torch import nn

from .gif import fake_quant, gif_fake_quant, round_ste

#: OmniQuant's initial LWC logit: sigmoid(4) = 0.982 of the min/max range
LWC_INIT = 4.0


class GIFActQuantizer(nn.Module):
    """x [..., C] -> fake-quantized x. `salient`: bool buffer of `mask_shape`, broadcast
    against x ([C] for a linear input; all False = plain b-bit).

    The reduction axis is always the last one: pass a transposed view to quantize over another
    axis (K per channel over tokens, method.md §3.2, with mask shape [heads, d, 1])."""

    def __init__(self, bits: int, mask_shape: int | tuple[int, ...], addbit: int = 1):
        super().__init__()
        self.bits, self.addbit = int(bits), int(addbit)
        self.register_buffer("salient", torch.zeros(mask_shape, dtype=torch.bool))
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 16

    def set_salient(self, mask: torch.Tensor) -> None:
        self.salient.copy_(mask.reshape(self.salient.shape).to(self.salient.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        dtype = x.dtype
        out = gif_fake_quant(x.float(), self.bits, self.salient, self.addbit)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, addbit={self.addbit}, salient={int(self.salient.sum())}/{self.salient.numel()}"


class LWCWeightQuantizer(nn.Module):
    """W [C_out, C_in] -> fake-quantized W, asymmetric, one range per row (group_size 0) or per
    `group_size` columns of a row, clipped by learnable σ(lb), σ(ub) when `lwc`.

    `salient_cols` [C_in] bool: columns quantized with bits+addbit over the same range."""

    def __init__(self, bits: int, shape: tuple[int, int], group_size: int = 0, lwc: bool = True,
                 addbit: int = 1):
        super().__init__()
        rows, cols = shape
        if group_size and cols % group_size:
            raise ValueError(f"quant.group_size={group_size} does not divide {cols} input columns")
        self.bits, self.group_size, self.addbit = int(bits), int(group_size), int(addbit)
        n_ranges = rows * (cols // group_size) if group_size else rows
        self.lwc = lwc
        if lwc:
            self.upbound_factor = nn.Parameter(torch.full((n_ranges, 1), LWC_INIT))
            self.lowbound_factor = nn.Parameter(torch.full((n_ranges, 1), LWC_INIT))
        self.register_buffer("salient_cols", torch.zeros(cols, dtype=torch.bool))
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 16

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1, self.group_size) if self.group_size else w

    def _quant(self, wg: torch.Tensor, bits: int) -> torch.Tensor:
        wmax, wmin = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
        if self.lwc:
            wmax = torch.sigmoid(self.upbound_factor) * wmax
            wmin = torch.sigmoid(self.lowbound_factor) * wmin
        qmax = 2 ** bits - 1
        scale = ((wmax - wmin) / qmax).clamp(min=1e-5, max=1e4)
        zero = round_ste(-wmin / scale).clamp(-1e4, 1e4)
        return fake_quant(wg, scale, zero, qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        dtype, shape = w.dtype, w.shape
        wg = self._grouped(w.float())
        out = self._quant(wg, self.bits).reshape(shape)
        if bool(self.salient_cols.any()):
            high = self._quant(wg, self.bits + self.addbit).reshape(shape)
            out = torch.where(self.salient_cols[None, :], high, out)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, group_size={self.group_size}, lwc={self.lwc}, "
                f"salient_cols={int(self.salient_cols.sum())}")
