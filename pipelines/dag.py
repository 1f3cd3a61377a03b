"""Plan a sweep as a DAG of content-keyed stage instances.

A stage instance's key hashes the config keys that change its output, the content of the data
files and checkpoint it reads, the digest of the code that computes it, the torch/transformers
versions and device type, and the keys of its upstream instances (whose content is checked when
the artifact is used, `pipelines.execute`), so points of a sweep that agree on those
share the instance (a sweep over allocation ratios calibrates once). `plan()` returns the
distinct instances in dependency order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from spikellm.data import resolve_data_dir, source_file

from .fingerprint import code_digest, file_digest, library_versions, model_identity
from .schema import method_objects, rotation_object
from .store import content_key
from .zeroshot import TASK_FILES

#: a stage's own version, for changes of meaning the code digest cannot see (e.g. a file format)
STAGE_VERSIONS = {"calibrate": 2, "score": 2, "act_stats": 2, "quantize": 3, "evaluate": 2, "evaluate_fp": 2,
                  "export": 2}


def _model_id(cfg) -> dict:
    """The checkpoint's identity (content of a local one, hub id + revision) and every model key
    that changes what is computed; `model.resources` (scheduling only) is left out."""
    m = _sel(cfg, "model")["model"]
    m.pop("resources", None)
    if cfg.dry_run:                 # the dry run plans without reading (or hashing) a checkpoint
        return m
    return {**m, "identity": model_identity(cfg)}


def _sel(cfg, *paths: str) -> dict:
    return {p: OmegaConf.to_container(OmegaConf.select(cfg, p), resolve=True)
            if OmegaConf.is_config(OmegaConf.select(cfg, p)) else OmegaConf.select(cfg, p)
            for p in paths}


def _device(cfg) -> str:
    """The device type a stage computes on (cpu or cuda): floats differ between them. `auto` is
    resolved where the stage will run: on a GPU when it is submitted to a cluster with GPUs
    requested, else by what this machine has."""
    d = cfg.device
    if d == "auto":
        import torch

        from .launch import resolve_launcher
        cluster_gpus = cfg.model.resources.gpus > 0 and resolve_launcher(cfg.launcher.kind) != "local"
        d = "cuda" if cluster_gpus or torch.cuda.is_available() else "cpu"
    return d.split(":")[0]


def _file(path, cfg) -> dict:
    if path is None:
        return {"source": "hf-hub"}
    return {"path": str(path)} if cfg.dry_run else {"sha256": file_digest(path)}


def _calib_data(cfg) -> dict:
    """Content of the file calibration windows are drawn from (not its path)."""
    return {"calib.file": _file(source_file(cfg.calib.dataset, cfg.calib.split, cfg.paths.data_dir), cfg)}


def _eval_keys(cfg) -> dict:
    keys = _sel(cfg, "eval.datasets", "eval.seqlen", "eval.max_windows", "eval.split",
                "eval.batch_size", "eval.stream")
    calib = OmegaConf.to_object(cfg.calib)
    # what is evaluated is each file's content, not its name or the data directory's path
    keys["eval.files"] = {d: _file(source_file(d, cfg.eval.split, cfg.paths.data_dir, calib), cfg)
                          for d in cfg.eval.datasets}
    if cfg.eval.split == "dev":  # dev windows are the held-out tail of the calibration source
        keys.update(_sel(cfg, "calib.dataset", "calib.split", "calib.dev_fraction"))
    if OmegaConf.select(cfg, "eval.spikes"):       # false leaves the earlier keys as they were
        keys.update(_sel(cfg, "eval.spikes", "eval.spike_windows"))
    if OmegaConf.select(cfg, "eval.tasks"):
        keys.update(_sel(cfg, "eval.tasks", "eval.limit", "eval.task_batch_size"))
        if cfg.eval.num_fewshot:        # 0 (zero-shot) leaves the earlier keys as they were
            keys.update(_sel(cfg, "eval.num_fewshot"))
        root = resolve_data_dir(cfg.paths.data_dir)
        keys["eval.task_files"] = {
            t: {f: _file(root / f, cfg) for f in TASK_FILES.get(t, ()) if (root / f).exists()}
            if root is not None else {"source": "hf-hub"} for t in cfg.eval.tasks}
        keys["zero_shot_versions"] = library_versions(zero_shot=True)
    return keys


def _method_keys(cfg) -> dict:
    """What the chosen method and spiking mode compute with: every field of their typed configs
    (spikellm.config), minus those the config itself calls moot (`key()`), so no key list is kept
    by hand and another method's keys cannot reach the key."""
    q, s = method_configs(cfg)
    r = rotation_config(cfg)
    return {"quant": q.key(), "spiking": s.key(), **({"rotate": r.key()} if r.active else {})}


def method_configs(cfg):
    """The typed quant/spiking configs a stage computes with (`spikellm.config` instances): the
    values its key hashes."""
    return method_objects(cfg)


def rotation_config(cfg):
    """The typed rotation (`spikellm.config.Rotation`) a quantize stage runs first."""
    return rotation_object(cfg)


#: what a method config `needs()` -> the stage that computes it
NEED_STAGES = {"saliency_diags": "score", "act_absmax": "act_stats"}


def _energy_keys(cfg) -> dict:
    """The assumed per-operation energies the quantize stage's cost/energy_* are computed from
    (`energy.source` is only their label)."""
    return {"energy": {k: v for k, v in _sel(cfg, "energy")["energy"].items() if k != "source"}}


def _runtime(cfg) -> dict:
    """Every stage: the code that computes it and the libraries whose kernels it runs on."""
    return {"code": code_digest(), "versions": library_versions(), "device": _device(cfg)}


#: per stage: the config that changes its output (besides its upstream keys)
STAGE_INPUTS = {
    "calibrate": lambda c: {"model": _model_id(c), **_sel(c, "calib"), **_calib_data(c),
                            **_runtime(c)},
    "score": lambda c: {"model": _model_id(c), **_sel(c, "quant.percdamp", "batch_size"),
                        **_runtime(c)},
    "act_stats": lambda c: {"model": _model_id(c), **_sel(c, "batch_size"), **_runtime(c)},
    "quantize": lambda c: {"model": _model_id(c), **_sel(c, "batch_size"),
                           **_method_keys(c), **_energy_keys(c), **_runtime(c),
                           # packed codes are recorded while quantizing: dense keys stay as they were
                           **({"save_format": "packed"} if c.save_format == "packed" else {})},
    "evaluate": lambda c: {**_eval_keys(c), **_runtime(c)},
    "evaluate_fp": lambda c: {"model": _model_id(c), **_eval_keys(c), **_runtime(c)},
    # the quantized model (its quantize key) as a faithful checkpoint (spikellm.export)
    "export": lambda c: {**_sel(c, "save_format"), **_runtime(c)},
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
    q, s = method_configs(cfg)
    q_deps = {"calibrate": "calibrate"}
    for need in (*q.needs(), *s.needs()):
        stage = NEED_STAGES[need]
        out.append((stage, {"calibrate": "calibrate"}))
        q_deps[stage] = stage
    out.append(("quantize", q_deps))
    out.append(("evaluate", {"quantize": "quantize"}))
    if cfg.save_model:
        out.append(("export", {"quantize": "quantize"}))
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
