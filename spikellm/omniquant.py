"""The OmniQuant pipeline with SpikeLLM's spiking activations, KV cache and weights (method.md §4).

Per decoder block i:
1. full-precision targets: fp_out = block(fp_in) with quantization off (and, on the same pass,
   the per-channel |x| maxima of the q/o/up inputs that LET starts from); with `quant.aug_loss`
   also fp_aug = block(q_in), quantization off (OmniQuant's `fp_inps_2`);
2. mask pass: the block in full precision on the quantized prefix's outputs q_in; activation
   saliency per linear (§3.1), KV saliency (§3.2), Hessians for weight spiking (§3.3);
   the top `spiking.ratio` channels become salient;
3. LET (init by SmoothQuant, α) and LWC (σ(4)) parameters; AdamW for `quant.epochs` over the
   calibration samples, loss `block_loss`: MSE(block_q(q_in), fp_out) (+ MSE(block_q(q_in),
   fp_aug) with aug_loss);
4. LET folded into weights and norms, weights quantized in place, activation quantizers and
   masks kept as module buffers (saved with the weights: the official code loses them, B1);
5. q_in <- block_q(q_in), fp_in <- fp_out; the block is committed to the checkpoint.

With `quant.k_axis=channel_static` the K ranges (per kv head and channel, buffers saved with
the weights) are fitted on the block's K over the calibration set, on the quantized prefix's
inputs q_in with the block in its current quantized state (`fit_k_ranges`). LET's Q·Kᵀ scale
moves K while training, so the ranges are fitted (a) after the LET/LWC initialisation, before
training; (a') refreshed at the end of every epoch from the K seen by that epoch's training
forwards (no extra pass; each step still uses fixed ranges); (b) refitted after folding and the
cast back to the model's dtype, before the block's final quantized output pass, so the ranges
saved are those of the K the folded block produces.

The quantized model keeps `QuantLinear` modules (dynamic per-token activation quantizers) and
`KVQuantizer`s on its attention modules; `wrap_for_inference` rebuilds them on a fresh model so
that a saved state dict (weights + masks) loads back.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from .allocation import LayerCost, salient_mask
from .blockwise import (BlockInputs, BlockMethod, BlockResult, InputCollector, ModuleStats,
                        forward_block, peak_memory_gb, run_blockwise)
from .config import GIFSpiking, MethodConfig, SpikingMode
from .hessian import HessianAccumulator, prepare_hessian
from .let import LETParams, fold_norms, smooth_init, transformed_weight
from .models import FamilySpec, blocks_of, family_of, set_module
from .omni_attention import KVQuantizer, use_spiking_attention
from .omni_cost import block_layer_costs
from .omni_quantizers import GIFActQuantizer, LWCWeightQuantizer
from .rotation import carry_online
from .saliency import ActivationSaliency, hessian_column_saliency


class QuantLinear(nn.Module):
    """An nn.Linear with a per-token activation quantizer and a (LWC) weight quantizer.

    Keeps `weight` [C_out, C_in] and `bias` under their names, so state dicts stay compatible.
    During calibration `let` (a `LETParams`, not a submodule) and `role` apply the LET factors
    on the fly: x / s_in, W·diag(s_col) scaled per row."""

    def __init__(self, linear: nn.Linear, act_quant: GIFActQuantizer | None = None,
                 weight_quant: LWCWeightQuantizer | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.act_quant = act_quant
        self.weight_quant = weight_quant
        carry_online(linear, self)           # a rotated model's online Hadamard stays before it
        #: the weight columns that were quantized with 2**addbit GIF steps (weight spiking)
        self.register_buffer("w_salient", torch.zeros(linear.in_features, dtype=torch.bool,
                                                      device=linear.weight.device))
        self.role: str | None = None
        self.__dict__["let"] = None

    def effective(self):
        """(input divisor or None, weight, bias) with the LET factors applied."""
        if self.__dict__["let"] is None:
            return None, self.weight, self.bias
        div, col, row = self.__dict__["let"].factors(self.role)
        w, b = transformed_weight(self.weight, self.bias, col, row)
        return div, w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        div, w, b = self.effective()
        if div is not None:
            x = x / div.to(x.dtype)
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.weight_quant is not None:
            w = self.weight_quant(w)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def spike_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit spike-driven form (inference only; method.md §2.3, with bug B3 fixed):
        y = Δ_lo (S_lo ⊙ m_lo) Wᵀ − Δ_lo z_lo Σ_{j normal} W_j
          + Δ_hi Σ_t (S_t ⊙ m_sal) Wᵀ − Δ_hi z_hi Σ_{j salient} W_j + b,
        S_lo the normal channels' one-step spikes (their codes), S_t the GIF spikes (each in
        0..L-1) of the salient (b+a)-bit codes (`SpikeCodes`, also what `spikes.SpikeAccounting`
        counts). Equals `forward` except for salient codes above 2**a·(L−1) (the documented
        top-code clipping)."""
        aq = self.act_quant
        if aq is None or not aq.active or self.__dict__["let"] is not None or self.weight_quant is not None:
            raise RuntimeError("spike_forward needs a folded QuantLinear with an active act quantizer")
        from .omni_quantizers import compute_dtype
        dt = compute_dtype(x)
        w = self.weight.to(dt)
        c = aq.spike_codes(x.to(dt))
        s_lo, train = c.spikes()
        sal = aq.salient.reshape(-1)
        normal = (~sal).float()
        y = c.scale * (s_lo @ w.t()) - c.scale * c.zero * (w * normal.to(dt)).sum(1)
        if train is not None:
            _, hi_scale, hi_zero = c.hi
            acc = sum(s @ w.t() for s in train)                              # integer-spike accumulations
            y = y + hi_scale * acc - hi_scale * hi_zero * (w * sal.to(dt)).sum(1)
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.to(x.dtype)


# ------------------------------------------------------------------------------ wrapping

def _attn_shape(block: nn.Module, spec: FamilySpec) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of the block's attention module."""
    attn = block.get_submodule(spec.attention)
    cfg = attn.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, attn.head_dim


def _act_settings(q: MethodConfig) -> dict:
    """How a method quantizes activations and K/V: OmniQuant (SpikeLLM's code) quantizes Q, K
    and V at abits with min-max ranges and K on `quant.k_axis`; the GPTQ pipeline (QuaRot's
    recipe) quantizes K and V at `quant.kv_bits` per token and head, Q not at all, with the
    clip ratios `quant.a_clip` / `quant.kv_clip`."""
    if q.method == "omniquant":
        return {"a_clip": 1.0, "kv_bits": q.abits, "q_bits": q.abits, "kv_clip": 1.0, "k_axis": q.k_axis}
    return {"a_clip": q.a_clip, "kv_bits": q.kv, "q_bits": 16, "kv_clip": q.kv_clip, "k_axis": "token"}


def wrap_block(block: nn.Module, spec: FamilySpec, q: MethodConfig, s: SpikingMode,
               train: bool = True) -> dict[str, QuantLinear]:
    """Replace the block's linears by QuantLinears (activation quantizers of `quant.abits`
    with empty masks; with `train`, LWC weight quantizers of `quant.wbits`) and give its
    attention a KVQuantizer when activations are quantized (`_act_settings`). Returns
    name -> QuantLinear."""
    addbit, kv_addbit = (s.addbit, s.kv_addbit) if isinstance(s, GIFSpiking) else (1, 1)
    act = _act_settings(q)
    roles = spec.let_roles()
    out = {}
    for name in spec.linears():
        lin = block.get_submodule(name)
        if isinstance(lin, QuantLinear):
            out[name] = lin
            continue
        aq = GIFActQuantizer(q.abits, lin.in_features, addbit=addbit, clip=act["a_clip"]) \
            if q.abits < 16 else None
        wq = (LWCWeightQuantizer(q.wbits, tuple(lin.weight.shape), q.group_size, q.lwc, addbit)
              if train and q.wbits < 16 else None)
        ql = QuantLinear(lin, aq, wq).to(lin.weight.device)
        ql.role = roles[name]
        set_module(block, name, ql)
        out[name] = ql
    attn = block.get_submodule(spec.attention)
    if q.abits < 16 and getattr(attn, "kv_quant", None) is None:
        _, kv_heads, head_dim = _attn_shape(block, spec)
        attn.kv_quant = KVQuantizer(act["kv_bits"], kv_heads, head_dim, act["k_axis"], kv_addbit,
                                    q_bits=act["q_bits"], clip=act["kv_clip"]).to(out[spec.qkv[0]].weight.device)
    return out


def wrap_for_inference(model: nn.Module, q: MethodConfig, s: SpikingMode) -> None:
    """Give a freshly loaded model the runtime modules of a quantized one (activation and KV
    quantizers with empty masks) so that its saved state dict, masks included, loads back."""
    spec = family_of(model)
    if q.abits < 16:
        use_spiking_attention(model)
    for block in blocks_of(model, spec):
        wrap_block(block, spec, q, s, train=False)


def _set_quant(block: nn.Module, linears: dict[str, QuantLinear], on: bool) -> None:
    for ql in linears.values():
        for m in (ql.act_quant, ql.weight_quant):
            if m is not None:
                m.enabled = on
    kvq = _kv_quant(block)
    if kvq is not None:
        kvq.set_enabled(on)


def _kv_quant(block: nn.Module) -> KVQuantizer | None:
    """The block's KVQuantizer (on its attention module), or None."""
    return next((m for m in block.modules() if isinstance(m, KVQuantizer)), None)


def _top_mask(scores: torch.Tensor, ratio: float, select: str, seed: int) -> torch.Tensor:
    """Bool mask shaped like `scores`: its top `ratio` entries ranked jointly (or random ones)."""
    return salient_mask(scores.reshape(-1), ratio, select, seed).reshape(scores.shape).to(scores.device)


# ------------------------------------------------------------------------------ per block

class _Stats:
    """Per-channel |x| maxima of linear inputs (LET initialisation), x [..., C]."""

    def __init__(self):
        self.absmax: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)


class _ActAbsmax(BlockMethod):
    """Statistics pass: per-channel max |x| of every block linear's input; weights unchanged."""
    desc = "act stats"

    def __init__(self, batch_size: int, out: dict):
        super().__init__()
        self.batch_size, self.out = batch_size, out

    def prepare(self, model, spec):
        self.spec = spec

    def process(self, i, block, inputs):
        hook = _Stats()
        with InputCollector({n: block.get_submodule(n) for n in self.spec.linears()}, hook, stop_early=False):
            hidden = forward_block(block, inputs["hidden"], self.batch_size)
        self.out.update({f"{i}.{n}": v.cpu() for n, v in hook.absmax.items()})
        return BlockResult(streams={"hidden": hidden})


@torch.no_grad()
def activation_absmax(model: nn.Module, calib_ids: torch.Tensor, device="cpu", batch_size: int = 8,
                      progress: bool = False, stream=None) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every linear input of the full-precision model over the
    calibration set (OmniQuant's act_scales, which LET starts from); `stream` (a read-only
    `streaming.BlockStream`) holds one block in memory at a time.

    calib_ids [N, seqlen] -> {"<block>.<linear>": [C_in] float32}."""
    out: dict[str, torch.Tensor] = {}
    run_blockwise(model, family_of(model), calib_ids, _ActAbsmax(batch_size, out), device=device,
                  batch_size=batch_size, progress=progress, stream=stream)
    return out


def _mask_pass(block, linears, inputs: BlockInputs, q: MethodConfig, s: SpikingMode, seed: int,
               batch_size: int) -> dict[str, int]:
    """Compute and set the salient masks of one block from a full-precision forward on the
    quantized prefix's outputs. Returns {name: salient count}."""
    acts, weights = s.spikes_acts(q), s.spikes_weights(q)
    act_sal = {n: ActivationSaliency(ql.weight) for n, ql in linears.items()
               if acts and ql.act_quant is not None}
    hess = {n: HessianAccumulator(ql.in_features, device=ql.weight.device)
            for n, ql in linears.items() if weights and ql.weight_quant is not None}
    kvq = _kv_quant(block)

    def on_input(name, x):
        if name in act_sal:
            act_sal[name].add_batch(x)
        if name in hess:
            hess[name].add_batch(x.float())

    if kvq is not None and acts:
        kvq.collect = True
    try:
        with InputCollector(dict(linears), on_input, stop_early=False):
            forward_block(block, inputs, batch_size, collect_only=True)
    finally:
        if kvq is not None:
            kvq.collect = False
    counts = {}
    for i, (n, acc) in enumerate(act_sal.items()):
        m = _top_mask(acc.scores(), s.ratio, s.select, seed + i)
        linears[n].act_quant.set_salient(m)
        counts[f"act:{n}"] = int(m.sum())
    for i, (n, acc) in enumerate(hess.items()):
        U = prepare_hessian(acc.H, percdamp=q.percdamp).U
        m = _top_mask(hessian_column_saliency(linears[n].weight.float(), U), s.ratio, s.select, seed + 100 + i)
        linears[n].weight_quant.salient_cols.copy_(m)
        counts[f"weight:{n}"] = int(m.sum())
    if kvq is not None and acts:
        sal = kvq.saliency()
        km = _top_mask(sal["k"], s.ratio, s.select, seed + 200)
        vm = _top_mask(sal["v"], s.ratio, s.select, seed + 201)
        kvq.set_masks(km, vm)
        counts["k"], counts["v"] = int(km.sum()), int(vm.sum())
    return counts


def _let_init(block, spec: FamilySpec, linears, absmax: dict[str, torch.Tensor], alpha: float) -> LETParams:
    """LET scales started by SmoothQuant from the input maxima `absmax` ({linear: [C_in]}) of
    the linears `spec.let_init_inputs()` names and their weights' column maxima."""
    heads, kv_heads, head_dim = _attn_shape(block, spec)
    src = spec.let_init_inputs()
    hidden = linears[src["qkv"]].in_features

    def start(scale):
        name = src[scale]
        return smooth_init(absmax[name], linears[name].weight.detach().abs().amax(0), alpha)

    init = {"qkv": start("qkv"), "fc1": start("fc1")}
    # GQA: one scale per kv channel, the mean over the query heads that share it
    init["out"] = start("out").reshape(kv_heads, heads // kv_heads, head_dim).mean(1).reshape(-1)
    return LETParams(hidden, heads, kv_heads, head_dim, init).to(linears[src["qkv"]].weight.device)


def _attach_let(linears, let: LETParams | None) -> None:
    for ql in linears.values():
        ql.__dict__["let"] = let


def _static_k(block: nn.Module) -> KVQuantizer | None:
    """The block's KVQuantizer when K uses fitted ranges (k_axis=channel_static), else None."""
    kvq = _kv_quant(block)
    return kvq if kvq is not None and kvq.static_k else None


@torch.no_grad()
def fit_k_ranges(block: nn.Module, spec: FamilySpec, inputs: BlockInputs, batch_size: int = 8) -> bool:
    """Fit the static K ranges of a channel_static block: the per-(kv head, channel) min/max of
    the K it computes on `inputs` (hidden [N, seqlen, hidden]) in its current state (quantizers
    on: K comes out of the quantized k_proj). The forward stops at o_proj, after attention.
    Returns False (and does nothing) for the other K axes."""
    kvq = _static_k(block)
    if kvq is None:
        return False
    kvq.begin_k_fit()
    try:
        with InputCollector({"o_proj": block.get_submodule(spec.o_proj)}, lambda *_: None, stop_early=True):
            forward_block(block, inputs, batch_size, collect_only=True)
    except BaseException:
        kvq.cancel_k_fit()
        raise
    kvq.end_k_fit()
    return True


def block_loss(out: torch.Tensor, fp_out: torch.Tensor, fp_aug: torch.Tensor | None = None) -> torch.Tensor:
    """The block-wise training loss (OmniQuant, quantize/omniquant.py): MSE(fp_out, out), plus,
    with --aug_loss, MSE(fp_aug, out) where fp_aug is the full-precision block on the same
    (quantized-prefix) inputs as out. All [B, seqlen, hidden]; MSE = mean over elements."""
    loss = F.mse_loss(out.float(), fp_out.float())
    if fp_aug is not None:
        loss = loss + F.mse_loss(out.float(), fp_aug.float())
    return loss


def _train_block(block, linears, let, q_in: BlockInputs, fp_out: torch.Tensor, q: MethodConfig,
                 i: int, use_amp: bool, log, fp_aug: torch.Tensor | None = None) -> list[float]:
    """AdamW over (LET: let_lr, LWC: lwc_lr) for q.epochs on `block_loss(block(q_in), fp_out,
    fp_aug)` (fp_aug [N, seqlen, hidden] with quant.aug_loss, else None); returns the mean loss
    per epoch. Static K ranges (channel_static) are refreshed at each epoch's end from the K of
    that epoch's forwards. Raises FloatingPointError on a non-finite loss."""
    groups = []
    if let is not None:
        groups.append({"params": list(let.parameters()), "lr": q.let_lr})
    lwc = [p for ql in linears.values() if ql.weight_quant is not None for p in ql.weight_quant.parameters()]
    if lwc:
        groups.append({"params": lwc, "lr": q.lwc_lr})
    if not groups or q.epochs == 0:
        return []
    opt = torch.optim.AdamW(groups, weight_decay=q.wd)
    n = q_in.hidden.shape[0]
    device = q_in.hidden.device
    gen = torch.Generator().manual_seed(q.seed + i)
    history = []
    amp = use_amp and device.type == "cuda"
    static_k = _static_k(block)
    for epoch in range(q.epochs):
        total, steps = 0.0, 0
        order = torch.randperm(n, generator=gen)
        if static_k is not None:
            static_k.begin_k_fit()         # record this epoch's K; each step uses the last ranges
        for b0 in range(0, n, q.train_batch):
            idx = order[b0: b0 + q.train_batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = block(q_in.hidden[idx], **q_in.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = block_loss(out, fp_out[idx], None if fp_aug is None else fp_aug[idx])
            if not torch.isfinite(loss):
                if static_k is not None:
                    static_k.cancel_k_fit()
                raise FloatingPointError(
                    f"block {i}: training loss became {loss.item()} in epoch {epoch}; lower "
                    f"quant.let_lr/quant.lwc_lr, or set quant.nan_policy=fp32 to retrain in float32")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        if static_k is not None:
            static_k.end_k_fit()
        history.append(total / max(steps, 1))
        if log is not None:
            log(f"block {i} epoch {epoch}: loss {history[-1]:.4g}")
    return history


@torch.no_grad()
def _finalize(block, spec: FamilySpec, linears, let: LETParams | None,
              pack: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Fold LET into weights and norms, quantize weights in place, drop the weight quantizers.
    Returns, with `pack`, each quantized linear's `packing.pack_layer` tensors (by name), and
    the linears get the weights those give (FP16 scales: exactly what a packed export stores)."""
    from .packing import pack_layer, unpack_layer
    packed = {}
    for name, ql in linears.items():
        _, w, b = ql.effective()
        if ql.weight_quant is not None:
            fp = w
            w = ql.weight_quant(w)
            ql.w_salient.copy_(ql.weight_quant.salient_cols)
            if pack and ql.weight_quant.active:
                classes, cls, per_column = ql.weight_quant.code_classes(fp)
                packed[name] = pack_layer(w.detach(), classes, cls, ql.weight_quant.group_size,
                                          None, per_column)
                w = unpack_layer(packed[name]).to(w.device, w.dtype)   # the weights as stored
        ql.weight.data.copy_(w.to(ql.weight.dtype))
        if b is not None:
            ql.bias.data.copy_(b.to(ql.bias.dtype))
    if let is not None:
        fold_norms(block, let, spec.let_norms())
    for ql in linears.values():
        ql.__dict__["let"] = None
        ql.weight_quant = None
    return packed


def _lwc_state(linears) -> dict[str, torch.Tensor]:
    out = {}
    for n, ql in linears.items():
        if ql.weight_quant is not None and ql.weight_quant.lwc:
            out[f"{n}.upbound_factor"] = ql.weight_quant.upbound_factor.detach().cpu().clone()
            out[f"{n}.lowbound_factor"] = ql.weight_quant.lowbound_factor.detach().cpu().clone()
    return out


# ------------------------------------------------------------------------------ the loop

def _equal_steps(q: MethodConfig, s: SpikingMode) -> float:
    """Average GIF steps per spiking channel: 1 + r·(2**addbit − 1) where something spikes."""
    if s.mode != "gif" or not (s.spikes_acts(q) or s.spikes_weights(q)):
        return 1.0
    return 1.0 + s.ratio * (2 ** s.addbit - 1)


class OmniQuant(BlockMethod):
    """The OmniQuant-pipeline plug-in (+ SpikeLLM GIF spiking when `s.mode == "gif"`), the
    per-block steps 1-5 of the module docstring. Streams: "fp" (the full-precision model's
    block inputs, the targets' source) and "q" (the quantized prefix's outputs).

    `act_absmax` ({"<block>.<linear>": [C_in]}, `activation_absmax`) is what LET starts from;
    without it the same maxima are taken from the full-precision pass of each block."""
    streams = ("fp", "q")

    def __init__(self, q: MethodConfig, s: SpikingMode, spec: FamilySpec, batch_size: int = 8,
                 device="cpu", log=None, act_absmax: dict[str, torch.Tensor] | None = None,
                 pack: bool = False):
        super().__init__()
        self.q, self.s, self.spec, self.batch_size = q, s, spec, batch_size
        self.device, self.log, self.act_absmax, self.pack = device, log, act_absmax, pack
        self.desc = f"omniquant W{q.wbits}A{q.abits}"

    def prepare(self, model: nn.Module, spec: FamilySpec) -> None:
        torch.manual_seed(self.q.seed)
        if self.q.abits < 16:
            use_spiking_attention(model)

    def restore(self, block: nn.Module) -> None:
        wrap_block(block, self.spec, self.q, self.s, train=False)

    def finalize(self, model: nn.Module, spec: FamilySpec) -> None:
        model.config.use_cache = False

    def restore_for_inference(self, model: nn.Module) -> None:
        wrap_for_inference(model, self.q, self.s)

    def baseline_ace(self, c: LayerCost) -> float:
        """The same W/A grid with one step everywhere (W4A4: 16 per MAC), scale multiplies included."""
        return float(c.c_out * (c.c_in * self.q.wbits * self.q.abits + c.scale_mults * 256))

    def process(self, i: int, block: nn.Module, inputs: dict[str, BlockInputs]) -> BlockResult:
        q, s, spec, batch_size, device, log = self.q, self.s, self.spec, self.batch_size, self.device, self.log
        fp, qh, kw = inputs["fp"].hidden, inputs["q"].hidden, inputs["fp"].kwargs
        t0 = time.time()
        dtype = next(block.parameters()).dtype
        block.float()                                  # train and fold in float32
        for p in block.parameters():
            p.requires_grad_(False)
        linears = wrap_block(block, spec, q, s, train=True)
        _set_quant(block, linears, False)
        stats_hook = _Stats()
        with InputCollector({n: linears[n] for n in dict.fromkeys(spec.let_init_inputs().values())},
                            stats_hook, stop_early=False):
            fp_out = forward_block(block, BlockInputs(fp, kw), batch_size)
        # OmniQuant's fp_inps_2: the full-precision block on the quantized prefix's inputs
        fp_aug = (forward_block(block, BlockInputs(qh, kw), batch_size)
                  if q.aug_loss and q.epochs > 0 else None)
        counts = {}
        if s.mode == "gif" and s.ratio > 0:
            counts = _mask_pass(block, linears, BlockInputs(qh, kw), q, s, s.seed + 1000 * i, batch_size)
        start_stats = stats_hook.absmax
        if self.act_absmax is not None:
            start_stats = {n: self.act_absmax[f"{i}.{n}"].to(device) for n in stats_hook.absmax}
        let = _let_init(block, spec, linears, start_stats, q.alpha) if q.let and q.abits < 16 else None
        _attach_let(linears, let)
        _set_quant(block, linears, True)
        fit_k_ranges(block, spec, BlockInputs(qh, kw), batch_size)      # (a): K as LET/LWC start it
        try:
            history = _train_block(block, linears, let, BlockInputs(qh, kw), fp_out, q, i, q.amp,
                                   self.status, fp_aug=fp_aug)
        except FloatingPointError:
            if q.nan_policy != "fp32" or device == "cpu":
                raise
            if log is not None:
                log(f"block {i}: non-finite loss under autocast; retraining in float32")
            linears = wrap_block(block, spec, q, s, train=True)
            let = _let_init(block, spec, linears, start_stats, q.alpha) if let is not None else None
            _attach_let(linears, let)
            fit_k_ranges(block, spec, BlockInputs(qh, kw), batch_size)
            history = _train_block(block, linears, let, BlockInputs(qh, kw), fp_out, q, i, False,
                                   self.status, fp_aug=fp_aug)
        params = {f"{i}.lwc.{k}": v for k, v in _lwc_state(linears).items()}
        if let is not None:
            params.update({f"{i}.let.{k}": v.detach().cpu().clone() for k, v in let.named_parameters()})
        for name, tensors in _finalize(block, spec, linears, let, self.pack).items():
            params.update({f"packed.{spec.blocks}.{i}.{name}.{t}": v for t, v in tensors.items()})
        block.to(dtype)                                # back to the model's dtype (masks stay bool)
        fit_k_ranges(block, spec, BlockInputs(qh, kw), batch_size)      # (b): the folded block's K
        with torch.no_grad():
            q_out = forward_block(block, BlockInputs(qh, kw), batch_size)
            loss = F.mse_loss(q_out, fp_out).item()
        params[f"{i}.epoch_loss"] = torch.tensor(history or [float("nan")])
        params[f"{i}.salient_counts"] = torch.tensor(list(counts.values()) or [0])
        row = ModuleStats(block=i, module="block", loss=loss, recon_error=loss,
                          seconds=time.time() - t0, samples=int(fp_out.shape[0]),
                          avg_steps=_equal_steps(q, s), damp=0.0, peak_mem_gb=peak_memory_gb(device))
        costs = [c for c, _ in block_layer_costs(block, f"{spec.blocks}.{i}.", q, s)]
        return BlockResult(rows=[row], costs=costs, streams={"fp": fp_out, "q": q_out}, extra=params)


def omniquant(model: nn.Module, calib_ids: torch.Tensor, q: MethodConfig, s: SpikingMode,
              device="cpu", batch_size: int = 8, progress: bool = True,
              checkpoint_dir: str | os.PathLike | None = None, log=None,
              act_absmax: dict[str, torch.Tensor] | None = None, stream=None):
    """Quantize `model` in place with OmniQuant (+ SpikeLLM GIF spiking when `s.mode == "gif"`):
    the `OmniQuant` plug-in on the engine (`quantize(model, ids, OmniQuantConfig(...))`
    is the same run and returns a QuantReport with costs).

    calib_ids [N, seqlen]. Returns (stats rows, params) where params holds the trained LET
    scales and LWC factors per block (for inspection; the folded model does not need them)."""
    method = OmniQuant(q, s, family_of(model), batch_size=batch_size, device=device, log=log,
                       act_absmax=act_absmax)
    res = run_blockwise(model, family_of(model), calib_ids, method, device=device,
                        batch_size=batch_size, progress=progress, checkpoint_dir=checkpoint_dir,
                        log=log, stream=stream)
    return res.stats, {k: v for e in res.extras for k, v in e.items()}
