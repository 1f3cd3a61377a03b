"""`dry_run=true`: plan every stage of a sweep without weights and check that it fits.

The model is built on the meta device from its config (model.path's config.json when it exists,
else `model.hf_config`, an inline config.json, else the numbers in `model.arch` for a model of
`model.family`), so shapes
are exact. Per stage the plan gives GPU memory, host memory, disk, an estimated time, and the
SLURM resources the launcher will request; a stage that cannot fit its requested GPUs or host
memory fails the dry run with one line naming the key to change.

Memory is counted from tensor sizes (weights, calibration activations, Hessians, solver and
forward workspace) plus fixed allowances (`plan.host_base_gb`, `plan.cuda_context_gb`). Times are
ESTIMATES: the reference GPTQ implementation's H200 timings for one LLaMA-7B block with 128 x 2048
calibration tokens (3.6 s forwards + Hessians, 8.6 s solve at about 190 us per weight column) and
an OmniQuant-style block-training proxy (3.16 s per epoch), scaled by parameters x tokens
(forwards, training) and by weight columns (the launch-bound solve), divided by `plan.gpu_speed`
(1 = H200) or multiplied by `plan.cpu_slowdown` on CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from spikellm.footprint import Footprint, arch_config, footprint, meta_model

GiB = 2 ** 30
#: anchors: one LLaMA-7B block (202 M parameters, 35 584 weight columns), 128 x 2048 tokens
REF_BLOCK_PARAMS, REF_COLUMNS, REF_TOKENS = 202_375_168, 35_584, 128 * 2048
REF_FWD_S, REF_SOLVE_S, REF_OMNI_EPOCH_S = 3.6, 8.6, 3.16
#: tokens scored per evaluation set at the GPTQ protocol (LLaMA tokenizer) and by the six
#: zero-shot tasks (requests x average request length); rough, for time estimates only
EVAL_TOKENS = {"wikitext2": 341_000, "ptb": 100_000, "c4": 256 * 2048}
ZERO_SHOT_TOKENS = {"piqa": 184_000, "arc_easy": 380_000, "arc_challenge": 211_000,
                    "boolq": 980_000, "hellaswag": 3_600_000, "winogrande": 76_000}
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlanError(ValueError):
    """A stage cannot fit the resources it would request."""


def model_config(cfg):
    """The transformers config the dry run builds on meta (see the module docstring)."""
    from transformers import AutoConfig
    path = cfg.model.path
    if path and path != "embedded" and (Path(path).expanduser() / "config.json").exists():
        return AutoConfig.from_pretrained(Path(path).expanduser())
    if path == "embedded":
        from spikellm.embedded import embedded_checkpoint
        return AutoConfig.from_pretrained(embedded_checkpoint())
    inline = OmegaConf.select(cfg, "model.hf_config")
    if inline:
        d = OmegaConf.to_container(inline, resolve=True)
        return AutoConfig.for_model(d.pop("model_type", "llama"), **d)
    arch = OmegaConf.to_container(cfg.model.arch)
    if not arch.get("layers"):
        raise PlanError(f"model={cfg.model.name}: no config.json at model.path, no model.hf_config and "
                        f"no model.arch: the dry run needs one of them")
    return arch_config(arch, cfg.model.family)


@dataclass
class StagePlan:
    stage: str
    gpu_gb: float
    host_gb: float
    disk_gb: float
    time_s: float
    resources: dict
    note: str = ""


def _stage_plan(stage: str, cfg, fp: Footprint, on_gpu: bool) -> StagePlan:
    b = _BYTES[cfg.model.dtype]
    n, L, B = cfg.calib.nsamples, cfg.calib.seqlen, cfg.batch_size
    h, inter = fp.hidden, fp.intermediate
    model_b, block_b, rest_b = fp.params * b, fp.block_params * b, fp.rest_params * b
    acts = n * L * h * b                                   # one block's inputs for all samples
    fwd_work = B * L * (2 * inter + 4 * h) * 4
    if not on_gpu:                                         # CPU sdpa materialises the scores
        fwd_work += B * fp.heads * L * L * 4
    ctx = cfg.plan.cuda_context_gb * GiB if on_gpu else 0
    base = cfg.plan.host_base_gb * GiB
    speed = cfg.plan.gpu_speed if on_gpu else 1.0 / cfg.plan.cpu_slowdown
    fwd_s = REF_FWD_S * fp.block_params / REF_BLOCK_PARAMS * n * L / REF_TOKENS / speed
    columns = sum(i for _, _, i in fp.linears)
    solve_s = REF_SOLVE_S * columns / REF_COLUMNS / speed
    stream = bool(cfg.model.stream)
    resident = (rest_b + block_b) if stream else model_b   # weights held while quantizing
    held = (rest_b + 2 * block_b) if stream else model_b   # host: + the block being written out
    note = ""
    if stage == "calibrate":
        return StagePlan(stage, 0.0, 1.0, n * L * 8 / GiB, 10.0, {}, "tokenize the calibration text")
    if stage in ("evaluate", "evaluate_fp"):
        tokens = sum(EVAL_TOKENS[d] for d in cfg.eval.datasets)
        if cfg.eval.max_windows:
            tokens = min(tokens, len(cfg.eval.datasets) * cfg.eval.max_windows * cfg.eval.seqlen)
        tokens += sum(ZERO_SHOT_TOKENS.get(t, 0) for t in cfg.eval.tasks) * (
            1 if not cfg.eval.limit else min(1.0, cfg.eval.limit / 1000 if cfg.eval.limit >= 1 else cfg.eval.limit))
        logits = cfg.eval.batch_size * cfg.eval.seqlen * fp.vocab * 4 * 2
        work = cfg.eval.batch_size * cfg.eval.seqlen * (2 * inter + 4 * h) * 4
        t = fp.n_blocks * REF_FWD_S * 0.5 * fp.block_params / REF_BLOCK_PARAMS * tokens / REF_TOKENS / speed
        if cfg.eval.stream:            # one block at a time + every window's hidden states, twice
            windows = tokens // cfg.eval.seqlen + 1
            hidden = 2 * windows * cfg.eval.seqlen * h * b
            gpu = rest_b + block_b + hidden + logits + work + ctx
            return StagePlan(stage, gpu / GiB if on_gpu else 0.0,
                             (base + rest_b + 2 * block_b + (0 if on_gpu else hidden + logits)) / GiB,
                             0.001, t, {}, "perplexity streamed block by block")
        gpu = model_b + logits + work + ctx
        return StagePlan(stage, gpu / GiB if on_gpu else 0.0, (base + model_b + (0 if on_gpu else logits)) / GiB,
                         0.001, t, {}, "whole model on the GPU(s)" if on_gpu else "whole model")
    if stage == "export":               # save_model=true (no GPU: a checkpoint written or linked)
        if stream:
            return StagePlan(stage, 0.0, base / GiB, 0.001, 10.0, {}, "hard links of the streamed checkpoint")
        # the whole model, plus the quantized block tensors loaded into it
        return StagePlan(stage, 0.0, (base + 2 * model_b) / GiB, model_b / GiB, 60 + model_b / 200e6, {},
                         "whole quantized model loaded and saved")
    if stage == "score":
        hess = sum(d * d for d in fp.hessian_dims) * 4 * 2
        gpu = resident + 2 * acts + hess + fwd_work + ctx
        return StagePlan(stage, gpu / GiB if on_gpu else 0.0, (base + resident) / GiB,
                         0.001, fp.n_blocks * fwd_s, {}, "FP Hessian diagonals" + (", streamed" if stream else ""))
    if stage == "act_stats":
        gpu = resident + 2 * acts + fwd_work + ctx
        return StagePlan(stage, gpu / GiB if on_gpu else 0.0, (base + held) / GiB, 0.001,
                         fp.n_blocks * fwd_s * 0.5, {}, "per-channel activation maxima"
                         + (", streamed" if stream else ""))
    if stage == "quantize" and cfg.quant.method == "omniquant":
        train = fp.block_params * 4 * 4                     # fp32 block, grads, AdamW moments
        # the fp and q streams (+ the targets and outputs being built), in float32 while training
        gpu = resident + train + 3 * n * L * h * 4 + 3 * fwd_work + ctx
        t = fp.n_blocks * cfg.quant.epochs * REF_OMNI_EPOCH_S * fp.block_params / REF_BLOCK_PARAMS \
            * n * L / REF_TOKENS / speed
        # the quantized weights (streamed: the output shards) + per block checkpoint: 2 streams x
        # the 2 newest blocks (+ the block states when the whole model is in memory)
        disk = model_b + 4 * acts + (0 if stream else fp.n_blocks * block_b)
        if stream and not (cfg.model.path and Path(str(cfg.model.path)).expanduser().exists()):
            disk += model_b
        return StagePlan(stage, gpu / GiB if on_gpu else 0.0, (base + held) / GiB, disk / GiB, t, {},
                         f"{cfg.quant.epochs} epochs per block, "
                         + ("streamed block by block" if stream else "whole model loaded"))
    # GPTQ family: one block's Hessians (true-sequential groups), solver workspace, activations
    hess = max(fp.hessian_dims) ** 2 * 4 * 3
    solve = max(o * i for _, o, i in fp.linears) * 4 * 3
    gpu = resident + 3 * acts + hess + solve + fwd_work + ctx
    rot = OmegaConf.select(cfg, "rotate.mode") not in (None, "none")
    if rot:     # the float64 residual rotation Q and two float64 copies of the largest linear
        gpu += h * h * 8 + 2 * max(o * i for _, o, i in fp.linears) * 8
        note_rot = ", rotated (QuaRot) block by block"
    else:
        note_rot = ""
    t = fp.n_blocks * ((0 if cfg.quant.method == "rtn" else fwd_s) + solve_s
                       * (0.05 if cfg.quant.method == "rtn" else 1))
    disk = (model_b if stream else fp.n_blocks * block_b) + 2 * acts + (0 if stream else fp.n_blocks * block_b)
    if stream and not (cfg.model.path and Path(str(cfg.model.path)).expanduser().exists()):
        note = "streamed; + source snapshot download"
        disk += model_b
    else:
        note = "streamed block by block" if stream else "whole model loaded"
    return StagePlan(stage, gpu / GiB if on_gpu else 0.0, (base + held) / GiB, disk / GiB, t, {}, note + note_rot)


def stage_disk_gb(node) -> float:
    """The dry run's disk estimate (GB) of one stage instance: its artifact and checkpoints."""
    from .launch import stage_resources
    cfg = node.cfg
    res = stage_resources(node)
    want = cfg.device if cfg.device != "auto" else ("cuda" if res["gpus"] else "cpu")
    ident = (cfg.model.name, cfg.model.path, cfg.model.hub_id)
    if ident not in _FOOTPRINTS:
        _FOOTPRINTS[ident] = footprint(meta_model(model_config(cfg)))
    return _stage_plan(node.stage, cfg, _FOOTPRINTS[ident], want.startswith("cuda")).disk_gb


_FOOTPRINTS: dict[tuple, Footprint] = {}


def plan_sweep(cfgs: list, fps: dict[str, Footprint] | None = None
               ) -> tuple[list[tuple[str, StagePlan]], list[str]]:
    """-> ([(point name, stage plan)], [errors]) for the distinct stage instances of a sweep.
    `fps`: model name -> Footprint already built (filled in for the others)."""
    from .dag import plan as dag_plan
    from .launch import stage_resources
    p = dag_plan(cfgs)
    rows, errors = [], []
    fps = {} if fps is None else fps
    for node in p.nodes.values():
        cfg = node.cfg
        if cfg.model.name not in fps:
            fps[cfg.model.name] = footprint(meta_model(model_config(cfg)))
        res = stage_resources(node)
        want = cfg.device if cfg.device != "auto" else ("cuda" if res["gpus"] else "cpu")
        on_gpu = want.startswith("cuda") and node.stage != "calibrate"
        sp = _stage_plan(node.stage, cfg, fps[cfg.model.name], on_gpu)
        sp.resources = res
        rows.append((cfg.model.name, sp))
        gpu_cap = res["gpus"] * cfg.plan.gpu_mem_gb
        if on_gpu and sp.gpu_gb > gpu_cap:
            fix = "set model.stream=true" if not cfg.model.stream and node.stage == "quantize" else \
                ("raise model.resources.eval_gpus" if node.stage.startswith("evaluate") else
                 "reduce calib.nsamples / batch_size or raise model.resources.gpus")
            errors.append(f"{cfg.model.name} {node.stage}: needs {sp.gpu_gb:.1f} GB of GPU memory but requests "
                          f"{res['gpus']} x {cfg.plan.gpu_mem_gb} GB (plan.gpu_mem_gb): {fix}")
        if sp.host_gb > res["mem_gb"] and node.stage != "calibrate":
            errors.append(f"{cfg.model.name} {node.stage}: needs {sp.host_gb:.1f} GB of host memory but requests "
                          f"model.resources.mem_gb={res['mem_gb']}: raise it"
                          + ("" if cfg.model.stream else " or set model.stream=true"))
        if sp.time_s / 60 > res["time_min"]:
            sp.note += f"; WARNING: estimate exceeds time_min={res['time_min']}"
    return rows, errors


def print_plan(rows: list[tuple[str, StagePlan]], errors: list[str], fps_line: str = "") -> None:
    print("dry run: per-stage plan (memory from tensor sizes; times are ESTIMATES scaled from H200 "
          "reference timings, see pipelines/dryrun.py)")
    if fps_line:
        print(fps_line)
    head = ["model", "stage", "GPU GB", "host GB", "disk GB", "est. time", "SLURM request", "note"]
    body = []
    for name, sp in rows:
        r = sp.resources
        req = f"gpus={r['gpus']} cpus={r['cpus']} mem={r['mem_gb']}G time={r['time_min']}min"
        body.append([name, sp.stage, f"{sp.gpu_gb:.1f}", f"{sp.host_gb:.1f}", f"{sp.disk_gb:.1f}",
                     _hms(sp.time_s), req, sp.note])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    for line in [head] + body:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    for e in errors:
        print(f"error: {e}")


def _hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s")


def describe(cfg, fp: Footprint) -> str:
    return (f"  {cfg.model.name}: {fp.params / 1e9:.2f} B parameters, {fp.n_blocks} blocks of "
            f"{fp.block_params / 1e6:.0f} M ({fp.block_params * _BYTES[cfg.model.dtype] / GiB:.2f} GB in "
            f"{cfg.model.dtype}), hidden {fp.hidden}, intermediate {fp.intermediate}, "
            f"heads {fp.heads}/{fp.kv_heads} kv, vocab {fp.vocab}")


def dry_run(cfgs: list) -> int:
    """Print the plan of every stage; 0 when everything fits, 2 otherwise."""
    fps: dict[str, Footprint] = {}
    rows, errors = plan_sweep(cfgs, fps)
    lines = [describe(next(c for c in cfgs if c.model.name == n), fp) for n, fp in fps.items()]
    print_plan(rows, errors, "\n".join(lines))
    plan_json = [{"model": n, **{k: v for k, v in vars(sp).items()}} for n, sp in rows]
    out = Path(cfgs[0].paths.outputs) / "dry_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stages": plan_json, "errors": errors}, indent=1))
    print(f"plan: {out}")
    return 2 if errors else 0
