"""Plan a sweep as a DAG of content-keyed stage instances.

A stage instance's key hashes exactly the config keys that change its output, the keys of its
upstream instances and the stage's code version, so points of a sweep that agree on those
share the instance (a sweep over allocation ratios calibrates once). `plan()` returns the
distinct instances in dependency order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from spikellm.data import is_text_file, text_file_digest

from .store import content_key

#: bump a stage's version when its code changes what it writes: old artifacts stop matching
STAGE_VERSIONS = {"calibrate": 2, "score": 2, "act_stats": 2, "quantize": 2, "evaluate": 2, "evaluate_fp": 2}


def _model_id(cfg) -> dict:
    return {"name": cfg.model.name, "path": cfg.model.path, "hub_id": cfg.model.hub_id}


def _sel(cfg, *paths: str) -> dict:
    return {p: OmegaConf.to_container(OmegaConf.select(cfg, p), resolve=True)
            if OmegaConf.is_config(OmegaConf.select(cfg, p)) else OmegaConf.select(cfg, p)
            for p in paths}


def _eval_keys(cfg) -> dict:
    keys = _sel(cfg, "eval.datasets", "eval.seqlen", "eval.max_windows", "eval.split")
    files = [d for d in cfg.eval.datasets if is_text_file(d)]
    if files:                    # a text file's content, not its name, is what is evaluated
        keys["eval.files"] = {d: text_file_digest(d) for d in files}
    if cfg.eval.split == "dev":  # dev windows are the held-out tail of the calibration source
        keys.update(_sel(cfg, "calib.dataset", "calib.split", "calib.dev_fraction"))
    if OmegaConf.select(cfg, "eval.tasks"):          # absent/empty: keys of perplexity-only runs unchanged
        keys.update(_sel(cfg, "eval.tasks", "eval.limit"))
    return keys


#: keys that only one family of methods reads (the others' output does not depend on them)
_OMNI_ONLY = ("abits", "epochs", "lwc", "let", "k_axis", "let_lr", "lwc_lr", "wd", "alpha",
              "aug_loss", "train_batch", "nan_policy", "amp", "seed")
_GPTQ_ONLY = ("mse", "actorder", "blocksize", "true_sequential", "salient_frac", "high_bits")
_TERNARY_ONLY = ("steps", "granularity", "group_size", "salient_scale", "saliency_from", "weighted",
                 "spike_bits")
_GIF_ONLY = ("addbit", "target", "kv_addbit")


def _method_keys(cfg) -> dict:
    """The quant/spiking keys the chosen method reads: `spiking=none` hashes as just its mode,
    GPTQ-family runs ignore the OmniQuant keys and vice versa."""
    quant = _sel(cfg, "quant")["quant"]
    spiking = _sel(cfg, "spiking")["spiking"]
    drop = _GPTQ_ONLY if quant["method"] == "omniquant" else _OMNI_ONLY
    quant = {k: v for k, v in quant.items() if k not in drop}
    if spiking["mode"] == "none":
        spiking = {"mode": "none"}
    else:
        drop = _TERNARY_ONLY if spiking["mode"] == "gif" else _GIF_ONLY
        spiking = {k: v for k, v in spiking.items() if k not in drop}
        if spiking.get("select") == "saliency":
            spiking.pop("seed", None)          # the seed only draws random selections
    return {"quant": quant, "spiking": spiking}


#: per stage: the config that changes its output (besides its upstream keys)
STAGE_INPUTS = {
    "calibrate": lambda c: {"model": _model_id(c), **_sel(c, "calib", "paths.data_dir")},
    "score": lambda c: {"model": _model_id(c), **_sel(c, "model.dtype", "quant.percdamp")},
    "act_stats": lambda c: {"model": _model_id(c), **_sel(c, "model.dtype")},
    "quantize": lambda c: {"model": _model_id(c), **_sel(c, "model.dtype"), **_method_keys(c)},
    "evaluate": lambda c: {**_eval_keys(c), **_sel(c, "paths.data_dir")},
    "evaluate_fp": lambda c: {"model": _model_id(c), **_sel(c, "model.dtype", "paths.data_dir"),
                              **_eval_keys(c)},
}


@dataclass
class Node:
    """One stage instance: what it computes (`stage`, `key`), from what (`deps`: stage -> node
    id), with which config (`cfg`, the first sweep point that needs it), for which points."""
    stage: str
    key: str
    inputs: dict
    deps: dict[str, str]
    cfg: object = field(repr=False)
    points: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"


@dataclass
class Plan:
    nodes: dict[str, Node]                 # id -> node, dependency order
    points: list[dict[str, str]]           # per sweep point: stage -> node id

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes.values():
            out[n.stage] = out.get(n.stage, 0) + 1
        return out


def stages_of(cfg) -> list[tuple[str, dict[str, str]]]:
    """The stages one point needs, as (stage, {dep role: upstream stage}) in order."""
    out = [("calibrate", {})]
    if cfg.eval.fp_baseline:
        out.append(("evaluate_fp", {}))
    needs_score = cfg.spiking.mode == "ternary" and cfg.spiking.saliency_from == "fp"
    if needs_score:
        out.append(("score", {"calibrate": "calibrate"}))
    q_deps = {"calibrate": "calibrate", **({"score": "score"} if needs_score else {})}
    if cfg.quant.method == "omniquant" and cfg.quant.let and cfg.quant.abits < 16:
        out.append(("act_stats", {"calibrate": "calibrate"}))
        q_deps["act_stats"] = "act_stats"
    out.append(("quantize", q_deps))
    out.append(("evaluate", {"quantize": "quantize"}))
    return out


def plan(cfgs: list) -> Plan:
    nodes: dict[str, Node] = {}
    points = []
    for p, cfg in enumerate(cfgs):
        ids: dict[str, str] = {}
        for stage, deps in stages_of(cfg):
            dep_ids = {role: ids[up] for role, up in deps.items()}
            inputs = STAGE_INPUTS[stage](cfg)
            key = content_key(stage, STAGE_VERSIONS[stage], inputs,
                              sorted((r, nodes[i].key) for r, i in dep_ids.items()))
            node = nodes.get(f"{stage}/{key}")
            if node is None:
                node = Node(stage, key, inputs, dep_ids, cfg)
                nodes[node.id] = node
            node.points.append(p)
            ids[stage] = node.id
        points.append(ids)
    return Plan(nodes=nodes, points=points)
