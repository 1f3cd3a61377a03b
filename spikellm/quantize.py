"""`quantize(model, calib_ids, GPTQConfig(...), spiking=TernarySpiking(...))`: weight-only post-training
quantization of every decoder-block linear, block by block (GPTQ pipeline, method.md §5).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import (LayerCost, allocate_steps, layer_cost, mask_bits, storage_bits_per_weight,
                         total_cost)
from .blockwise import (BlockInputs, BlockMethod, BlockResult, InputCollector, ModuleStats,
                        forward_block, peak_memory_gb, run_blockwise)
from .config import MethodConfig, NoSpiking, Rotation, SpikingMode, validate
from .gptq import gptq_solve
from .hessian import HessianAccumulator, prepare_hessian
from .models import FamilySpec, family_of, get_module
from .omni_attention import use_spiking_attention
from .omniquant import _mask_pass, _set_quant, wrap_block, wrap_for_inference
from .packing import pack_layer, unpack_layer
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
    #: what the method learned, per block (OmniQuant: LET scales, LWC factors, epoch losses)
    params: dict = field(default_factory=dict)
    #: with `pack=True`: "<module path>.<tensor>" -> the packed layers' tensors (`packing`)
    packed: dict = field(default_factory=dict)
    #: modules outside the decoder blocks whose tensors the run changed (a rotation: the
    #: embeddings, the head, the final norm); a saved quantized model must include them
    outside: list[str] = field(default_factory=list)


def _make_quantizer(q: MethodConfig, s: SpikingMode, W: torch.Tensor, U: torch.Tensor,
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
        return (TernaryGIFQuantizer(steps, s.threshold_group(q), s.salient_scale, s.weighted),
                col_steps, None, None)
    return UniformQuantizer(q.wbits, q.group_size, q.sym, q.mse), torch.ones(C_in, dtype=torch.long), None, None


def quantize_linear(name: str, layer: nn.Linear, H: torch.Tensor | None, q: MethodConfig,
                    s: SpikingMode, seed: int = 0, log=print,
                    saliency_diag: torch.Tensor | None = None, pack: bool = False) -> tuple[dict, LayerCost]:
    """Quantize one linear in place. H [C_in, C_in] from calibration (None: RTN, no Hessian).

    `saliency_diag` [C_in]: diag(chol(H⁻¹)) to score saliency with instead of this H's (e.g.
    from the full-precision model, so one set of scores serves a whole allocation sweep).
    `pack`: info["packed"] also holds the layer's codes and FP16 parameters (`packing.pack_layer`),
    and the layer gets the weights those give (FP16-rounded scales: what a packed export stores)."""
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
    packed = _pack(res, quantizer) if pack else None
    # packed: the model computes with the weights as stored (FP16 scales), so the export reloads
    # to exactly the evaluated model; dense: the solver's weights (FP32 scales)
    layer.weight.data = (res.Q if packed is None else unpack_layer(packed).to(res.Q.device)).to(W.dtype)
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
    if hasattr(quantizer, "weight_spikes"):
        cost.weight_spikes, cost.weight_slots = quantizer.weight_spikes()
    info = {"loss": res.loss, "recon_error": res.recon_error, "seconds": res.seconds,
            "damp": res.damp, "avg_steps": float(steps.float().mean()), "notes": notes}
    if packed is not None:
        info["packed"] = packed
    return info, cost


def _pack(res, quantizer) -> dict[str, torch.Tensor]:
    """The solved layer as `packing.pack_layer` tensors (codes + FP16 parameters)."""
    classes, cls, per_column = quantizer.code_classes()
    if cls is not None and res.perm is not None:          # solver order -> original columns
        inv = torch.argsort(res.perm.cpu())
        cls = cls[inv] if per_column else cls[:, inv]
    return pack_layer(res.Q, classes, cls, quantizer.span,
                      None if res.perm is None else res.perm.cpu(), per_column)


class GPTQFamily(BlockMethod):
    """The GPTQ-pipeline plug-in (method.md §5): every block linear quantized in place by
    `quantize_linear` (RTN, GPTQ, PB-LLM, ternary spiking), in `spec.sequential` groups whose
    Hessians come from the quantized prefix's activations (`quant.true_sequential`)."""

    def __init__(self, q: MethodConfig, s: SpikingMode, spec: FamilySpec, batch_size: int = 8,
                 log=print, saliency_diags: dict | None = None, device="cpu", pack: bool = False):
        """`device` is where the engine runs; the solves run where each weight lives. `pack`:
        each block's result carries its layers' packed codes (`packing`) as extras
        "packed.<module path>.<tensor>"."""
        super().__init__()
        self.q, self.s, self.spec, self.batch_size, self.log = q, s, spec, batch_size, log
        self.pack = pack
        self.saliency_diags = saliency_diags
        self.notes: list[str] = []
        self.desc = f"{q.method}{'+' + s.mode if s.mode != 'none' else ''}"
        #: activations (and K/V) quantized per token (QuaRot-style W4A4KV4; GIF spiking with t2/t4)
        self.act = getattr(q, "abits", 16) < 16
        # plain round-to-nearest needs no calibration activations at all
        self.needs_inputs = not (q.method == "rtn" and s.mode == "none")

    # -- activation quantization (quant.abits < 16) ---------------------------------------------
    def prepare(self, model: nn.Module, spec: FamilySpec) -> None:
        if self.act:
            use_spiking_attention(model)

    def restore(self, block: nn.Module) -> None:
        if self.act:
            wrap_block(block, self.spec, self.q, self.s, train=False)

    def finalize(self, model: nn.Module, spec: FamilySpec) -> None:
        if self.act:
            model.config.use_cache = False

    def restore_for_inference(self, model: nn.Module) -> None:
        if self.act:
            wrap_for_inference(model, self.q, self.s)

    def _wrap_acts(self, i: int, block: nn.Module, x: BlockInputs) -> dict:
        """Activation and K/V quantizers on the block (off while its weights are solved, as
        QuaRot's GPTQ sees full-precision activations); with GIF spiking, the salient channels
        from the activation and KV saliency of the full-precision block on its inputs `x`
        (in the rotated basis on a rotated model). -> name -> QuantLinear."""
        linears = wrap_block(block, self.spec, self.q, self.s, train=False)
        _set_quant(block, linears, False)
        if self.s.mode == "gif" and self.s.ratio > 0:
            _mask_pass(block, linears, x, self.q, self.s, self.s.seed + 1000 * i, self.batch_size)
        return linears

    def _act_cost(self, c: LayerCost, ql) -> LayerCost:
        """The weight cost `c` of a QuantLinear `ql` with quantized activations: each input channel
        j costs w_bits · a_bits per step, 2**addbit steps on salient channels; the salient mask
        is stored."""
        t = torch.ones(ql.in_features)
        sal = ql.act_quant.salient.reshape(-1).cpu()
        if self.s.mode == "gif":
            t = torch.where(sal, float(2 ** self.s.addbit), t)
        store = c.storage_bits + mask_bits(ql.in_features, int(sal.sum())) / (c.c_out * c.c_in)
        return layer_cost(c.name, c.c_out, c.c_in, t, self.q.wbits, self.q.abits,
                          storage_bits=store, scale_mults=c.scale_mults)

    def process(self, i: int, block: nn.Module, inputs: dict[str, BlockInputs]) -> BlockResult:
        q, s = self.q, self.s
        x = inputs.get("hidden")
        samples = 0 if x is None else x.hidden.shape[0]
        groups = self.spec.sequential if q.true_sequential else (self.spec.linears(),)
        rows, costs, packed = [], [], {}
        wrapped = self._wrap_acts(i, block, x) if self.act else {}
        for group in groups:
            linears = {name: get_module(block, name) for name in group}
            # linears of a sequential group share their input, hence one Hessian per group
            # (without true_sequential every linear is its own group of inputs)
            shared = q.true_sequential
            firsts = {group[0]: linears[group[0]]} if shared else linears
            hessians = {name: HessianAccumulator(m.in_features, device=m.weight.device)
                        for name, m in firsts.items()}
            if self.needs_inputs and (q.method != "rtn" or s.mode == "ternary"):
                with InputCollector(firsts, lambda n, x: hessians[n].add_batch(x)):
                    forward_block(block, x, self.batch_size, collect_only=True)
            for k, (name, layer) in enumerate(linears.items()):
                t0 = time.time()
                acc = hessians[group[0] if shared else name]
                H = acc.H if acc.nsamples else None
                diag = None if self.saliency_diags is None else self.saliency_diags[f"{i}.{name}"]
                info, cost = quantize_linear(f"{i}.{name}", layer, H, q, s,
                                             seed=getattr(s, "seed", 0) * 100003 + i * 101 + k, log=self.log,
                                             saliency_diag=diag, pack=self.pack)
                for t, v in info.get("packed", {}).items():
                    packed[f"packed.{self.spec.blocks}.{i}.{name}.{t}"] = v
                cost.name = f"{i}.{name}"
                costs.append(cost)
                self.notes.extend(info["notes"])
                rows.append(ModuleStats(block=i, module=name, loss=info["loss"],
                                        recon_error=info["recon_error"],
                                        seconds=time.time() - t0, samples=samples,
                                        avg_steps=info["avg_steps"], damp=info["damp"],
                                        peak_mem_gb=peak_memory_gb(layer.weight.device),
                                        c_out=cost.c_out, c_in=cost.c_in, ace=cost.ace,
                                        fp16_ace=cost.fp16_ace,
                                        additive_fraction=cost.additive_fraction,
                                        storage_bits=cost.storage_bits,
                                        scale_mults=cost.scale_mults))
        if not wrapped:
            return BlockResult(rows=rows, costs=costs, extra=packed)
        # the next block's inputs from the W-quantized block with full-precision activations
        # (QuaRot's GPTQ order), then the activation and K/V quantizers go on
        nxt = forward_block(block, x, self.batch_size) if x is not None else None
        _set_quant(block, wrapped, True)
        costs = [self._act_cost(c, wrapped[r.module]) for c, r in zip(costs, rows)]
        for r, c in zip(rows, costs):
            r.avg_steps, r.ace, r.storage_bits = c.avg_steps, c.ace, c.storage_bits
        return BlockResult(rows=rows, costs=costs, extra=packed,
                           streams=None if nxt is None else {"hidden": nxt})

    def baseline_ace(self, c: LayerCost) -> float:
        """ACE of the same layer on the same grid with one step everywhere (plain W-bit, or plain
        ternary / binary; W·A bits per MAC with quantized activations), scale multiplies included."""
        base_bits = self.s.spike_bits if self.s.mode == "ternary" else \
            (1.0 if self.q.method == "pbllm" else self.q.wbits)
        act_bits = self.q.abits if self.act else 16.0
        return c.c_out * (c.c_in * base_bits * act_bits + c.scale_mults * 256.0)


def quantize(model: nn.Module, calib_ids: torch.Tensor, config: MethodConfig | None = None,
             spiking: SpikingMode | None = None, batch_size: int = 8, device="cpu",
             progress: bool = True, log=print, saliency_diags: dict | None = None,
             checkpoint_dir=None, stream=None, on_block=None, rotate: Rotation | None = None,
             **method_kwargs) -> QuantReport:
    """Quantize all decoder-block linears of `model` in place with the method `config` is the
    config of (`GPTQConfig`, `RTNConfig`, `PBLLMConfig`, `OmniQuantConfig`: the registry
    `spikellm.methods.METHODS`), spiking as `spiking` says (`TernarySpiking`, `GIFSpiking`;
    None: no spiking), on the engine.

    calib_ids [N, seqlen] calibration token ids. `saliency_diags` ("<block>.<linear>" ->
    diag(chol(H⁻¹)) [C_in], see `fp_saliency_diagonals`) scores spiking saliency on fixed
    Hessians instead of the sequential ones (GPTQ family). `checkpoint_dir` commits every
    finished block and resumes after the last committed one (preemption, kills); `stream` (a
    `streaming.BlockStream`) keeps one block in memory at a time; `on_block(row)` is called after
    each block (`blockwise.run_blockwise`: index, loss, seconds, memory). `method_kwargs` go to the
    method (e.g. OmniQuant's `act_absmax`). `rotate` (`Rotation(mode="hadamard")`): QuaRot's
    rotation first, block by block (`rotation.Rotated`; the embeddings and head change too:
    `QuantReport.outside` names them). Returns per-module stats, the cost of the result
    (equal steps, ACE relative to FP16 and to the one-step baseline, additive share, storage
    bits) and what the method learned (`params`)."""
    from .methods import make_method
    from .config import GPTQConfig
    q = config if config is not None else GPTQConfig()
    s = spiking if spiking is not None else NoSpiking()
    validate(q, s, rotate)
    spec = family_of(model)
    if saliency_diags is not None:
        method_kwargs["saliency_diags"] = saliency_diags
    method = make_method(q, s, spec, rotate, batch_size=batch_size, device=device, log=log,
                         **method_kwargs)
    res = run_blockwise(model, spec, calib_ids, method, device=device, batch_size=batch_size,
                        progress=progress, checkpoint_dir=checkpoint_dir, log=log, stream=stream,
                        on_block=on_block)
    total = total_cost(res.costs)
    base = sum(method.baseline_ace(c) for c in res.costs)
    total["ace_rel_baseline"] = total["ace"] / base if base else 0.0
    params = {k: v for e in res.extras for k, v in e.items()}
    packed = {k[len("packed."):]: params.pop(k) for k in [k for k in params if k.startswith("packed.")]}
    return QuantReport(stats=res.stats, costs=res.costs, seconds=res.seconds, cost=total,
                       notes=list(getattr(method, "notes", [])), params=params, packed=packed,
                       outside=list(getattr(method, "outside_modules", ())))


def fp_saliency_diagonals(model: nn.Module, calib_ids: torch.Tensor, percdamp: float = 0.01,
                          batch_size: int = 8, device="cpu", progress: bool = True,
                          stream=None) -> dict:
    """diag(U), U = chol(H⁻¹), of every block linear, with H from the *full-precision* model's
    activations on calib_ids [N, seqlen]: "<block>.<linear>" -> [C_in]. Weights are unchanged.
    The Hessian saliency of any allocation (column or element) follows from it and W."""
    out: dict[str, torch.Tensor] = {}
    run_blockwise(model, family_of(model), calib_ids, _FPSaliency(percdamp, batch_size, out),
                  device=device, batch_size=batch_size, progress=progress, stream=stream)
    return out


class _FPSaliency(BlockMethod):
    """Statistics pass: fills `out` with diag(chol(H⁻¹)) per linear; weights unchanged."""
    desc = "saliency"

    def __init__(self, percdamp: float, batch_size: int, out: dict):
        super().__init__()
        self.percdamp, self.batch_size, self.out = percdamp, batch_size, out

    def prepare(self, model, spec):
        self.spec = spec

    def process(self, i, block, inputs):
        firsts = {g[0]: get_module(block, g[0]) for g in self.spec.sequential}
        hessians = {n: HessianAccumulator(m.in_features, device=m.weight.device)
                    for n, m in firsts.items()}
        with InputCollector(firsts, lambda n, x: hessians[n].add_batch(x)):
            forward_block(block, inputs["hidden"], self.batch_size, collect_only=True)
        for group in self.spec.sequential:
            U = prepare_hessian(hessians[group[0]].H, percdamp=self.percdamp).U
            for name in group:
                self.out[f"{i}.{name}"] = torch.diag(U).float().cpu()
        return BlockResult()
