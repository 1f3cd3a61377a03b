"""`quantize(model, calib_ids, QuantConfig, SpikingConfig)`: weight-only post-training
quantization of every decoder-block linear, block by block (GPTQ pipeline, method.md §5).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import LayerCost, allocate_steps, layer_cost, storage_bits_per_weight, total_cost
from .blockwise import (BlockInputs, InputCollector, ModuleStats, forward_block, peak_memory_gb,
                        run_blockwise)
from .config import QuantConfig, SpikingConfig, validate
from .gptq import gptq_solve
from .hessian import HessianAccumulator, prepare_hessian
from .models import FamilySpec, blocks_of, family_of, get_module
from .quantizers import PBLLMQuantizer, TernaryGIFQuantizer, UniformQuantizer
from .saliency import hessian_column_saliency, hessian_element_saliency


@dataclass
class QuantReport:
    """What a quantization run did: per-module stats, per-layer cost, totals."""
    stats: list[ModuleStats]
    costs: list[LayerCost]
    seconds: float
    cost: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _make_quantizer(q: QuantConfig, s: SpikingConfig, W: torch.Tensor, U: torch.Tensor,
                    seed: int):
    """Returns (quantizer, steps per column [C_in], extra_bits per column or None)."""
    C_in = W.shape[1]
    if q.method == "pbllm":
        pq = PBLLMQuantizer(q.salient_frac, q.high_bits, q.group_size)
        pq.prepare(W.float(), U)
        bits = (pq.mask.float() * q.high_bits + (~pq.mask).float()).mean(0)
        # PB-LLM's "equal steps": mean bits per weight, (1-r)*1 + r*high_bits
        return pq, bits, bits, pq.mask.float().mean(0)
    if s.mode == "ternary":
        if s.granularity == "element":
            scores = hessian_element_saliency(W, U)
            steps = allocate_steps(scores.flatten(), s.ratio, s.steps, s.select, seed).view_as(W)
        else:
            steps = allocate_steps(hessian_column_saliency(W, U), s.ratio, s.steps, s.select, seed)
        col_steps = steps.float().mean(0) if steps.dim() == 2 else steps
        return (TernaryGIFQuantizer(steps, s.group_size, s.salient_scale, s.weighted),
                col_steps, None, None)
    return UniformQuantizer(q.wbits, q.group_size, q.sym, q.mse), torch.ones(C_in, dtype=torch.long), None, None


def quantize_linear(name: str, layer: nn.Linear, H: torch.Tensor | None, q: QuantConfig,
                    s: SpikingConfig, seed: int = 0, log=print,
                    saliency_diag: torch.Tensor | None = None) -> tuple[dict, LayerCost]:
    """Quantize one linear in place. H [C_in, C_in] from calibration (None: RTN, no Hessian).

    `saliency_diag` [C_in]: diag(chol(H⁻¹)) to score saliency with instead of this H's (e.g.
    from the full-precision model, so one set of scores serves a whole allocation sweep)."""
    W = layer.weight.data
    notes = []
    on_damp = lambda msg: notes.append(f"{name}: {msg}")   # noqa: E731
    ph = prepare_hessian(H, W.shape[1], W.device, q.percdamp,
                         on_retry=None if q.actorder else on_damp)
    quantizer, steps, extra_bits, high_frac = _make_quantizer(
        q, s, W.float(), ph.U if saliency_diag is None else saliency_diag, seed)
    res = gptq_solve(W, H, quantizer, blocksize=q.blocksize, percdamp=q.percdamp,
                     actorder=q.actorder, error_feedback=q.method != "rtn",
                     on_damp=on_damp, prepared=ph)
    for n in notes:
        log(n)
    layer.weight.data = res.Q.to(W.dtype)
    ternary = s.mode == "ternary"
    bits_per_step = s.spike_bits if ternary else (1.0 if q.method == "pbllm" else q.wbits)
    store = quantizer.storage(*W.shape)
    if ternary:
        # spikes only add or subtract; each output multiplies once per threshold (group x
        # normal/salient) to scale its partial sums
        additive = 1.0 - store["scale_mults"] / W.shape[1]
    else:
        additive = 1 - high_frac if high_frac is not None else False
    cost = layer_cost(name, W.shape[0], W.shape[1], steps, bits_per_step, 16.0,
                      additive=additive, extra_bits=extra_bits,
                      storage_bits=storage_bits_per_weight(W.shape[0], W.shape[1], store["code_bits"],
                                                           store["fp16_params"], store["mask_bits"]),
                      scale_mults=store["scale_mults"])
    return {"loss": res.loss, "recon_error": res.recon_error, "seconds": res.seconds,
            "damp": res.damp, "avg_steps": float(steps.float().mean()), "notes": notes}, cost


def _block_algorithm(q: QuantConfig, s: SpikingConfig, spec: FamilySpec, batch_size: int,
                     costs: list, notes: list, log, saliency_diags: dict | None = None):
    groups = spec.sequential if q.true_sequential else (spec.linears(),)

    def algorithm(i: int, block: nn.Module, inputs: BlockInputs) -> list[ModuleStats]:
        rows = []
        for group in groups:
            linears = {name: get_module(block, name) for name in group}
            # linears of a sequential group share their input, hence one Hessian per group
            # (without true_sequential every linear is its own group of inputs)
            shared = q.true_sequential
            firsts = {group[0]: linears[group[0]]} if shared else linears
            hessians = {name: HessianAccumulator(m.in_features, device=m.weight.device)
                        for name, m in firsts.items()}
            if q.method != "rtn" or s.mode == "ternary":
                with InputCollector(firsts, lambda n, x: hessians[n].add_batch(x)):
                    forward_block(block, inputs, batch_size, collect_only=True)
            for k, (name, layer) in enumerate(linears.items()):
                t0 = time.time()
                acc = hessians[group[0] if shared else name]
                H = acc.H if acc.nsamples else None
                info, cost = quantize_linear(
                    f"{i}.{name}", layer, H, q, s, seed=s.seed * 100003 + i * 101 + k, log=log,
                    saliency_diag=None if saliency_diags is None else saliency_diags[f"{i}.{name}"])
                cost.name = f"{i}.{name}"
                costs.append(cost)
                notes.extend(info["notes"])
                rows.append(ModuleStats(block=i, module=name, loss=info["loss"],
                                        recon_error=info["recon_error"],
                                        seconds=time.time() - t0,
                                        samples=inputs.hidden.shape[0],
                                        avg_steps=info["avg_steps"], damp=info["damp"],
                                        peak_mem_gb=peak_memory_gb(layer.weight.device),
                                        c_out=cost.c_out, c_in=cost.c_in, ace=cost.ace,
                                        fp16_ace=cost.fp16_ace,
                                        additive_fraction=cost.additive_fraction,
                                        storage_bits=cost.storage_bits,
                                        scale_mults=cost.scale_mults))
        return rows
    return algorithm


def quantize(model: nn.Module, calib_ids: torch.Tensor, q: QuantConfig | None = None,
             s: SpikingConfig | None = None, batch_size: int = 8, device="cpu",
             progress: bool = True, log=print, saliency_diags: dict | None = None,
             checkpoint_dir=None, stream=None) -> QuantReport:
    """Quantize all decoder-block linears of `model` in place.

    calib_ids [N, seqlen] calibration token ids. `saliency_diags` ("<block>.<linear>" ->
    diag(chol(H⁻¹)) [C_in], see `fp_saliency_diagonals`) scores spiking saliency on fixed
    Hessians instead of the sequential ones. `checkpoint_dir` commits every finished block and
    resumes after the last committed one (preemption, kills). Returns per-module stats and the cost of the
    resulting allocation (equal steps, ACE relative to FP16, additive share)."""
    q = q or QuantConfig()
    s = s or SpikingConfig()
    validate(q, s)
    spec = family_of(model)
    costs: list[LayerCost] = []
    notes: list[str] = []
    t0 = time.time()
    algorithm = _block_algorithm(q, s, spec, batch_size, costs, notes, log, saliency_diags)
    if q.method == "rtn" and s.mode == "none":
        # plain round-to-nearest needs no calibration activations at all
        no_inputs = BlockInputs(hidden=calib_ids[:0], kwargs={})
        stats = []
        for i, block in enumerate(blocks_of(model, spec)):
            block = block if stream is None else stream.materialize(i, block)
            stats.extend(algorithm(i, block, no_inputs))
            if stream is not None:
                stream.release(i, block)
    else:
        stats = run_blockwise(model, spec, calib_ids, algorithm, device=device,
                              batch_size=batch_size, progress=progress,
                              desc=f"{q.method}{'+' + s.mode if s.mode != 'none' else ''}",
                              checkpoint_dir=checkpoint_dir, log=log, stream=stream)
    # from the stats rows, so blocks restored from a checkpoint are counted too
    costs = [LayerCost(f"{r.block}.{r.module}", r.c_out, r.c_in, r.avg_steps, r.ace, r.fp16_ace,
                       r.additive_fraction, storage_bits=r.storage_bits, scale_mults=r.scale_mults)
             for r in stats]
    total = total_cost(costs)
    # baseline: the same grid with one step everywhere (plain W-bit, or plain ternary / binary)
    base_bits = s.spike_bits if s.mode == "ternary" else (1.0 if q.method == "pbllm" else q.wbits)
    base = sum(c.c_out * (c.c_in * base_bits + c.scale_mults * 16.0) * 16.0 for c in costs)
    total["ace_rel_baseline"] = total["ace"] / base if base else 0.0
    return QuantReport(stats=stats, costs=costs, seconds=time.time() - t0, cost=total, notes=notes)


def fp_saliency_diagonals(model: nn.Module, calib_ids: torch.Tensor, percdamp: float = 0.01,
                          batch_size: int = 8, device="cpu", progress: bool = True,
                          stream=None) -> dict:
    """diag(U), U = chol(H⁻¹), of every block linear, with H from the *full-precision* model's
    activations on calib_ids [N, seqlen]: "<block>.<linear>" -> [C_in]. Weights are unchanged.
    The Hessian saliency of any allocation (column or element) follows from it and W."""
    spec = family_of(model)
    out: dict[str, torch.Tensor] = {}

    def algorithm(i: int, block: nn.Module, inputs: BlockInputs) -> list[ModuleStats]:
        firsts = {g[0]: get_module(block, g[0]) for g in spec.sequential}
        hessians = {n: HessianAccumulator(m.in_features, device=m.weight.device)
                    for n, m in firsts.items()}
        with InputCollector(firsts, lambda n, x: hessians[n].add_batch(x)):
            forward_block(block, inputs, batch_size, collect_only=True)
        for group in spec.sequential:
            U = prepare_hessian(hessians[group[0]].H, percdamp=percdamp).U
            for name in group:
                out[f"{i}.{name}"] = torch.diag(U).float().cpu()
        return []

    run_blockwise(model, spec, calib_ids, algorithm, device=device, batch_size=batch_size,
                  progress=progress, desc="saliency", stream=stream)
    return out
