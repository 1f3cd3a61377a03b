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
from spikellm.evaluate import perplexity
from spikellm.models import LoadedModel, blocks_of, load_model, resolve_source
from spikellm.quantize import fp_saliency_diagonals, quantize

from .artifacts import Artifact
from .dag import method_configs
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


def score(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """-> diags.pt: {"<block>.<linear>": diag(chol(H⁻¹)) [C_in]} from full-precision activations."""
    t0 = time.time()
    if cfg.model.stream:
        from spikellm.streaming import open_streaming
        stream = open_streaming(_local_source(cfg), None, cfg.model.dtype, resolve_device(cfg.device))
        model = stream.model
    else:
        stream, model = None, load(cfg).model
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
    lm = load(cfg)
    t0 = time.time()
    stats = activation_absmax(lm.model, _calib_ids(deps), resolve_device(cfg.device),
                              cfg.batch_size, cfg.progress)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / "act_scales.safetensors"))
    return {"time/act_stats_s": time.time() - t0}


def quantize_stage(cfg, deps: dict[str, Artifact], out: Path, checkpoint: Path | None = None,
                   **_) -> dict:
    """-> weights.safetensors (the quantized blocks), module_stats.json, notes.json.

    Each finished block is committed to `checkpoint`; a re-run after a kill, preemption or
    time limit resumes after the last committed block."""
    if cfg.quant.method == "omniquant":
        return _omniquant_stage(cfg, deps, out, checkpoint)
    if cfg.model.stream:
        return _streamed_quantize(cfg, deps, out, checkpoint)
    lm = load(cfg)
    metrics = _quantize_and_report(cfg, deps, out, lm.model, checkpoint, "")
    save_file(_block_linear_weights(lm), str(out / "weights.safetensors"))
    _save_model(cfg, lm, out)
    return metrics


def _quantize_and_report(cfg, deps: dict[str, Artifact], out: Path, model, checkpoint: Path | None,
                         origin: str, stream=None) -> dict:
    """The GPTQ-family run on `model` (whole or streamed) -> module_stats.json, layer_costs.json,
    notes.json in `out`, and the stage's metrics."""
    device = resolve_device(cfg.device)
    diags = torch.load(deps["score"].file("diags.pt"), weights_only=True) if "score" in deps else None
    calib = _calib_ids(deps)
    say(f"quantizing {cfg.model.name}{origin}: quant={cfg.quant.method} (wbits={cfg.quant.wbits}) "
        f"spiking={cfg.spiking.mode} on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    q, s = method_configs(cfg)
    report = quantize(model, calib, q, s, batch_size=cfg.batch_size, device=device,
                      progress=cfg.progress, log=say, saliency_diags=diags,
                      checkpoint_dir=checkpoint, stream=stream)
    (out / "module_stats.json").write_text(json.dumps([r.row() for r in report.stats], indent=1))
    _write_layer_costs(out, report.costs)
    (out / "notes.json").write_text(json.dumps(report.notes))
    metrics = {f"cost/{k}": v for k, v in report.cost.items()}
    metrics.update({"time/quantize_s": report.seconds, "mem/peak_gb": peak_memory_gb(device)})
    return metrics


def _local_source(cfg) -> str:
    """A local directory of the checkpoint (streaming memory-maps its shards): model.path, the
    embedded model, or the hub id's safetensors snapshot (downloaded once by huggingface_hub)."""
    _export_cache(cfg)
    source = resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}")
    if Path(source).exists():
        return source
    from huggingface_hub import snapshot_download
    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])


def _streamed_quantize(cfg, deps: dict[str, Artifact], out: Path, checkpoint: Path | None) -> dict:
    """`model.stream=true`: blocks stream from the checkpoint's shards one at a time and the
    quantized blocks are written as they finish -> model/ (a sharded safetensors checkpoint that
    transformers loads), module_stats.json, layer_costs.json, notes.json."""
    from transformers import AutoTokenizer

    from spikellm.streaming import open_streaming
    device = resolve_device(cfg.device)
    source = _local_source(cfg)
    # the streamed blocks are committed next to the block checkpoint, so a resumed run keeps them
    target = (checkpoint / "model") if checkpoint is not None else (out / "model")
    stream = open_streaming(source, target, cfg.model.dtype, device)
    metrics = _quantize_and_report(cfg, deps, out, stream.model, checkpoint,
                                   f" streamed block by block from {source}", stream)
    stream.finish(AutoTokenizer.from_pretrained(source))
    if target != out / "model":
        os.replace(target, out / "model")
    return metrics


def _write_layer_costs(out: Path, costs: list) -> None:
    """layer_costs.json: per linear layer, per token: MACs' bit-widths, steps, ACE, additive share
    (what the run manifest's energy estimate is computed from)."""
    (out / "layer_costs.json").write_text(json.dumps([c.row() for c in costs], indent=1))


def _save_model(cfg, lm: LoadedModel, out: Path) -> None:
    if cfg.save_model:
        lm.model.save_pretrained(out / "model")
        lm.tokenizer.save_pretrained(out / "model")


def _omniquant_stage(cfg, deps: dict[str, Artifact], out: Path, checkpoint: Path | None) -> dict:
    """OmniQuant (+ GIF spiking): -> weights.safetensors with every block tensor (folded
    weights, norms, activation/KV masks), omni_params.safetensors (LET scales, LWC factors,
    per-epoch losses), module_stats.json."""
    from spikellm.omni_cost import cost_summary, omniquant_layer_costs
    from spikellm.omniquant import omniquant
    if cfg.model.stream:
        say("note: model.stream applies to the GPTQ-family pipelines; OmniQuant loads the whole model "
            "(its blocks train on the device one at a time)")
    lm = load(cfg)
    device = resolve_device(cfg.device)
    calib = _calib_ids(deps)
    q, s = method_configs(cfg)
    say(f"omniquant {cfg.model.name}: W{q.wbits}A{q.abits} spiking={s.mode}"
        + (f" (ratio {s.ratio}, addbit {s.addbit}, {s.select})" if s.mode == "gif" else "")
        + f", {q.epochs} epoch(s) on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    t0 = time.time()
    absmax = load_file(str(deps["act_stats"].file("act_scales.safetensors"))) if "act_stats" in deps else None
    stats, params = omniquant(lm.model, calib.to(device), q, s, device=device,
                              batch_size=cfg.batch_size, progress=cfg.progress,
                              checkpoint_dir=checkpoint, log=say, act_absmax=absmax)
    seconds = time.time() - t0
    save_file(_block_tensors(lm), str(out / "weights.safetensors"))
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / "omni_params.safetensors"))
    (out / "module_stats.json").write_text(json.dumps([r.row() for r in stats], indent=1))
    layers, base = omniquant_layer_costs(lm.model, q, s)
    _write_layer_costs(out, layers)
    _save_model(cfg, lm, out)
    metrics = {f"cost/{k}": v for k, v in cost_summary(layers, base).items()}
    metrics.update({"time/quantize_s": seconds, "mem/peak_gb": peak_memory_gb(device),
                    "time/block_epoch_s": seconds / max(1, len(stats)) / max(1, q.epochs)})
    return metrics


def _block_tensors(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Every tensor of every block (parameters and buffers such as the salient masks)."""
    out = {}
    for i, block in enumerate(blocks_of(lm.model, lm.spec)):
        for k, v in block.state_dict().items():
            out[f"{lm.spec.blocks}.{i}.{k}"] = v.detach().contiguous().cpu()
    return out


def _block_linear_weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
    blocks_path = lm.spec.blocks
    out = {}
    for i, block in enumerate(blocks_of(lm.model, lm.spec)):
        for name in lm.spec.linears():
            out[f"{blocks_path}.{i}.{name}.weight"] = \
                block.get_submodule(name).weight.detach().contiguous().cpu()
    return out


def ppl_metric(dataset: str, split: str, tag: str) -> str:
    """ppl/<dataset> (test), ppl/dev/<dataset> (dev), with fp/ after ppl for the FP baseline;
    a text file is named by its stem."""
    name = dataset_name(dataset)
    return "ppl/" + ("fp/" if tag == "fp" else "") + ("dev/" if split == "dev" else "") + name


def _ppl(cfg, lm: LoadedModel, tag: str) -> dict:
    device = resolve_device(cfg.device)
    out = {}
    calib = OmegaConf.to_object(cfg.calib)
    for d in cfg.eval.datasets:
        windows = evaluation_set(lm.tokenizer, d, cfg.eval.seqlen, cfg.eval.max_windows,
                                 split=cfg.eval.split, data_dir=cfg.paths.data_dir, calib=calib)
        name = ppl_metric(d, cfg.eval.split, tag)
        t0 = time.time()
        out[name] = perplexity(lm.model, windows, cfg.eval.batch_size, device,
                               progress=cfg.progress,
                               desc=f"{name} ({windows.shape[0]}x{windows.shape[1]})")
        say(f"{name} = {out[name]:.3f} on {windows.shape[0]} x {windows.shape[1]} tokens "
            f"({time.time() - t0:.0f}s)")
        out[f"time/eval_{'dev_' if cfg.eval.split == 'dev' else ''}{dataset_name(d)}_s"] = time.time() - t0
    return out


def _scores(cfg, lm: LoadedModel, tag: str) -> dict:
    """Everything an evaluate stage measures on `lm`: perplexities and zero-shot accuracies."""
    return {**_ppl(cfg, lm, tag), **_zero_shot(cfg, lm, tag)}


def _zero_shot(cfg, lm: LoadedModel, tag: str) -> dict:
    """`eval.tasks` through lm-eval on the model as it is in memory (quantized forwards scored);
    metrics acc/<task>, acc_norm/<task>, acc/avg (acc/fp/... for the full-precision model)."""
    if not cfg.eval.tasks:
        return {}
    from spikellm.embedded import cache_root

    from .zeroshot import zero_shot
    t0 = time.time()
    res = zero_shot(lm.model, lm.tokenizer, list(cfg.eval.tasks), cfg.paths.data_dir,
                    cache_root() / "tasks", batch_size=cfg.eval.task_batch_size,
                    limit=cfg.eval.limit, device=resolve_device(cfg.device),
                    warn=lambda m: say(f"warning: {m}"))
    if "acc/avg" in res:
        say("zero-shot acc: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in res.items()
                                          if k.startswith("acc/")) + f" ({time.time() - t0:.0f}s)")
    if tag == "fp":
        res = {k.replace("/", "/fp/", 1): v for k, v in res.items()}
    res["time/eval_zero_shot_s"] = time.time() - t0
    return res


def evaluate_fp(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """Full-precision perplexities: the baseline every quantized point is compared with."""
    return _scores(cfg, load(cfg, whole_model=True), "fp")


def evaluate(cfg, deps: dict[str, Artifact], out: Path, **_) -> dict:
    """Perplexities (and zero-shot accuracies) of the quantized model: the checkpoint's linears
    replaced by the quantize artifact's weights, or, for a streamed quantize (no
    weights.safetensors), the quantized checkpoint it wrote to model/."""
    q = deps["quantize"]
    if not q.file("weights.safetensors").exists():   # streamed: model/ is the quantized checkpoint
        lm = load_model(str(q.file("model")), cfg.model.dtype, resolve_device(cfg.device),
                        _device_map(cfg, whole_model=True))
        return _scores(cfg, lm, "quant")
    lm = load(cfg, whole_model=True)
    if cfg.quant.method == "omniquant":   # runtime activation/KV quantizers whose masks load below
        from spikellm.omniquant import wrap_for_inference
        wrap_for_inference(lm.model, *method_configs(cfg))
    weights = load_file(str(q.file("weights.safetensors")))
    missing = lm.model.load_state_dict(
        {k: v if v.dtype == torch.bool else v.to(lm.model.dtype) for k, v in weights.items()},
        strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"quantized weights do not fit the model: {missing.unexpected_keys[:3]}")
    return _scores(cfg, lm, "quant")


STAGE_FUNCTIONS = {"calibrate": calibrate, "score": score, "act_stats": act_stats, "quantize": quantize_stage,
                   "evaluate": evaluate, "evaluate_fp": evaluate_fp}
