"""Fake quantizers of the OmniQuant pipeline, with straight-through rounding (method.md §2.4, §4).

- `GIFActQuantizer`: per-token asymmetric dynamic activations; the salient channels of a fixed
  boolean mask get 2**addbit GIF steps, i.e. a (bits+addbit)-bit quantizer over the same
  per-token range (SpikeLLM's `fake_binary_simulate`).
- `StaticRangeActQuantizer`: activations against fixed per-channel ranges (min/max buffers)
  fitted on calibration data, salient channels with 2**addbit GIF steps over the same range;
  values outside the range clamp. Causal (no statistic is taken at inference), used for K with
  `quant.k_axis=channel_static`.
- `LWCWeightQuantizer`: per-output-channel (or per-group) asymmetric weights with OmniQuant's
  learnable weight clipping (LWC): range [σ(lb)·min, σ(ub)·max], lb = ub = 4 at the start
  (0.982 of the full range). Salient input columns (weight spiking, W2A8/W2A16) get
  2**addbit GIF steps over the same clipped range.

The quantizers hold only their masks, ranges and LWC parameters; `bits >= 16` disables them.
"""
from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from .gif import fake_quant, gif_fake_quant, integer_codes, per_token_params, range_params, spike_train

#: OmniQuant's initial LWC logit: sigmoid(4) = 0.982 of the min/max range
LWC_INIT = 4.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype quantizers compute in: float32, or float64 for float64 inputs (a float64 model
    then has no float32 rounding that could flip a quantization code, e.g. between batch shapes)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class SpikeCodes:
    """What an activation quantizer's GIF neurons fire on an input x [..., C] (inference): the
    normal channels' codes `lo` (one step of `levels` levels: the spike is the code), the salient
    channels' (b+a)-bit codes `hi` (charges fired over `steps` GIF steps, `gif.spike_train`),
    each with its per-token (or per-range) scale and zero point; `salient` broadcast to x."""
    lo: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    salient: torch.Tensor
    hi: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    levels: int
    steps: int

    def spikes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normal channels' spikes [..., C] (0 on salient channels), the salient channels'
        spike train [steps, ..., C] (0 on normal channels) or None)."""
        normal = torch.where(self.salient, torch.zeros_like(self.lo), self.lo)
        if self.hi is None:
            return normal, None
        charge = torch.where(self.salient, self.hi[0], torch.zeros_like(self.hi[0]))
        return normal, spike_train(charge, self.levels, self.steps)


class GIFActQuantizer(nn.Module):
    """x [..., C] -> fake-quantized x. `salient`: bool buffer of `mask_shape`, broadcast
    against x ([C] for a linear input; all False = plain b-bit). `clip` in (0, 1]: the range
    per token is [clip·min, clip·max] (QuaRot's activation clip ratio; 1 = min-max).

    The reduction axis is always the last one: pass a transposed view to quantize over another
    axis (K per channel over tokens, method.md §3.2, with mask shape [heads, d, 1])."""

    def __init__(self, bits: int, mask_shape: int | tuple[int, ...], addbit: int = 1,
                 clip: float = 1.0):
        super().__init__()
        self.bits, self.addbit, self.clip = int(bits), int(addbit), float(clip)
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
        out = gif_fake_quant(x.to(compute_dtype(x)), self.bits, self.salient, self.addbit, self.clip)
        return out.to(dtype)

    @torch.no_grad()
    def spike_codes(self, x: torch.Tensor) -> "SpikeCodes":
        """The integer charges the GIF neurons of input x [..., C] start from (`SpikeCodes`):
        the b-bit codes of the normal channels, the (b+a)-bit codes of the salient ones (fired
        as 2**addbit GIF steps of 2**b levels), with their per-token scales and zero points."""
        xf = x.to(compute_dtype(x))
        sal = self.salient.expand_as(xf)
        scale, zero = per_token_params(xf, self.bits, self.clip)
        lo = integer_codes(xf, scale, zero, 2 ** self.bits - 1)
        hi = None
        if bool(self.salient.any()):
            hb = self.bits + self.addbit
            hscale, hzero = per_token_params(xf, hb, self.clip)
            hi = (integer_codes(xf, hscale, hzero, 2 ** hb - 1), hscale, hzero)
        return SpikeCodes(lo, scale, zero, sal, hi, 2 ** self.bits, 2 ** self.addbit)

    def extra_repr(self) -> str:
        clip = f", clip={self.clip:g}" if self.clip != 1.0 else ""
        return f"bits={self.bits}, addbit={self.addbit}{clip}, salient={int(self.salient.sum())}/{self.salient.numel()}"


class StaticRangeActQuantizer(nn.Module):
    """x [..., C] -> fake-quantized x against fixed ranges `xmin`, `xmax` (buffers of
    `range_shape`, broadcast against x; e.g. [kv_heads, 1, head_dim] for K [b, kv_heads, l, d]:
    one range per (kv head, channel)). `salient`: bool buffer of the same shape, those channels
    get bits+addbit (2**addbit GIF steps) over the same range. Values outside a range clamp.

    Ranges are fitted, not computed per input, so a position's quantization never depends on
    other positions (causal). Fitting: `begin_fit()`, forwards over calibration data (each
    records the running min/max over every axis where `range_shape` is 1), `end_fit()`.
    During a fit the forward returns x unquantized until a first range exists, and quantizes
    with the previous range afterwards (a refit while training keeps the trained path)."""

    def __init__(self, bits: int, range_shape: tuple[int, ...], addbit: int = 1):
        super().__init__()
        self.bits, self.addbit = int(bits), int(addbit)
        self.register_buffer("salient", torch.zeros(range_shape, dtype=torch.bool))
        # +inf/-inf: "never fitted" (a fresh `wrap_for_inference` module before load_state_dict)
        self.register_buffer("xmin", torch.full(range_shape, float("inf")))
        self.register_buffer("xmax", torch.full(range_shape, float("-inf")))
        self.enabled = True
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fitting = False

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 16

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.xmin).all() and torch.isfinite(self.xmax).all())

    def set_salient(self, mask: torch.Tensor) -> None:
        self.salient.copy_(mask.reshape(self.salient.shape).to(self.salient.device))

    # -- fitting --------------------------------------------------------------------------------
    def begin_fit(self) -> None:
        """Start recording the min/max of every forward input (the previous range stays in use)."""
        self.fitting, self._seen = True, None

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        """Update the running min/max with x [..., C], reduced to `range_shape`."""
        shape = self.xmin.shape
        lead = x.dim() - len(shape)
        dims = tuple(range(lead)) + tuple(lead + j for j, n in enumerate(shape) if n == 1)
        lo = x.detach().float().amin(dim=dims).reshape(shape)
        hi = x.detach().float().amax(dim=dims).reshape(shape)
        if self._seen is not None:
            lo, hi = torch.minimum(lo, self._seen[0]), torch.maximum(hi, self._seen[1])
        self._seen = (lo, hi)

    @torch.no_grad()
    def end_fit(self) -> None:
        """Make the recorded min/max the range. Raises RuntimeError when nothing was recorded."""
        self.fitting = False
        if self._seen is None:
            raise RuntimeError("StaticRangeActQuantizer.end_fit: no input was seen since begin_fit()")
        self.xmin.copy_(self._seen[0])
        self.xmax.copy_(self._seen[1])
        self._seen = None

    def cancel_fit(self) -> None:
        """Stop recording and keep the previous range (a fit interrupted by an error)."""
        self.fitting, self._seen = False, None

    # -- quantization ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitting:
            self._record(x)
        if not self.active:
            return x
        if not self.fitted:
            if self.fitting:
                return x
            raise RuntimeError("static K ranges (quant.k_axis=channel_static) were never fitted: "
                               "quantize with omniquant() or load the quantized state dict first")
        dtype, xf = x.dtype, x.to(compute_dtype(x))
        xmin, xmax = self.xmin.to(xf.dtype), self.xmax.to(xf.dtype)
        scale, zero = range_params(xmin, xmax, self.bits)
        out = fake_quant(xf, scale, zero, 2 ** self.bits - 1)
        if bool(self.salient.any()):
            hb = self.bits + self.addbit
            hscale, hzero = range_params(xmin, xmax, hb)
            out = torch.where(self.salient, fake_quant(xf, hscale, hzero, 2 ** hb - 1), out)
        return out.to(dtype)

    @torch.no_grad()
    def spike_codes(self, x: torch.Tensor) -> SpikeCodes:
        """As `GIFActQuantizer.spike_codes`, against the fitted ranges."""
        xf = x.to(compute_dtype(x))
        xmin, xmax = self.xmin.to(xf.dtype), self.xmax.to(xf.dtype)
        scale, zero = range_params(xmin, xmax, self.bits)
        lo = integer_codes(xf, scale, zero, 2 ** self.bits - 1)
        hi = None
        if bool(self.salient.any()):
            hb = self.bits + self.addbit
            hscale, hzero = range_params(xmin, xmax, hb)
            hi = (integer_codes(xf, hscale, hzero, 2 ** hb - 1), hscale, hzero)
        return SpikeCodes(lo, scale.expand_as(xf), zero.expand_as(xf), self.salient.expand_as(xf), hi,
                          2 ** self.bits, 2 ** self.addbit)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, addbit={self.addbit}, range={tuple(self.xmin.shape)}, "
                f"fitted={self.fitted}, salient={int(self.salient.sum())}/{self.salient.numel()}")


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

    def _clipped(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped weights [R, n] -> the (LWC-clipped) range wmin, wmax [R, 1]."""
        wmax, wmin = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
        if self.lwc:
            wmax = torch.sigmoid(self.upbound_factor) * wmax
            wmin = torch.sigmoid(self.lowbound_factor) * wmin
        return wmin, wmax

    def _range(self, wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped weights [R, n] -> scale, zero [R, 1] of the clipped range on 2**bits levels."""
        # the zero point is rounded without a gradient (OmniQuant's quantizer.py: `.round()`):
        # LWC learns through the scale and the STE rounding of w/scale only
        return range_params(*self._clipped(wg), bits)

    def _quant(self, wg: torch.Tensor, bits: int) -> torch.Tensor:
        scale, zero = self._range(wg, bits)
        return fake_quant(wg, scale, zero, 2 ** bits - 1)

    @torch.no_grad()
    def code_classes(self, w: torch.Tensor) -> tuple[list, torch.Tensor | None, bool]:
        """The grids `forward(w)` quantizes with, for `packing.pack_layer`: class 0 the
        `bits`-bit grid, class 1 (when any column is salient) the bits+addbit grid of the salient
        columns, both over one clipped range (lo, hi) per row and group [C_out, G], stored once
        (as `storage_bits` counts it)."""
        from .packing import CodeClass
        rows = w.shape[0]
        wg = self._grouped(w.float())
        if not bool(self.salient_cols.any()):         # one grid: its scale and exact zero point
            scale, zero = self._range(wg, self.bits)
            return [CodeClass(2 ** self.bits, "uniform", {"s": scale.reshape(rows, -1).cpu(),
                                                          "z": zero.reshape(rows, -1).cpu()})], None, True
        # two grids over one range: the range, stored once; both zero points are re-derived
        # from its FP16 value (in a group where that moves a zero point by one code, the stored
        # model differs from the FP32 run by more than scale rounding; it is what is evaluated)
        lo, hi = self._clipped(wg)
        out = [CodeClass(2 ** self.bits, "range", {"lo": lo.reshape(rows, -1).cpu(), "hi": hi.reshape(rows, -1).cpu()}),
               CodeClass(2 ** (self.bits + self.addbit), "range", shares=0)]
        return out, self.salient_cols.long().cpu(), True

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
