"""Compute cost (ACE, method.md §7.4) of a model quantized by the OmniQuant pipeline.

Per linear layer and token: Σ_j C_out · w_bits · a_bits · T_j, where T_j is the number of GIF
steps of input channel j: 2**addbit on salient activation channels (each step a b-bit spike)
and/or 2**addbit on spiking weight columns, 1 elsewhere. The plain baseline is the same W/A grid
with one step everywhere (W4A4: 16 per MAC); FP16 is 256 per MAC. Only the linear layers are
counted (the Q·Kᵀ and P·V products are not). Each output also multiplies its partial sums by
the row's (group's) FP16 scale and zero point: 2 multiplies of 16 x 16 bit-operations per group.
Storage: wbits codes (wbits+addbit on spiking weight columns), FP16 scale and zero per row and
group, the salient masks at log2 C(n, k) bits.
"""
from __future__ import annotations

import torch
from torch import nn

from .allocation import LayerCost, layer_cost, mask_bits, storage_bits_per_weight, total_cost
from .config import MethodConfig, SpikingMode


def quantlinear_cost(name: str, m: nn.Module, q: MethodConfig, s: SpikingMode
                     ) -> tuple[LayerCost, LayerCost]:
    """-> (the cost of one folded QuantLinear `m`, the same layer as the plain one-step W/A
    baseline), per token."""
    steps_per = 2 ** s.addbit if s.mode == "gif" else 1
    t = torch.ones(m.in_features)
    if m.act_quant is not None:
        t = torch.where(m.act_quant.salient.reshape(-1).cpu(), float(steps_per), t)
    t = torch.where(m.w_salient.cpu(), t * steps_per, t)
    groups = -(-m.in_features // q.group_size) if q.group_size else 1
    n_wsal = int(m.w_salient.sum())
    code_bits = m.out_features * (m.in_features * q.wbits + n_wsal * (s.addbit if n_wsal else 0))
    masks = mask_bits(m.in_features, n_wsal)
    if m.act_quant is not None:
        masks += mask_bits(m.in_features, int(m.act_quant.salient.sum()))
    store = storage_bits_per_weight(m.out_features, m.in_features, code_bits,
                                    m.out_features * groups * 2, masks)
    cost = layer_cost(name, m.out_features, m.in_features, t, q.wbits, q.abits,
                      storage_bits=store, scale_mults=2 * groups)
    base = layer_cost(name, m.out_features, m.in_features, torch.ones(m.in_features),
                      q.wbits, q.abits, scale_mults=2 * groups,
                      storage_bits=storage_bits_per_weight(
                          m.out_features, m.in_features, m.out_features * m.in_features * q.wbits,
                          m.out_features * groups * 2))
    return cost, base


def block_layer_costs(module: nn.Module, prefix: str, q: MethodConfig, s: SpikingMode
                      ) -> list[tuple[LayerCost, LayerCost]]:
    """(cost, baseline) of every QuantLinear under `module`, named `prefix` + its path."""
    from .omniquant import QuantLinear
    return [quantlinear_cost(prefix + name, m, q, s) for name, m in module.named_modules()
            if isinstance(m, QuantLinear)]


def omniquant_layer_costs(model: nn.Module, q: MethodConfig, s: SpikingMode
                          ) -> tuple[list[LayerCost], list[LayerCost]]:
    """-> (the cost of every QuantLinear, the same layers as the plain one-step W/A baseline)."""
    pairs = block_layer_costs(model, "", q, s)
    return [c for c, _ in pairs], [b for _, b in pairs]


def cost_summary(layers: list[LayerCost], base: list[LayerCost]) -> dict[str, float]:
    """{avg_steps, ace, ace_rel_fp16, ace_rel_baseline, additive_fraction} of `layers` (and of the
    baseline `base`, as returned by `omniquant_layer_costs`)."""
    out = total_cost(layers)
    out["ace_rel_baseline"] = out["ace"] / max(total_cost(base)["ace"], 1e-12)
    return out


def omniquant_cost(model: nn.Module, q: MethodConfig, s: SpikingMode) -> dict[str, float]:
    """`cost_summary` over every QuantLinear of `model`."""
    return cost_summary(*omniquant_layer_costs(model, q, s))
