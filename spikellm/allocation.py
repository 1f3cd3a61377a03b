"""Step allocation: saliency scores -> per-channel GIF step counts, and what an allocation costs.

The top `ratio` fraction of channels (by score, or chosen at random) get `steps` GIF steps,
all others one. Cost is counted in "equal steps" (mean steps per channel, weighted by the
parameters behind each channel) and in ACE (method.md §7.4): a MAC between an i-bit and a
j-bit operand costs i*j bit-operations; a channel with T steps of b bits counts T*b. Every
per-row (or per-group) scale or zero point that multiplies a partial sum adds one FP16 x FP16
multiply (256 bit-operations) per output and token.

Storage is counted in bits per weight as stored: each code at its information content
(log2 of its number of levels), every scale / zero point / threshold in FP16, and every salient
mask at its information content (log2 C(n, k) for k salient out of n positions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .saliency import random_saliency


def n_salient(n_channels: int, ratio: float) -> int:
    """Number of salient channels: round(ratio * n), as the official code's n - int(low_p*n)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * n_channels))


def salient_mask(scores: torch.Tensor, ratio: float, select: str = "saliency", seed: int = 0) -> torch.Tensor:
    """bool [C]: True for the top `ratio` channels by score (`select="saliency"`) or for a seeded
    random subset of the same size (`select="random"`)."""
    n = scores.numel()
    k = n_salient(n, ratio)
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return mask
    if select == "saliency":
        idx = torch.topk(scores.float().flatten().cpu(), k).indices
    elif select == "random":
        idx = torch.topk(random_saliency(n, seed), k).indices
    else:
        raise ValueError(f"select must be 'saliency' or 'random', got {select!r}")
    mask[idx] = True
    return mask


def allocate_steps(scores: torch.Tensor, ratio: float, steps: int, select: str = "saliency",
                   seed: int = 0) -> torch.Tensor:
    """(scores [C], ratio, steps, select) -> int steps per channel [C] (salient: `steps`, else 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mask = salient_mask(scores, ratio, select, seed)
    out = torch.ones(scores.numel(), dtype=torch.long)
    out[mask] = steps
    return out


@dataclass
class LayerCost:
    """Cost of one linear layer per token: C_out x C_in MACs, bit-widths per input channel."""
    name: str
    c_out: int
    c_in: int
    #: equal steps: mean over input channels of the steps of each weight column
    avg_steps: float
    #: Σ_j C_out * w_bits_j * a_bits_j   (bit-operations per token)
    ace: float
    fp16_ace: float
    additive_fraction: float  # share of MACs that need no multiplier (ternary/binary spikes)
    act_bits: float = 16.0    # activation bit-width (16: floating-point activations)
    #: bits per weight as stored (codes, FP16 scales/zeros, masks); 16 = FP16
    storage_bits: float = 16.0
    #: FP16 multiplies per output and token by a scale / zero point (one per row and group)
    scale_mults: float = 0.0
    #: an operation the quantized model adds that the FP16 reference lacks and that holds no
    #: weights (a rotation's online Hadamard: c_out outputs of c_in signed adds each): counted in
    #: ACE and energy, left out of equal steps, storage bits and the FP16 reference
    overhead: bool = False
    #: static weight spikes (ternary GIF weights): fired spikes Σ|code| and spike slots Σ T over
    #: the layer's weights; 0 for layers whose weights do not spike
    weight_spikes: float = 0.0
    weight_slots: float = 0.0

    def row(self) -> dict:
        return asdict(self)


def transform_cost(name: str, n: int, adds_per_output: float, act_bits: float = 16.0) -> LayerCost:
    """An online transform without weights (a ±1 matrix, e.g. a Hadamard transform) over `n`
    values of `act_bits` bits, each output `adds_per_output` signed additions: ACE
    n · adds · act_bits (a ±1 'weight' is one bit), additive, no FP16 counterpart."""
    return LayerCost(name, int(n), 0, 1.0, float(n * adds_per_output * act_bits), 0.0, 1.0,
                     float(act_bits), 0.0, 0.0, overhead=True)


def layer_cost(name: str, c_out: int, c_in: int, steps: torch.Tensor, bits_per_step: float,
               act_bits: float, additive: torch.Tensor | bool = False,
               extra_bits: torch.Tensor | None = None, storage_bits: float = 16.0,
               scale_mults: float = 0.0) -> LayerCost:
    """steps [C_in] GIF steps per weight column of `bits_per_step` bits each, activations at
    `act_bits`. `extra_bits` [C_in] optionally overrides w_bits per column (PB-LLM's 8-bit
    salient weights, given as the column's mean bits). `scale_mults`: FP16 scale multiplies per
    output row and token (each costs 16 x 16 bit-operations); `storage_bits`: bits per weight
    (`storage_bits_per_weight`)."""
    steps = steps.float()
    w_bits = steps * bits_per_step if extra_bits is None else extra_bits.float()
    ace = float(c_out * (w_bits * act_bits).sum()) + float(c_out * scale_mults * 16 * 16)
    add = torch.as_tensor(additive, dtype=torch.float32)
    add_frac = float(add.float().mean()) if add.numel() > 1 else float(add)
    return LayerCost(name, c_out, c_in, float(steps.mean()), ace, float(c_out * c_in * 16 * 16),
                     add_frac, float(act_bits), float(storage_bits), float(scale_mults))


def mask_bits(n: int, k: int) -> float:
    """Information content in bits of which k of n positions are salient: log2 C(n, k)."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def storage_bits_per_weight(c_out: int, c_in: int, code_bits: float, fp16_params: float,
                            masks: float = 0.0) -> float:
    """Bits per weight of a C_out x C_in layer: `code_bits` (total over all weights, each code at
    log2 of its levels), `fp16_params` scales / zeros / thresholds at 16 bits, `masks` bits."""
    return (code_bits + 16.0 * fp16_params + masks) / (c_out * c_in)


def total_cost(layers: list[LayerCost]) -> dict[str, float]:
    """Totals over layers, weighted by parameter count; overhead rows (`transform_cost`) add
    their ACE to `ace` (and `overhead_ace`) and nothing else."""
    extra = [layer for layer in layers if layer.overhead]
    layers = [layer for layer in layers if not layer.overhead]
    params = sum(layer.c_out * layer.c_in for layer in layers)
    if params == 0:
        return {"avg_steps": 1.0, "ace": 0.0, "ace_rel_fp16": 0.0, "additive_fraction": 0.0,
                "storage_bits": 16.0}
    overhead = sum(layer.ace for layer in extra)
    ace = sum(layer.ace for layer in layers) + overhead
    fp16 = sum(layer.fp16_ace for layer in layers)
    return {**({"overhead_ace": overhead} if extra else {}),
        "avg_steps": sum(layer.avg_steps * layer.c_out * layer.c_in for layer in layers) / params,
        "ace": ace,
        "ace_rel_fp16": ace / fp16,
        "additive_fraction": sum(layer.additive_fraction * layer.c_out * layer.c_in
                                 for layer in layers) / params,
        "storage_bits": sum(layer.storage_bits * layer.c_out * layer.c_in for layer in layers) / params,
    }


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in pJ: ASSUMED constants (method.md §7.4: the SNN literature's 45 nm
    numbers, Horowitz 2014); SpikeLLM's own constants are unpublished.

    A floating-point MAC (the FP16 reference, and weight-only quantized layers whose activations
    stay floating point) costs `fp_mac`; an additive MAC step with floating-point activations
    (a ternary/binary spike selects ±x) costs `fp_add`. With integer activations a MAC step
    costs `int_mul_bitop` per bit-operation (w_bits·a_bits, the ACE rule; 8x8 = 0.2 pJ) unless it
    is additive, plus `int_add` for the accumulation."""
    fp_mac: float = 4.6
    fp_add: float = 0.9
    int_mul_bitop: float = 0.2 / 64
    int_add: float = 0.1


def layer_energy(c: LayerCost, e: EnergyModel) -> tuple[float, float]:
    """-> (energy, FP16-reference energy) of one layer per token, in pJ. An overhead row
    (`transform_cost`: c_out outputs, ace / (c_out · act_bits) adds each) costs its adds and has
    no FP16 counterpart."""
    if c.overhead:
        adds = c.ace / max(c.act_bits, 1.0)
        return adds * (e.fp_add if c.act_bits >= 16 else e.int_add), 0.0
    macs = c.c_out * c.c_in
    step_macs = macs * c.avg_steps
    if c.act_bits >= 16:
        energy = step_macs * ((1 - c.additive_fraction) * e.fp_mac + c.additive_fraction * e.fp_add)
    else:
        energy = (1 - c.additive_fraction) * c.ace * e.int_mul_bitop + step_macs * e.int_add
    return energy, macs * e.fp_mac


def energy_cost(layers: list[LayerCost], e: EnergyModel | None = None) -> dict[str, float]:
    """{energy_pj, energy_fp16_pj, energy_rel_fp16}: linear layers, per token, summed."""
    e = e or EnergyModel()
    pairs = [layer_energy(c, e) for c in layers]
    q, fp = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return {"energy_pj": q, "energy_fp16_pj": fp, "energy_rel_fp16": q / fp if fp else 0.0}
