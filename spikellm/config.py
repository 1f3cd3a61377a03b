"""Typed configuration of the weight-quantization verb (no Hydra: plain dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("rtn", "gptq", "pbllm", "omniquant")
SPIKING_MODES = ("none", "ternary", "gif")
SELECT = ("saliency", "random")
#: quant.k_axis values (spikellm/omni_attention.py: what each means)
K_AXES = ("token", "channel", "channel_static")


@dataclass
class QuantConfig:
    """How weights are quantized. `method`: rtn (no error feedback), gptq, pbllm."""
    method: str = "gptq"
    wbits: int = 4
    #: columns per quantization group; 0 = one grid per output row (per-channel)
    group_size: int = 0
    sym: bool = False
    mse: bool = False
    actorder: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    #: quantize q/k/v, o, gate/up, down in order, each on inputs from the already-quantized ones
    true_sequential: bool = True
    #: PB-LLM: fraction of weights kept at `high_bits` (1 - low_frac)
    salient_frac: float = 0.05
    high_bits: int = 8
    # ---- OmniQuant (method=omniquant; method.md §4) ----
    #: activation bits of every linear input and of Q/K/V (16 = unquantized activations)
    abits: int = 16
    #: block-wise training epochs over the calibration set (0 = initialisation only)
    epochs: int = 0
    #: learnable weight clipping / learnable equivalent transformation
    lwc: bool = True
    let: bool = True
    #: K quantization axis: "token" (per token over head_dim, OmniQuant; causal), "channel" (per
    #: (kv head, channel) over the window's tokens, SpikeLLM's code; NON-CAUSAL: later tokens
    #: change earlier positions' quantization), "channel_static" (per (kv head, channel) against
    #: min/max ranges fitted on the calibration set; causal)
    k_axis: str = "token"
    let_lr: float = 1e-3
    lwc_lr: float = 1e-2
    wd: float = 0.0
    #: SmoothQuant exponent of the LET initialisation
    alpha: float = 0.75
    #: OmniQuant's --aug_loss: add MSE(block_fp(q_in), block_q(q_in)) to MSE(fp_out, block_q(q_in))
    aug_loss: bool = False
    #: calibration samples per training step
    train_batch: int = 1
    #: what a NaN/inf loss does: "fail" the stage, or "fp32": retrain the block without autocast
    nan_policy: str = "fail"
    #: autocast (bf16) for the block training on CUDA; CPU always trains in float32
    amp: bool = True
    seed: int = 2


@dataclass
class SpikingConfig:
    """SpikeLLM spiking weights. `mode=ternary`: every weight column is a T-step ternary GIF;
    the top `ratio` of weights (`granularity=element`, per output row) or of columns
    (`granularity=column`) by Hessian saliency (or at random) get `steps` steps, the rest 1."""
    mode: str = "none"
    ratio: float = 0.0
    steps: int = 1
    select: str = "saliency"
    #: columns sharing one ternary threshold per output row (0 = one per row); the W-bit grids
    #: of quant=rtn/gptq use quant.group_size instead
    group_size: int = 0
    #: "own": salient weights get their own MSE threshold; "shared": the normal weights' one
    salient_scale: str = "own"
    #: unit of saliency: "column" (input channel, SpikeLLM's unit) or "element" (PB-LLM's)
    granularity: str = "column"
    #: Hessians the saliency is scored on: "sequential" (the quantized prefix's activations,
    #: as GPTQ sees them) or "fp" (the full-precision model's: one score set per calibration
    #: set, shared by every allocation of a sweep)
    saliency_from: str = "sequential"
    #: weight the threshold search by the OBS column importance 1/U_jj²
    weighted: bool = False
    seed: int = 0
    #: bits counted per ternary spike in ACE (a ±1/0 spike is one signed accumulate)
    spike_bits: float = 1.0
    # ---- GIF spiking in the OmniQuant pipeline (mode=gif) ----
    #: salient channels get 2**addbit GIF steps, i.e. bits+addbit over the same range
    addbit: int = 1
    #: what spikes: "act" (linear inputs and K/V), "weight" (Hessian-salient weight columns),
    #: "both", or "auto" (weights when quant.wbits < quant.abits, e.g. W2A8/W2A16, else activations)
    target: str = "auto"
    #: GIF steps of the salient K/V channels (SpikeLLM forces 1 extra bit: 2 steps)
    kv_addbit: int = 1

    def spikes_acts(self, q: "QuantConfig") -> bool:
        if self.mode != "gif":
            return False
        if self.target == "auto":
            return not q.wbits < q.abits
        return self.target in ("act", "both")

    def spikes_weights(self, q: "QuantConfig") -> bool:
        if self.mode != "gif":
            return False
        if self.target == "auto":
            return q.wbits < q.abits
        return self.target in ("weight", "both")


def validate(q: QuantConfig, s: SpikingConfig) -> None:
    """Raise ValueError naming the first bad key and its allowed values."""
    checks = [
        (q.method in METHODS, "quant.method", f"one of {', '.join(METHODS)}", q.method),
        (1 <= q.wbits <= 16, "quant.wbits", "an integer in 1..16", q.wbits),
        (q.group_size >= 0 or q.group_size == -1, "quant.group_size", "0 (per-channel) or a positive column count", q.group_size),
        (q.blocksize >= 1, "quant.blocksize", ">= 1", q.blocksize),
        (0 <= q.percdamp < 1, "quant.percdamp", "in [0, 1)", q.percdamp),
        (0 <= q.salient_frac <= 1, "quant.salient_frac", "in [0, 1]", q.salient_frac),
        (2 <= q.high_bits <= 16, "quant.high_bits", "in 2..16", q.high_bits),
        (s.mode in SPIKING_MODES, "spiking.mode", f"one of {', '.join(SPIKING_MODES)}", s.mode),
        (0 <= s.ratio <= 1, "spiking.ratio", "in [0, 1]", s.ratio),
        (1 <= s.steps <= 64, "spiking.steps", "an integer in 1..64", s.steps),
        (s.select in SELECT, "spiking.select", f"one of {', '.join(SELECT)}", s.select),
        (s.salient_scale in ("own", "shared"), "spiking.salient_scale", "own or shared", s.salient_scale),
        (s.group_size >= 0, "spiking.group_size", "0 (per row) or a positive column count", s.group_size),
        (s.granularity in ("column", "element"), "spiking.granularity", "column or element", s.granularity),
        (s.saliency_from in ("sequential", "fp"), "spiking.saliency_from", "sequential or fp", s.saliency_from),
        (not (q.method == "pbllm" and s.mode != "none"), "spiking", "none with quant=pbllm", s.mode),
        (1 <= q.abits <= 16, "quant.abits", "an integer in 1..16", q.abits),
        (q.epochs >= 0, "quant.epochs", ">= 0", q.epochs),
        (q.k_axis in K_AXES, "quant.k_axis", "token (causal), channel (non-causal, SpikeLLM code) "
         "or channel_static (causal, fitted ranges)", q.k_axis),
        (q.train_batch >= 1, "quant.train_batch", ">= 1", q.train_batch),
        (q.nan_policy in ("fail", "fp32"), "quant.nan_policy", "fail or fp32", q.nan_policy),
        (0 <= q.alpha <= 1, "quant.alpha", "in [0, 1]", q.alpha),
        (0 <= s.addbit <= 8, "spiking.addbit", "an integer in 0..8", s.addbit),
        (s.target in ("auto", "act", "weight", "both"), "spiking.target", "auto, act, weight or both", s.target),
        (not (s.mode == "gif" and q.method != "omniquant"), "spiking",
         "ternary or none with quant=" + q.method + " (spiking=t2/t4 need quant=omniquant)", s.mode),
        (not (s.mode == "ternary" and q.method == "omniquant"), "spiking",
         "none, t2 or t4 with quant=omniquant", s.mode),
        (not (s.mode == "gif" and s.steps != 2 ** s.addbit), "spiking.steps",
         f"2**spiking.addbit = {2 ** s.addbit} in gif mode (set spiking.addbit instead)", s.steps),
    ]
    for ok, key, allowed, value in checks:
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid: must be {allowed}")
