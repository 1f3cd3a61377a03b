"""Measured spiking: firing rates, synaptic operations and event-driven energy counted from the
spikes a quantized model fires on real inputs (issue "Measured spiking").

What fires (the explicit spike forms of `gif.py`, proven equal to the fake-quant forms):

- **activation spikes** (every linear input with an activation quantizer: OmniQuant/SpikeLLM
  W4A4 t2/t4, and the GPTQ pipeline with quant.abits < 16): per token, a normal channel is one
  GIF step of L = 2**b levels whose spike is its b-bit code; a salient channel is 2**a GIF steps
  of L levels that fire its (b+a)-bit code (`gif.spike_train`). A spike fires when its value is
  not 0. The codes are the asymmetric ones (x = Δ(q - z)), so code 0 is the bottom of the
  token's range, not x = 0: a zero-centred activation mostly fires. Counted over the windows.
- **K/V spikes** (the spiking KV cache): the same per token and head; reported as firing rates
  only (the Q·Kᵀ and P·V products are outside ACE and energy, as in `allocation`).
- **weight spikes** (SpikeLLM ternary GIF weights): a weight with code c fires |c| ternary
  spikes; static, recorded when the layer was quantized (`allocation.LayerCost.weight_spikes`).

Per token and layer (C_out x C_in): synaptic operations (SOPs) = each fired spike x its fan-out
(C_out for an activation spike; 1 for a weight spike, which adds ±x_j into one output), plus the
multiplies that remain: the layer's scale/zero multiplies (`LayerCost.scale_mults` per output)
and, with quantized activations, 2 per output per activation grid (the token's scale Δ and its
zero-point correction Δ·z·ΣW, once for the normal and once for the salient channels). Layers
without spikes (floating-point activations and weights on a uniform grid, FP16) do every MAC.

Event-driven energy per token, with the run's ASSUMED `allocation.EnergyModel` constants and
the same prices as the formula-based estimate (`allocation.layer_energy`), so the two compare:
an activation spike of any level costs one w_bits x a_bits integer multiply-accumulate
(w·a·int_mul_bitop + int_add: a level-1 spike is not priced as an add); a weight spike costs one
floating-point add (fp_add); a remaining multiply costs 16 x 16 bit-operations (integer layers)
or one fp_mac (floating-point layers); a layer without spikes costs its formula energy. The
formula pays every GIF step of every neuron; the measured figure pays the fired spikes and the
extra zero-point multiplies, which the formula leaves out, so it can be the larger one.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .allocation import EnergyModel, LayerCost, layer_energy


def parse_layer(name: str) -> tuple[int, str]:
    """"model.layers.3.mlp.down_proj" or "3.mlp.down_proj" -> (3, "mlp.down_proj")."""
    parts = name.split(".")
    i = next(k for k, p in enumerate(parts) if p.isdigit())
    return int(parts[i]), ".".join(parts[i + 1:])


@dataclass
class LayerSpikes:
    """One layer's measured spiking, per token (weight spikes: per token too, every token uses
    every weight spike once). `levels[v - 1]`: fired spikes of value v = 1..L-1 per token
    (activation spikes; weight spikes: one entry, the ±1 spikes)."""
    block: int
    role: str                    #: e.g. "mlp.down_proj", "self_attn.k" (K cache), "self_attn.v"
    kind: str                    #: "act", "weight", "kv", or "dense" (no spikes: every MAC)
    slots: float = 0.0           #: neuron-steps per token (act, kv) / spike slots Σ T (weight)
    fired: float = 0.0           #: nonzero spikes per token (or per layer, static, for weights)
    levels: list[float] = field(default_factory=list)
    sops: float = 0.0            #: synaptic operations per token (spikes x fan-out + multiplies)
    mults: float = 0.0           #: the multiplies that remain, per token
    energy_pj: float = 0.0       #: event-driven energy per token
    formula_pj: float = 0.0      #: the formula-based energy of the same layer (layer_energy)

    @property
    def name(self) -> str:
        return f"{self.block}.{self.role}"

    @property
    def firing_rate(self) -> float:
        return self.fired / self.slots if self.slots else 0.0

    def row(self) -> dict:
        return {"layer": self.name, **asdict(self), "firing_rate": self.firing_rate}


class _Tally:
    """Running sums of one activation quantizer's spikes over the inputs it sees."""

    def __init__(self, levels: int):
        self.tokens = 0
        self.slots = 0.0
        self.fired = 0.0
        self.hist = torch.zeros(levels, dtype=torch.float64)

    @torch.no_grad()
    def add(self, codes, tokens: int) -> None:
        """codes: an `omni_quantizers.SpikeCodes` over `tokens` tokens."""
        lo, train = codes.spikes()
        sal = codes.salient
        n_sal = float(sal.sum())
        self.slots += (sal.numel() - n_sal) + n_sal * codes.steps
        spikes = [lo] + ([] if train is None else list(train))
        for s in spikes:
            v = s.reshape(-1).long().clamp(0, codes.levels - 1)
            self.hist += torch.bincount(v, minlength=codes.levels)[: codes.levels].double().cpu()
        self.fired = float(self.hist[1:].sum())
        self.tokens += tokens


def _tokens(quantizer: nn.Module, x: torch.Tensor, kv: bool) -> int:
    """Tokens in a quantizer input: a linear's x [..., C] has x[..., 0].numel(); K/V
    [b, kv_heads, l, d] has b·l (K per channel arrives transposed, [b, kv_heads, d, l])."""
    if not kv:
        return x[..., 0].numel()
    if quantizer.salient.dim() == 3 and quantizer.salient.shape[-1] == 1:     # channel axis
        return x.shape[0] * x.shape[-1]
    return x.shape[0] * x.shape[-2]


def _w_bits(c: LayerCost) -> float:
    """Weight bits per step of a layer, from its ACE: c_out · Σ_j w·a·T_j + c_out·scale_mults·256."""
    steps = c.c_out * c.c_in * c.avg_steps * c.act_bits
    return (c.ace - c.c_out * c.scale_mults * 256) / steps if steps else 0.0


class SpikeAccounting:
    """Counts the spikes of every activation (and K/V) quantizer of `model` while it runs:
    `with SpikeAccounting(model) as acc: model(windows)`, then `acc.layers(costs, energy)`.
    Hooks only observe (the model computes what it computed before); inference only."""

    def __init__(self, model: nn.Module):
        from .omni_attention import KVQuantizer
        from .omniquant import QuantLinear
        self.model = model
        self.tallies: dict[tuple[int, str, str], _Tally] = {}
        self.fan_out: dict[tuple[int, str, str], int] = {}
        self._watch: list[tuple[tuple[int, str, str], nn.Module, int]] = []
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and m.act_quant is not None and m.act_quant.active:
                block, role = parse_layer(name)
                self._watch.append(((block, role, "act"), m.act_quant, m.out_features))
            elif isinstance(m, KVQuantizer):
                block, role = parse_layer(name)
                base = role.rsplit(".", 1)[0]
                for q, tag in ((m.k, "k"), (m.v, "v")):
                    if q.active:
                        self._watch.append(((block, f"{base}.{tag}", "kv"), q, 0))
        self.handles = []

    def _hook(self, key):
        def pre(module, args):
            x = args[0]
            if getattr(module, "fitting", False):
                return
            c = module.spike_codes(x)
            if key not in self.tallies:
                self.tallies[key] = _Tally(c.levels)
            self.tallies[key].add(c, _tokens(module, x, key[2] == "kv"))
        return pre

    def __enter__(self):
        for key, q, fan in self._watch:
            self.fan_out[key] = fan
            self.handles.append(q.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    # ------------------------------------------------------------------------------ results
    def layers(self, costs: list[LayerCost], energy: EnergyModel | None = None) -> list[LayerSpikes]:
        """Every layer of `costs` (the quantize stage's layer costs) with its measured spikes, SOPs
        and event-driven energy per token, plus the K/V rows (firing rates only). Overhead rows
        (a rotation's online transforms) keep their formula energy as dense rows."""
        e = energy or EnergyModel()
        out = []
        for c in costs:
            formula = layer_energy(c, e)[0]
            if c.overhead:
                block, role = parse_layer(c.name)
                out.append(LayerSpikes(block, role, "dense", sops=c.ace / max(c.act_bits, 1.0),
                                       energy_pj=formula, formula_pj=formula))
                continue
            block, role = parse_layer(c.name)
            t = self.tallies.get((block, role, "act"))
            if t is not None and t.tokens:
                fired, slots = t.fired / t.tokens, t.slots / t.tokens
                grids = 2 if c.avg_steps > 1 else 1                 # normal (+ salient) activation grid
                mults = c.c_out * (c.scale_mults + 2 * grids)
                sop_pj = _w_bits(c) * c.act_bits * e.int_mul_bitop + e.int_add
                out.append(LayerSpikes(block, role, "act", slots, fired, (t.hist[1:] / t.tokens).tolist(),
                                       sops=fired * c.c_out + mults, mults=mults,
                                       energy_pj=fired * c.c_out * sop_pj + mults * 256 * e.int_mul_bitop,
                                       formula_pj=formula))
            elif c.weight_slots:
                mults = c.c_out * c.scale_mults
                out.append(LayerSpikes(block, role, "weight", c.weight_slots, c.weight_spikes,
                                       [c.weight_spikes], sops=c.weight_spikes + mults, mults=mults,
                                       energy_pj=c.weight_spikes * e.fp_add + mults * e.fp_mac,
                                       formula_pj=formula))
            else:
                out.append(LayerSpikes(block, role, "dense", sops=c.c_out * c.c_in * c.avg_steps,
                                       energy_pj=formula, formula_pj=formula))
        for (block, role, kind), t in sorted(self.tallies.items()):
            if kind == "kv" and t.tokens:
                out.append(LayerSpikes(block, role, "kv", t.slots / t.tokens, t.fired / t.tokens,
                                       (t.hist[1:] / t.tokens).tolist()))
        return out


def spike_metrics(layers: list[LayerSpikes], formula_energy_pj: float | None = None) -> dict[str, float]:
    """spike/firing_rate (mean over the spiking linear layers), spike/firing_rate/<role> (mean
    over blocks), spike/firing_rate/<block>.<role> (every layer, K/V included), cost/sops,
    cost/energy_event_pj (per token), and cost/energy_event_rel_formula against
    `formula_energy_pj` (the run's cost/energy_pj)."""
    spiking = [s for s in layers if s.kind in ("act", "weight")]
    out: dict[str, float] = {}
    if spiking:
        out["spike/firing_rate"] = sum(s.firing_rate for s in spiking) / len(spiking)
    roles = defaultdict(list)
    for s in layers:
        if s.kind in ("act", "weight", "kv"):
            roles[s.role].append(s.firing_rate)
            out[f"spike/firing_rate/{s.name}"] = s.firing_rate
    for role, rates in roles.items():
        out[f"spike/firing_rate/{role}"] = sum(rates) / len(rates)
    out["cost/sops"] = sum(s.sops for s in layers)
    out["cost/energy_event_pj"] = sum(s.energy_pj for s in layers)
    if formula_energy_pj:
        out["cost/energy_event_rel_formula"] = out["cost/energy_event_pj"] / formula_energy_pj
    return out


@torch.no_grad()
def count_spikes(model: nn.Module, windows: torch.Tensor, costs: list[LayerCost],
                 energy: EnergyModel | None = None, batch_size: int = 4, device="cpu",
                 progress: bool = False) -> list[LayerSpikes]:
    """Run `model` over token windows [N, seqlen] with `SpikeAccounting` and return every layer's
    measured spikes (`SpikeAccounting.layers`)."""
    from tqdm.auto import tqdm
    model.eval()
    with SpikeAccounting(model) as acc:
        for b0 in tqdm(range(0, windows.shape[0], batch_size), desc="spikes", disable=not progress):
            model(windows[b0: b0 + batch_size].to(device), use_cache=False)
    return acc.layers(costs, energy)
