"""The stages of the experiment, each a plain function of (config, upstream artifacts, output
directory) returning its metrics:

    calibrate -> [score] -> quantize -> evaluate          evaluate_fp (full-precision baseline)

`score` (full-precision Hessian diagonals for saliency) exists only when
`spiking.saliency_from=fp`, so that every allocation of a sweep shares it. Which config keys
each stage's output depends on is declared in `pipelines.dag`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from spikellm.blockwise import peak_memory_gb
from spikellm.data import calibration_set, dataset_name, evaluation_set
from spikellm.evaluate import perplexity, streamed_perplexities
from spikellm.models import LoadedModel, blocks_of, load_model, resolve_source
from spikellm.quantize import fp_saliency_diagonals, quantize

from .artifacts import Artifact
from .dag import method_configs, rotation_config
from .schema import eval_gpus


def say(msg: str) -> None:
    print(f"[spikellm] {msg}", file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} requested but no CUDA GPU is visible; use device=cpu or auto")
    return device


def _export_cache(cfg) -> None:
    """paths.cache -> $SPIKELLM_CACHE (where the embedded model and task files are cached)."""
    if cfg.paths.cache:
        os.environ.setdefault("SPIKELLM_CACHE", str(Path(cfg.paths.cache).expanduser()))


def _device_map(cfg, whole_model: bool) -> str | None:
    """"auto" (accelerate spreads the layers) when a whole-model stage has several GPUs."""
    if not whole_model or eval_gpus(cfg.model.resources) < 2:
        return None
    several = resolve_device(cfg.device).startswith("cuda") and torch.cuda.device_count() > 1
    return "auto" if several else None


def load(cfg, whole_model: bool = False) -> LoadedModel:
    _export_cache(cfg)
    source = resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}")
    t0 = time.time()
    lm = load_model(source, cfg.model.dtype, resolve_device(cfg.device), _device_map(cfg, whole_model))
    say(f"loaded {cfg.model.name} from {source} in {time.time() - t0:.1f}s")
    return lm


def _tokenizer(cfg):
    from transformers import AutoTokenizer
    _export_cache(cfg)
    return AutoTokenizer.from_pretrained(
        resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}"))


def calibrate(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """-> ids.pt: [nsamples, seqlen] calibration token ids."""
    ids = calibration_set(_tokenizer(cfg), OmegaConf.to_object(cfg.calib), cfg.paths.data_dir)
    torch.save(ids, out / "ids.pt")
    return {"calib/tokens": int(ids.numel())}


def _calib_ids(deps) -> torch.Tensor:
    return torch.load(deps["calibrate"].file("ids.pt"), weights_only=True)


def _fp_model(cfg):
    """The full-precision model a statistics pass reads -> (model, stream or None): whole in
    memory, or with `model.stream` one block at a time from the checkpoint's shards."""
    if not cfg.model.stream:
        return load(cfg).model, None
    from spikellm.streaming import open_streaming
    stream = open_streaming(_local_source(cfg), None, cfg.model.dtype, resolve_device(cfg.device))
    return stream.model, stream


def score(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """-> diags.pt: {"<block>.<linear>": diag(chol(H⁻¹)) [C_in]} from full-precision activations."""
    t0 = time.time()
    model, stream = _fp_model(cfg)
    diags = fp_saliency_diagonals(model, _calib_ids(deps), cfg.quant.percdamp, cfg.batch_size,
                                  resolve_device(cfg.device), cfg.progress, stream=stream)
    if stream is not None:
        stream.close()
    torch.save(diags, out / "diags.pt")
    return {"time/score_s": time.time() - t0}


def act_stats(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """-> act_scales.safetensors: per-channel max |x| of every linear input of the full-precision
    model on the calibration set (where OmniQuant's LET starts), shared by a sweep's points."""
    from spikellm.omniquant import activation_absmax
    t0 = time.time()
    model, stream = _fp_model(cfg)
    stats = activation_absmax(model, _calib_ids(deps), resolve_device(cfg.device),
                              cfg.batch_size, cfg.progress, stream=stream)
    if stream is not None:
        stream.close()
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / "act_scales.safetensors"))
    return {"time/act_stats_s": time.time() - t0}


def quantize_stage(cfg, deps: dict[str, Artifact], out: Path, checkpoint: Path | None = None,
                   on_block=None, **_) -> dict:
    """-> weights.safetensors (every tensor of the quantized blocks: weights, norms, the
    quantizers' masks), module_stats.json, layer_costs.json, notes.json (+ omni_params.safetensors
    for methods that learn parameters); with `model.stream`, model/ instead of weights.safetensors.

    Each finished block is committed to `checkpoint`; a re-run after a kill, preemption or
    time limit resumes after the last committed block. `on_block(row)`: each finished block's
    index, loss, seconds and memory (the stage's W&B run logs them live)."""
    if cfg.model.stream:
        return _streamed_quantize(cfg, deps, out, checkpoint, on_block)
    lm = load(cfg)
    metrics = _quantize_and_report(cfg, deps, out, lm.model, checkpoint, "", on_block=on_block)
    outside = json.loads((out / "outside.json").read_text())
    save_file(_block_tensors(lm, outside), str(out / "weights.safetensors"))
    return metrics


def _quantize_and_report(cfg, deps: dict[str, Artifact], out: Path, model, checkpoint: Path | None,
                         origin: str, stream=None, on_block=None) -> dict:
    """The method's run on `model` (whole or streamed) -> module_stats.json, layer_costs.json,
    notes.json (and omni_params.safetensors when it learned parameters) in `out`, and the
    stage's metrics: cost/* (steps, ACE, storage bits, energy per token), time, memory."""
    device = resolve_device(cfg.device)
    calib = _calib_ids(deps)
    options = {}
    if "score" in deps:
        options["saliency_diags"] = torch.load(deps["score"].file("diags.pt"), weights_only=True)
    if "act_stats" in deps:
        options["act_absmax"] = load_file(str(deps["act_stats"].file("act_scales.safetensors")))
    q, s = method_configs(cfg)
    r = rotation_config(cfg)
    say(f"quantizing {cfg.model.name}{origin}: {q.describe()}, spiking={s.describe() or s.mode}"
        f"{', ' + r.describe() if r.active else ''} on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    report = quantize(model, calib.to(device), q, s, batch_size=cfg.batch_size, device=device,
                      progress=cfg.progress, log=say, checkpoint_dir=checkpoint, stream=stream,
                      on_block=on_block, pack=cfg.save_format == "packed", rotate=r, **options)
    out.joinpath("outside.json").write_text(json.dumps(report.outside))
    (out / "module_stats.json").write_text(json.dumps([r.row() for r in report.stats], indent=1))
    _write_layer_costs(out, report.costs)
    (out / "notes.json").write_text(json.dumps(report.notes))
    if report.params:
        save_file({k: v.contiguous() for k, v in report.params.items()}, str(out / "omni_params.safetensors"))
    if report.packed:                                   # save_format=packed: the codes, for export
        save_file({k: v.contiguous() for k, v in report.packed.items()}, str(out / "packed.safetensors"))
    metrics = {f"cost/{k}": v for k, v in report.cost.items()}
    metrics.update(energy_metrics(cfg, report.costs))
    metrics.update({"time/quantize_s": report.seconds, "mem/peak_gb": peak_memory_gb(device)})
    epochs = getattr(q, "epochs", 0)                  # the methods that train per block
    if epochs and report.params:
        metrics["time/block_epoch_s"] = report.seconds / max(1, len(report.stats)) / epochs
    return metrics


def energy_model(cfg):
    """The ASSUMED per-operation energies `energy.*` (pJ) as an `allocation.EnergyModel`."""
    from spikellm.allocation import EnergyModel
    return EnergyModel(**{k: float(v) for k, v in cfg.energy.items() if k != "source"})


def energy_metrics(cfg, costs: list) -> dict:
    """cost/energy_pj, cost/energy_fp16_pj, cost/energy_rel_fp16 (linear layers, per token) from
    the layer costs and the assumed constants `energy.*`: computed with the stage, so they are
    logged with it."""
    from spikellm.allocation import energy_cost
    return {f"cost/{k}": v for k, v in energy_cost(costs, energy_model(cfg)).items()}


def _local_source(cfg) -> str:
    """A local directory of the checkpoint (streaming memory-maps its shards): model.path, the
    embedded model, or the hub id's safetensors snapshot (downloaded once by huggingface_hub)."""
    _export_cache(cfg)
    source = resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}")
    if Path(source).exists():
        return source
    from huggingface_hub import snapshot_download
    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])


def _streamed_quantize(cfg, deps: dict[str, Artifact], out: Path, checkpoint: Path | None,
                       on_block=None) -> dict:
    """`model.stream=true`: blocks stream from the checkpoint's shards one at a time and the
    quantized blocks are written as they finish -> model/ (a sharded safetensors checkpoint that
    transformers loads; the quantizers' buffers ride along), module_stats.json,
    layer_costs.json, notes.json."""
    from transformers import AutoTokenizer

    from spikellm.streaming import open_streaming
    device = resolve_device(cfg.device)
    source = _local_source(cfg)
    # the streamed blocks are committed next to the block checkpoint, so a resumed run keeps them
    target = (checkpoint / "model") if checkpoint is not None else (out / "model")
    stream = open_streaming(source, target, cfg.model.dtype, device)
    metrics = _quantize_and_report(cfg, deps, out, stream.model, checkpoint,
                                   f" streamed block by block from {source}", stream, on_block)
    stream.finish(AutoTokenizer.from_pretrained(source))
    if target != out / "model":
        os.replace(target, out / "model")
    return metrics


def _write_layer_costs(out: Path, costs: list) -> None:
    """layer_costs.json: per linear layer, per token: MACs' bit-widths, steps, ACE, additive share
    (what the run manifest's energy estimate is computed from)."""
    (out / "layer_costs.json").write_text(json.dumps([c.row() for c in costs], indent=1))


def _block_tensors(lm: LoadedModel, outside: list[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of every block (parameters and buffers such as the salient masks), and of
    the modules outside the blocks that the run changed (`outside`: a rotation's embeddings,
    head and final norm)."""
    out = {}
    for i, block in enumerate(blocks_of(lm.model, lm.spec)):
        for k, v in block.state_dict().items():
            out[f"{lm.spec.blocks}.{i}.{k}"] = v.detach().contiguous().cpu()
    for name in outside:
        for k, v in lm.model.get_submodule(name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().contiguous().cpu().clone()
    return out


def ppl_metric(dataset: str, split: str, tag: str) -> str:
    """ppl/<dataset> (test), ppl/dev/<dataset> (dev), with fp/ after ppl for the FP baseline;
    a text file is named by its stem."""
    name = dataset_name(dataset)
    return "ppl/" + ("fp/" if tag == "fp" else "") + ("dev/" if split == "dev" else "") + name


def _ppl(cfg, lm: LoadedModel, tag: str, stream=None) -> dict:
    """ppl/* of `lm` on every eval dataset; with `stream` (eval.stream) block by block, all the
    datasets in one pass over the blocks (each block read once; the pass's time is apportioned
    to the datasets' time/eval_* metrics by their window counts)."""
    device = resolve_device(cfg.device)
    out = {}
    calib = OmegaConf.to_object(cfg.calib)
    sets = {}
    for d in cfg.eval.datasets:
        sets[d] = evaluation_set(lm.tokenizer, d, cfg.eval.seqlen, cfg.eval.max_windows,
                                 split=cfg.eval.split, data_dir=cfg.paths.data_dir, calib=calib)
    timings = {}
    if stream is not None:
        t0 = time.time()
        shared = streamed_perplexities(lm.model, {ppl_metric(d, cfg.eval.split, tag): w for d, w in sets.items()},
                                       stream, cfg.eval.batch_size, device, progress=cfg.progress,
                                       desc=f"ppl streamed ({', '.join(map(dataset_name, sets))})")
        total_s, n = time.time() - t0, sum(w.shape[0] for w in sets.values())
        timings = {d: total_s * w.shape[0] / n for d, w in sets.items()}
    for d, windows in sets.items():
        name = ppl_metric(d, cfg.eval.split, tag)
        if stream is None:
            t0 = time.time()
            out[name] = perplexity(lm.model, windows, cfg.eval.batch_size, device, progress=cfg.progress,
                                   desc=f"{name} ({windows.shape[0]}x{windows.shape[1]})")
            timings[d] = time.time() - t0
        else:
            out[name] = shared[name]
        say(f"{name} = {out[name]:.3f} on {windows.shape[0]} x {windows.shape[1]} tokens "
            f"({timings[d]:.0f}s{', share of the streamed pass' if stream is not None else ''})")
        out[f"time/eval_{'dev_' if cfg.eval.split == 'dev' else ''}{dataset_name(d)}_s"] = timings[d]
    return out


def _scores(cfg, lm: LoadedModel, tag: str, out: Path) -> dict:
    """Everything an evaluate stage measures on `lm`: perplexities and task accuracies (lm-eval's
    results JSON into `out`)."""
    return {**_ppl(cfg, lm, tag), **_zero_shot(cfg, lm, tag, out)}


def _zero_shot(cfg, lm: LoadedModel, tag: str, out: Path) -> dict:
    """`eval.tasks` through lm-eval on the model as it is in memory (quantized forwards scored),
    with `eval.num_fewshot` examples; metrics acc/<task>, acc_norm/<task>, acc_stderr/<task>,
    any other metric the task reports, acc/avg (acc/fp/... for the full-precision model); lm-eval's
    own results JSON is saved with the artifact (lm_eval_results.json)."""
    if not cfg.eval.tasks:
        return {}
    from spikellm.embedded import cache_root

    from .zeroshot import zero_shot
    t0 = time.time()
    res = zero_shot(lm.model, lm.tokenizer, list(cfg.eval.tasks), cfg.paths.data_dir,
                    cache_root() / "tasks", batch_size=cfg.eval.task_batch_size,
                    limit=cfg.eval.limit, device=resolve_device(cfg.device),
                    warn=lambda m: say(f"warning: {m}"), num_fewshot=cfg.eval.num_fewshot,
                    results_file=out / "lm_eval_results.json")
    if "acc/avg" in res:
        say("zero-shot acc: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in res.items()
                                          if k.startswith("acc/")) + f" ({time.time() - t0:.0f}s)")
    if tag == "fp":
        res = {k.replace("/", "/fp/", 1): v for k, v in res.items()}
    res["time/eval_zero_shot_s"] = time.time() - t0
    return res


def evaluate_fp(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """Full-precision perplexities: the baseline every quantized point is compared with."""
    if cfg.eval.stream:
        return _streamed_ppl(cfg, _local_source(cfg), "fp")
    return _scores(cfg, load(cfg, whole_model=True), "fp", out)


def _streamed_ppl(cfg, checkpoint, tag: str) -> dict:
    """`eval.stream`: perplexities block by block from `checkpoint`'s shards, the quantized
    method's runtime modules rebuilt first (their buffers load with each block)."""
    from spikellm.methods import make_method
    from spikellm.streaming import open_streaming
    stream = open_streaming(checkpoint, None, cfg.model.dtype, resolve_device(cfg.device))
    if tag != "fp":
        make_method(*method_configs(cfg), stream.spec, rotation_config(cfg)).restore_for_inference(stream.model)
    lm = LoadedModel(stream.model, _tokenizer(cfg), str(checkpoint), stream.spec)
    try:
        return _ppl(cfg, lm, tag, stream)
    finally:
        stream.close()


def _quantized_model(cfg, q: Artifact) -> LoadedModel:
    """The quantized model of quantize artifact `q`, whole in memory: the checkpoint with its
    blocks replaced by the artifact's tensors (weights.safetensors), or, for a streamed
    quantize, the quantized checkpoint it wrote to model/. Either way the method first restores
    the runtime modules it needs (e.g. OmniQuant's activation and KV quantizers), whose saved
    buffers (salient masks, K ranges) then load too."""
    from spikellm.methods import make_method, restore_quantized
    if not q.file("weights.safetensors").exists():   # streamed: model/ is the quantized checkpoint
        lm = load_model(str(q.file("model")), cfg.model.dtype, resolve_device(cfg.device),
                        _device_map(cfg, whole_model=True))
        restore_quantized(lm.model, lm.spec, *method_configs(cfg), q.file("model"), rotation_config(cfg))
        return lm
    lm = load(cfg, whole_model=True)
    make_method(*method_configs(cfg), lm.spec, rotation_config(cfg)).restore_for_inference(lm.model)
    weights = load_file(str(q.file("weights.safetensors")))
    missing = lm.model.load_state_dict(
        {k: v if v.dtype == torch.bool else v.to(lm.model.dtype) for k, v in weights.items()},
        strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"quantized weights do not fit the model: {missing.unexpected_keys[:3]}")
    return lm


def evaluate(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """Perplexities (and zero-shot accuracies) of the quantized model (`_quantized_model`), or
    with `eval.stream` block by block from the streamed quantize's checkpoint; with
    `eval.spikes` also the spikes it fires (`_spikes`)."""
    q = deps["quantize"]
    if cfg.eval.stream:
        return _streamed_ppl(cfg, q.file("model"), "quant")
    lm = _quantized_model(cfg, q)
    metrics = _scores(cfg, lm, "quant", out)
    if cfg.eval.spikes:
        metrics.update(_spikes(cfg, lm, q, out))
    return metrics


def _spikes(cfg, lm: LoadedModel, q: Artifact, out: Path) -> dict:
    """`eval.spikes`: the quantized model over the first `eval.spike_windows` windows of the
    first eval dataset with every spike counted (`spikellm.spikes`) -> spikes.json (one row per
    layer: firing rate, fired spikes and their levels, SOPs, event-driven and formula energy per
    token) and the metrics spike/firing_rate*, cost/sops, cost/energy_event_pj,
    cost/energy_event_rel_formula (against the quantize stage's cost/energy_pj)."""
    from spikellm.allocation import LayerCost, energy_cost
    from spikellm.spikes import count_spikes, spike_metrics
    t0 = time.time()
    d = cfg.eval.datasets[0]
    windows = evaluation_set(lm.tokenizer, d, cfg.eval.seqlen, cfg.eval.max_windows, split=cfg.eval.split,
                             data_dir=cfg.paths.data_dir, calib=OmegaConf.to_object(cfg.calib))
    if cfg.eval.spike_windows:
        windows = windows[: cfg.eval.spike_windows]
    costs = [LayerCost(**r) for r in json.loads(q.file("layer_costs.json").read_text())]
    e = energy_model(cfg)
    layers = count_spikes(lm.model, windows, costs, e, cfg.eval.batch_size, resolve_device(cfg.device),
                          progress=cfg.progress)
    (out / "spikes.json").write_text(json.dumps([s.row() for s in layers], indent=1))
    metrics = spike_metrics(layers, energy_cost(costs, e)["energy_pj"])
    metrics["time/eval_spikes_s"] = time.time() - t0
    rate = metrics.get("spike/firing_rate")
    say(f"spikes on {windows.shape[0]} x {windows.shape[1]} tokens of {dataset_name(d)}: "
        + (f"firing rate {rate:.3f}, " if rate is not None else "no spiking layers, ")
        + f"event-driven {metrics['cost/energy_event_pj']:.4g} pJ/token "
        f"({metrics.get('cost/energy_event_rel_formula', float('nan')):.3f} of the formula) "
        f"({metrics['time/eval_spikes_s']:.0f}s)")
    return metrics


def export(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """`save_model=true` -> model/: the quantized model as a faithful checkpoint
    (`spikellm.export`: weights, the method's runtime tensors, tokenizer, and a
    quantization_config that `spikellm.load_quantized` rebuilds the method from). A streamed
    quantize's checkpoint is linked, not loaded; the run directory gets hard links of it."""
    from spikellm.export import checkpoint_bytes, link_checkpoint, mark_quantized, pack_checkpoint, save_quantized
    t0 = time.time()
    q = deps["quantize"]
    qcfg, scfg = method_configs(cfg)
    rcfg = rotation_config(cfg)
    if q.file("weights.safetensors").exists():
        lm = _quantized_model(cfg, q)
        save_quantized(lm.model, lm.tokenizer, qcfg, scfg, out / "model", rotate=rcfg)
        del lm
    else:
        link_checkpoint(q.file("model"), out / "model")
        mark_quantized(out / "model", qcfg, scfg, rotate=rcfg)
    metrics = {}
    if cfg.save_format == "packed":
        packed = q.file("packed.safetensors")
        if not packed.exists():
            raise FileNotFoundError(f"quantize artifact {q.path} has no packed.safetensors: it predates "
                                    f"save_format=packed; remove it (python -m pipelines.gc) and run again")
        stats = pack_checkpoint(out / "model", packed)
        metrics = {"export/packed_bits": stats["bits_per_weight"], "export/packed_gb": stats["bytes"] / 1e9,
                   "export/packed_layers": stats["layers"]}
    return {"time/export_s": time.time() - t0, "export/gb": checkpoint_bytes(out / "model") / 1e9, **metrics}


STAGE_FUNCTIONS = {"calibrate": calibrate, "score": score, "act_stats": act_stats, "quantize": quantize_stage,
                   "evaluate": evaluate, "evaluate_fp": evaluate_fp, "export": export}
