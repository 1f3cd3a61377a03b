"""Typed schema of the composed config: types are checked by OmegaConf, ranges by `validate`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from spikellm.allocation import EnergyModel
from spikellm.config import QUANT_CONFIGS, SPIKING_CONFIGS, Rotation, unknown_key
from spikellm.config import validate as validate_method
from spikellm.data import DATASETS, SPLITS, CalibSpec, dataset_name, is_text_file, resolve_data_dir

from .zeroshot import TASKS as ZS_TASKS


@dataclass
class Arch:
    params_b: float = 0.0
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    vocab: int = 0


@dataclass
class Resources:
    gpus: int = 0
    cpus: int = 2
    mem_gb: int = 8
    time_min: int = 60
    #: GPUs of the evaluate stages (the whole model on the devices); null = gpus
    eval_gpus: Optional[int] = None


def eval_gpus(resources) -> int:
    """GPUs of an evaluate stage (the whole model spread over them): model.resources.eval_gpus,
    else model.resources.gpus."""
    return int(resources.get("eval_gpus") or resources.gpus)


@dataclass
class ModelCfg:
    name: str = "smollm2_135m"
    path: Optional[str] = None
    hub_id: Optional[str] = None
    #: module layout, a key of spikellm.models.FAMILIES (llama, mistral, qwen2, starcoder2):
    #: the dry run builds `model.arch` as this family, and preflight checks that the
    #: checkpoint's model_type has the same layout
    family: str = "llama"
    dtype: str = "float32"
    #: quantize block by block from the checkpoint's safetensors shards (host memory: one block)
    stream: bool = False
    #: inline config.json (for the dry run without a checkpoint); null = model.arch
    hf_config: Optional[dict] = None
    arch: Arch = field(default_factory=Arch)
    resources: Resources = field(default_factory=Resources)


@dataclass
class EvalCfg:
    #: wikitext2, ptb, c4, or paths of UTF-8 text files (windowed like WikiText-2)
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    #: "test" (each dataset's protocol split) or "dev" (held-out tail of the calibration source)
    split: str = "test"
    seqlen: int = 2048
    max_windows: Optional[int] = None
    batch_size: int = 4
    fp_baseline: bool = True
    #: lm-eval tasks (empty: perplexity only): the paper's six read local files where the data
    #: directory has them; any other task lm-eval knows loads from the hub (online only)
    tasks: list[str] = field(default_factory=list)
    limit: Optional[float] = None        # documents per task (int) or fraction (< 1); null = all
    task_batch_size: int = 8
    #: in-context examples per task (lm-eval's --num_fewshot; 0 = zero-shot, the paper's setting)
    num_fewshot: int = 0
    #: perplexity block by block from the checkpoint's shards (one block + the windows' hidden
    #: states in memory; needs model.stream=true and no eval.tasks)
    stream: bool = False
    #: count the spikes the quantized model fires on the evaluation windows (spikellm.spikes):
    #: spike/firing_rate*, cost/sops, cost/energy_event_pj, spikes.json
    spikes: bool = False
    #: windows of the first eval dataset the spikes are counted on (null: all evaluated windows)
    spike_windows: Optional[int] = None


@dataclass
class EnergyCfg:
    """Per-operation energies in pJ (assumptions; defaults and meaning: spikellm.allocation.EnergyModel)."""
    fp_mac: float = EnergyModel.fp_mac
    fp_add: float = EnergyModel.fp_add
    int_mul_bitop: float = EnergyModel.int_mul_bitop
    int_add: float = EnergyModel.int_add
    source: str = "Horowitz 2014, 45 nm"


@dataclass
class PlanCfg:
    """Assumptions of the dry run's plan (pipelines/dryrun.py)."""
    gpu_mem_gb: float = 80.0       # memory of one GPU of the cluster
    gpu_speed: float = 1.0         # relative to the H200 the time anchors were measured on
    cpu_slowdown: float = 50.0     # CPU time / H200 time (assumed)
    host_base_gb: float = 3.0      # python + torch + transformers + data loaders
    cuda_context_gb: float = 1.0


@dataclass
class PathsCfg:
    outputs: str = "outputs"
    data_dir: Optional[str] = None
    cache: Optional[str] = None


@dataclass
class LoggerCfg:
    backend: str = "wandb"
    mode: str = "offline"
    project: str = "spikellm"
    entity: Optional[str] = None


@dataclass
class CPUJobsCfg:
    """The stages that need no GPU (calibrate) as SLURM jobs; export uses model.resources'
    memory, without GPUs, on this partition too."""
    partition: Optional[str] = None   #: default: launcher.partition
    cpus: int = 1
    mem_gb: int = 4
    time_min: int = 60


@dataclass
class LauncherCfg:
    """Where stages run (`kind`) and, for SLURM, what each job asks for: the keys of
    hydra-submitit-launcher's SlurmQueueConf that a cluster needs. The GPU stages take GPUs,
    CPUs, memory and time from `model.resources`; the CPU stages from `cpu_jobs`."""
    kind: str = "auto"
    wait: bool = False
    array_parallelism: int = 16
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    #: nodes to avoid (sbatch --exclude)
    exclude: Optional[str] = None
    #: generic resources of the GPU stages, e.g. "gpu:a100:4" (sbatch --gres, instead of --gpus-per-node)
    gres: Optional[str] = None
    #: CPUs per GPU of the GPU stages (--cpus-per-gpu, instead of model.resources.cpus per task)
    cpus_per_gpu: Optional[int] = None
    #: memory per GPU in GB of the GPU stages (--mem-per-gpu, instead of model.resources.mem_gb)
    mem_per_gpu_gb: Optional[int] = None
    #: shell lines each job runs first (module load ..., source .venv/bin/activate)
    setup: list[str] = field(default_factory=list)
    #: any other sbatch option, without dashes: {mail-type: END, reservation: x}
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    #: requeues after a time limit or preemption before a job counts as failed
    max_num_timeout: int = 3
    #: seconds before the time limit at which the job is signalled to checkpoint and requeue
    signal_delay_s: int = 120
    #: submitit's folder for job scripts and logs; default <sweep record>/submitit/%j
    submitit_folder: Optional[str] = None
    cpu_jobs: CPUJobsCfg = field(default_factory=CPUJobsCfg)


@dataclass
class StoreCfg:
    """The results store's cross-host lock (pipelines.locks)."""
    #: give up waiting for another process's lock on a stage key after this long (null: never)
    lock_timeout_s: Optional[float] = 86400.0
    #: a lock whose owner is on another host, with no SLURM answer about its job, is taken over
    #: when its heartbeat is older than this
    lock_stale_s: float = 600.0


def open_store(cfg):
    """The artifact store of `cfg` (paths.outputs/cache) with its lock settings."""
    from pathlib import Path

    from .artifacts import ArtifactStore
    return ArtifactStore(Path(cfg.paths.outputs) / "cache", cfg.store.lock_timeout_s,
                         cfg.store.lock_stale_s)


@dataclass
class RunCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    #: the chosen method's typed config (spikellm.config.QUANT_CONFIGS[quant.method]): `typed`
    quant: Any = None
    #: the chosen spiking mode's typed config (spikellm.config.SPIKING_CONFIGS[spiking.mode])
    spiking: Any = None
    #: the rotation before the method (spikellm.config.Rotation: none | hadamard)
    rotate: Rotation = field(default_factory=Rotation)
    calib: CalibSpec = field(default_factory=CalibSpec)
    eval: EvalCfg = field(default_factory=EvalCfg)
    paths: PathsCfg = field(default_factory=PathsCfg)
    store: StoreCfg = field(default_factory=StoreCfg)
    energy: EnergyCfg = field(default_factory=EnergyCfg)
    plan: PlanCfg = field(default_factory=PlanCfg)
    dry_run: bool = False
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    launcher: LauncherCfg = field(default_factory=LauncherCfg)
    name: Optional[str] = None
    device: str = "auto"
    batch_size: int = 8
    progress: bool = True
    save_model: bool = False
    #: the export's weights: dense (the model dtype; plain transformers loads weight-only methods)
    #: or packed (codes at their information content + FP16 scales: spikellm.load_quantized only)
    save_format: str = "dense"


def validate(cfg: Any) -> None:
    """Range checks; raise ValueError naming the key, the bad value and the allowed values."""
    from spikellm.data import EVAL_SPLIT
    c = cfg
    checks = [
        (c.save_format in ("dense", "packed"), "save_format", "dense or packed", c.save_format),
        (c.save_format == "dense" or c.save_model, "save_format",
         "dense unless save_model=true (packed is a format of the export: add save_model=true)", c.save_format),
        (c.save_format == "dense" or c.quant.wbits < 16, "save_format",
         "dense when the weights stay at 16 bits (nothing to pack: quant.wbits < 16)", c.save_format),
        (c.model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", "float32, float16 or bfloat16", c.model.dtype),
        (c.calib.dataset in DATASETS, "calib.dataset", f"one of {', '.join(DATASETS)}", c.calib.dataset),
        (c.calib.nsamples >= 1, "calib.nsamples", ">= 1", c.calib.nsamples),
        (c.calib.seqlen >= 16, "calib.seqlen", ">= 16", c.calib.seqlen),
        (c.eval.seqlen >= 16, "eval.seqlen", ">= 16", c.eval.seqlen),
        (c.eval.max_windows is None or c.eval.max_windows >= 1, "eval.max_windows", "null or >= 1", c.eval.max_windows),
        (all(d in DATASETS or "/" in d or "." in d for d in c.eval.datasets), "eval.datasets",
         f"a list of {', '.join(DATASETS)} or paths of text files", list(c.eval.datasets)),
        (len({dataset_name(d) for d in c.eval.datasets}) == len(c.eval.datasets), "eval.datasets",
         "datasets with distinct names (a text file is reported as ppl/<file stem>)", list(c.eval.datasets)),
        (c.eval.split in SPLITS, "eval.split", f"one of {', '.join(SPLITS)}", c.eval.split),
        (c.eval.split == "test" or not any(is_text_file(d) for d in c.eval.datasets), "eval.split",
         "test when eval.datasets has a text file (a file is evaluated whole)", c.eval.split),
        (0 <= c.calib.dev_fraction < 1, "calib.dev_fraction", "in [0, 1)", c.calib.dev_fraction),
        (c.calib.split != EVAL_SPLIT.get(c.calib.dataset), "calib.split",
         f"not the test split of {c.calib.dataset} (calibrating on test data makes every number unfair)",
         c.calib.split),
        (all(isinstance(t, str) and t.strip() for t in c.eval.tasks), "eval.tasks",
         f"a list of lm-eval task names (e.g. {', '.join(ZS_TASKS)})", list(c.eval.tasks)),
        (c.eval.num_fewshot >= 0, "eval.num_fewshot", ">= 0", c.eval.num_fewshot),
        (c.eval.limit is None or c.eval.limit > 0, "eval.limit", "null, a count >= 1 or a fraction in (0, 1)", c.eval.limit),
        (not c.eval.stream or c.model.stream, "eval.stream",
         "false unless model.stream=true (a streamed evaluation reads the quantized checkpoint's shards)", c.eval.stream),
        (not c.eval.stream or not c.eval.tasks, "eval.stream",
         "false with eval.tasks (lm-eval scores the whole model; set eval.tasks=[] for streamed perplexity)", c.eval.stream),
        (c.eval.spike_windows is None or c.eval.spike_windows >= 1, "eval.spike_windows", "null or >= 1",
         c.eval.spike_windows),
        (not (c.eval.spikes and c.eval.stream), "eval.spikes",
         "false with eval.stream=true (spikes are counted on the whole model in memory)", c.eval.spikes),
        (c.batch_size >= 1, "batch_size", ">= 1", c.batch_size),
        (c.store.lock_timeout_s is None or c.store.lock_timeout_s >= 0, "store.lock_timeout_s",
         "null (wait forever) or >= 0 seconds", c.store.lock_timeout_s),
        (c.store.lock_stale_s > 0, "store.lock_stale_s", "> 0 seconds", c.store.lock_stale_s),
        (min(c.energy.fp_mac, c.energy.fp_add, c.energy.int_mul_bitop, c.energy.int_add) >= 0,
         "energy.*", "non-negative pJ per operation", dict(c.energy)),
        (c.logger.backend in ("wandb", "none"), "logger.backend", "wandb or none", c.logger.backend),
        (c.logger.backend == "none" or c.logger.mode in ("offline", "online"), "logger.mode", "offline or online", c.logger.mode),
        (c.launcher.kind in ("auto", "local", "submitit_local", "slurm"), "launcher.kind", "auto, local, submitit_local or slurm", c.launcher.kind),
        (c.launcher.array_parallelism >= 1, "launcher.array_parallelism", ">= 1", c.launcher.array_parallelism),
        (c.launcher.max_num_timeout >= 0, "launcher.max_num_timeout", ">= 0", c.launcher.max_num_timeout),
        (c.launcher.signal_delay_s >= 0, "launcher.signal_delay_s", ">= 0", c.launcher.signal_delay_s),
        (c.launcher.cpus_per_gpu is None or c.launcher.cpus_per_gpu >= 1, "launcher.cpus_per_gpu", ">= 1 or null",
         c.launcher.cpus_per_gpu),
        (c.launcher.mem_per_gpu_gb is None or c.launcher.mem_per_gpu_gb >= 1, "launcher.mem_per_gpu_gb",
         ">= 1 or null", c.launcher.mem_per_gpu_gb),
        (c.launcher.cpu_jobs.cpus >= 1 and c.launcher.cpu_jobs.mem_gb >= 1 and c.launcher.cpu_jobs.time_min >= 1,
         "launcher.cpu_jobs", "cpus, mem_gb and time_min >= 1", dict(c.launcher.cpu_jobs)),
        (c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "device", "auto, cpu, cuda or cuda:N", c.device),
    ]
    for ok, key, allowed, value in checks:
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid: must be {allowed}")
    validate_method(*method_objects(c), rotation_object(c))


def _method_schema(cfg, group: str, tag: str, table: dict[str, type], default: str):
    """The structured node of the config class `cfg.<group>.<tag>` names, after checking that
    every key given under `group` is one of that class's (one line naming the key otherwise)."""
    node = cfg.get(group) if hasattr(cfg, "get") else None
    name = str(node.get(tag, default)) if node is not None else default
    if name not in table:
        raise ValueError(f"{group}.{tag}={name!r} is invalid: must be one of {', '.join(table)}")
    if node is not None:
        err = unknown_key(table, group, name, list(node.keys()))
        if err:
            raise ValueError(err)
    return OmegaConf.structured(table[name])


def typed(cfg) -> Any:
    """Merge a composed DictConfig into the schema (type errors and unknown keys raise): `quant`
    and `spiking` into the typed config of the method and mode they name."""
    base = OmegaConf.structured(RunCfg)
    base.quant = _method_schema(cfg, "quant", "method", QUANT_CONFIGS, "gptq")
    base.spiking = _method_schema(cfg, "spiking", "mode", SPIKING_CONFIGS, "none")
    return OmegaConf.merge(base, cfg)


def method_objects(cfg):
    """(quant config, spiking config) of a composed config, as spikellm.config instances (their
    `check()` has run: the one validation point of method keys)."""
    from spikellm.config import QuantConfig, SpikingConfig
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    s = OmegaConf.to_container(cfg.spiking, resolve=True)
    return QuantConfig(**q), SpikingConfig(**s)


def rotation_object(cfg):
    """The rotation of a composed config as a `spikellm.config.Rotation` (none when the config
    predates the rotate group)."""
    node = OmegaConf.select(cfg, "rotate")
    if node is None:
        return Rotation()
    r = OmegaConf.to_container(node, resolve=True)
    return Rotation(mode=str(r.get("mode", "none")), seed=int(r.get("seed", 0)))


class PreflightError(RuntimeError):
    """A run cannot start as configured (the message is one line that names the fix)."""


def check_outputs(outputs: str) -> None:
    """`paths.outputs` is (or can be made) a writable directory, with writable cache/runs/sweeps."""
    import os
    import tempfile
    from pathlib import Path
    root = Path(outputs).expanduser()
    for d in (root, root / "cache", root / "runs", root / "sweeps"):
        existing = next(a for a in (d, *d.parents) if a.exists())
        if not existing.is_dir():
            raise PreflightError(f"paths.outputs: {existing} is a file, not a directory; set "
                                 f"paths.outputs to a directory (or move the file away)")
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=d, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise PreflightError(f"paths.outputs: cannot write to {d} ({e.strerror or e}); set "
                                 f"paths.outputs to a writable directory") from None


def check_device(device: str) -> None:
    """`device=cuda[:N]` needs that GPU here (checked for in-process runs, before any stage)."""
    if device.startswith("cuda"):
        import torch
        if device != "cuda" and not device[5:].lstrip(":").isdigit():
            raise PreflightError(f"device={device} is invalid: use cuda or cuda:N (N a GPU index)")
        if not torch.cuda.is_available():
            raise PreflightError(f"device={device} but no CUDA GPU is visible here; use device=cpu "
                                 f"(or device=auto, which picks a GPU when there is one)")
        idx = device.split(":", 1)[1] if ":" in device else "0"
        if int(idx) >= torch.cuda.device_count():
            raise PreflightError(f"device={device} but only {torch.cuda.device_count()} GPU(s) are "
                                 f"visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_context(cfg: Any) -> None:
    """The checkpoint's layout is `model.family`'s (`spikellm.models.family_spec`), and windows
    are no longer than the model's positions (`max_position_embeddings`)."""
    from spikellm.models import family_spec, known_family
    from .dryrun import PlanError, model_config
    try:
        known_family(cfg.model.family)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    try:
        config = model_config(cfg)
    except (PlanError, OSError, ValueError):
        return                       # no config to read (a hub id offline): the load says why
    try:
        family_spec(config.model_type, cfg.model.family)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    limit = getattr(config, "max_position_embeddings", None)
    for key in ("eval.seqlen", "calib.seqlen"):
        n = OmegaConf.select(cfg, key)
        if limit and n > limit:
            raise PreflightError(f"{key}={n} exceeds the model's context of {limit} positions "
                                 f"(max_position_embeddings): use {key}<={limit}")


def slurm_only_settings(launcher: Any) -> list[str]:
    """`launcher.<key>=value` settings that differ from LauncherCfg's defaults: they shape SLURM
    jobs only (everything but `kind`), so a local run cannot honour them."""
    default = OmegaConf.structured(LauncherCfg)
    given = OmegaConf.to_container(launcher) if OmegaConf.is_config(launcher) else dict(launcher)
    out = []
    for k, v in given.items():
        if k == "kind":
            continue
        d = OmegaConf.to_container(default)[k]
        if isinstance(v, dict) and isinstance(d, dict):
            out += [f"launcher.{k}.{kk}={vv}" for kk, vv in v.items() if d.get(kk) != vv]
        elif v != d:
            out.append(f"launcher.{k}={v}")
    return out


def preflight(cfg: Any) -> None:
    """Checks that need the file system, before any work: the output directory, the device, the
    model checkpoint and its context length, and every data file the run will read. Raises
    PreflightError / FileNotFoundError / DataError with one line."""
    from spikellm.data import EVAL_SPLIT, check_available, dev_source
    from spikellm.models import resolve_source
    check_outputs(cfg.paths.outputs)
    from .launch import resolve_launcher, slurm_status
    if cfg.launcher.kind == "slurm" and slurm_status() is not None:
        raise PreflightError(f"launcher=slurm but no SLURM controller answers ({slurm_status()}): "
                             f"run on a login node of the cluster, or use launcher=local")
    if resolve_launcher(cfg.launcher.kind) == "local":   # SLURM jobs check on their own node
        check_device(cfg.device)
        unused = slurm_only_settings(cfg.launcher)
        if unused and cfg.launcher.kind == "local":
            raise PreflightError(f"{', '.join(unused)} only apply to SLURM jobs, and launcher=local runs "
                                 f"in this process: drop them or use launcher=slurm")
    if cfg.model.path not in (None, "embedded"):
        resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}")
    elif cfg.model.path is None and not cfg.model.hub_id:
        resolve_source(None, None, f"model={cfg.model.name}")
    check_available(cfg.calib.dataset, cfg.calib.split, cfg.paths.data_dir)
    for d in cfg.eval.datasets:
        if cfg.eval.split == "dev":
            check_available(d, dev_source(d, OmegaConf.to_object(cfg.calib), cfg.paths.data_dir),
                            cfg.paths.data_dir)
        else:
            check_available(d, EVAL_SPLIT.get(d, "test"), cfg.paths.data_dir)
    check_context(cfg)
    if cfg.eval.tasks:
        from .zeroshot import check_tasks
        try:
            check_tasks(list(cfg.eval.tasks), resolve_data_dir(cfg.paths.data_dir))
        except ValueError as e:
            raise PreflightError(str(e)) from None
