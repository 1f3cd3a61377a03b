"""Launching a planned DAG: in this process (`local`), through submitit's local executor
(`submitit_local`), or on SLURM (`slurm`) with one job array per stage and resource class and
`afterok`/`aftercorr` dependencies between them. `auto` picks SLURM where a cluster answers.

A SLURM job runs `run_node_job(sweep_dir, node_id)`: it reads the pickled plan from the
sweep directory, builds that one stage instance from its upstream artifacts, and raises (exit
non-zero, so `afterok` sees the failure) when the stage fails. Cached instances are never
submitted and get no edge.
"""
from __future__ import annotations

import functools
import pickle
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

from omegaconf import OmegaConf

from .artifacts import ArtifactStore
from .config import retype
from .dag import Plan
from .execute import resolve_cached, run_node, set_state
from .schema import eval_gpus, open_store
from .stages import say
from .tracking import Tracker


@functools.lru_cache(maxsize=None)
def slurm_status() -> str | None:
    """None when a SLURM controller answers (sbatch on PATH and `squeue` succeeds), else why
    not (one phrase); asked once per process."""
    missing = [c for c in ("sbatch", "squeue") if not shutil.which(c)]
    if missing:
        return f"{' and '.join(missing)} not on PATH"
    try:
        p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"squeue failed ({type(e).__name__})"
    if p.returncode != 0:
        err = (p.stderr or "").strip().splitlines()
        return f"squeue exited {p.returncode}" + (f": {err[0][:120]}" if err else "")
    return None


def slurm_available() -> bool:
    return slurm_status() is None


def resolve_launcher(kind: str) -> str:
    if kind != "auto":
        return kind
    return "slurm" if slurm_available() else "local"


def launcher_choice(kind: str) -> str:
    """The line that says which launcher runs the sweep and why (printed before any work)."""
    chosen = resolve_launcher(kind)
    if kind != "auto":
        return f"launcher={chosen}"
    if chosen == "slurm":
        return "launcher=auto chose slurm: a SLURM controller answers (set launcher=local to run here)"
    return (f"launcher=auto chose local, in this process: no SLURM ({slurm_status()}); "
            f"set launcher=slurm to require a cluster")


def _tracker_for(cfg, sweep_dir: Path, group: str | None) -> Tracker:
    lg = cfg.logger
    return Tracker(lg.backend, lg.mode, lg.project, lg.entity, sweep_dir, group=group)


def save_plan(plan: Plan, sweep_dir: Path, labels: dict[str, str], group: str | None) -> None:
    """Everything a job needs to run any node, pickled next to plan.json."""
    blob = {"nodes": {i: {"stage": n.stage, "key": n.key, "inputs": n.inputs, "deps": n.deps,
                          "points": n.points, "cfg": OmegaConf.to_container(n.cfg)}
                      for i, n in plan.nodes.items()},
            "labels": labels, "group": group}
    with open(sweep_dir / "plan.pkl", "wb") as f:
        pickle.dump(blob, f)


class NodeJob:
    """Checkpointable job callable: on submitit's preemption/timeout signal the job is
    requeued with the same arguments and the stage resumes from its last committed block."""

    def __call__(self, sweep_dir: str, node_id: str) -> str:
        return run_node_job(sweep_dir, node_id)

    def checkpoint(self, sweep_dir: str, node_id: str):
        import submitit
        return submitit.helpers.DelayedSubmission(NodeJob(), sweep_dir, node_id)


def _check_inputs_unchanged(node, nodes) -> None:
    """A queued job recomputes its key where it runs: if code, data or libraries changed since
    submission, its result would be stored under a key naming the old ones. Fail in one line."""
    from .dag import STAGE_INPUTS, STAGE_VERSIONS
    from .store import content_key
    inputs = STAGE_INPUTS[node.stage](node.cfg)
    key = content_key(node.stage, STAGE_VERSIONS[node.stage], inputs,
                      sorted((r, nodes[i].key) for r, i in node.deps.items()))
    if key != node.key:
        changed = sorted(k for k in set(inputs) | set(node.inputs) if inputs.get(k) != node.inputs.get(k))
        raise RuntimeError(f"{node.id}: its inputs changed since submission ({', '.join(changed)}); "
                           f"resubmit the sweep")


def run_node_job(sweep_dir: str, node_id: str) -> str:
    """SLURM/submitit entry point: build one stage instance; raise if it fails."""
    from .dag import Node
    sweep = Path(sweep_dir)
    with open(sweep / "plan.pkl", "rb") as f:
        blob = pickle.load(f)
    nodes = {}
    for i, d in blob["nodes"].items():
        nodes[i] = Node(d["stage"], d["key"], d["inputs"], d["deps"], retype(d["cfg"]), d["points"])
    node = nodes[node_id]
    _check_inputs_unchanged(node, nodes)
    store = open_store(node.cfg)
    deps = {}
    for role, dep_id in node.deps.items():
        art = store.get(nodes[dep_id].stage, nodes[dep_id].key)
        if art is None:
            raise RuntimeError(f"upstream {dep_id} has no artifact")
        deps[role] = art
    art = run_node(node, deps, store, _tracker_for(node.cfg, sweep, blob["group"]), sweep,
                   blob["labels"][node_id])
    return str(art.path)


#: stages that need no GPU: SLURM jobs on launcher.cpu_jobs' partition
CPU_STAGES = ("calibrate", "export")


def stage_resources(node) -> dict:
    """Per-stage resources: calibration is a small CPU job (`launcher.cpu_jobs`), export a CPU
    job with the model's memory, the rest what `model.resources` says."""
    r = node.cfg.model.resources
    if node.stage == "calibrate":
        cj = node.cfg.launcher.cpu_jobs
        return {"gpus": 0, "cpus": int(cj.cpus), "mem_gb": int(cj.mem_gb), "time_min": int(cj.time_min)}
    if node.stage == "export":        # writes (or links) a checkpoint: host memory and disk only
        return {"gpus": 0, "cpus": int(r.cpus), "mem_gb": int(r.mem_gb), "time_min": int(r.time_min)}
    # a streamed evaluation (eval.stream) holds one block: the quantize stage's GPUs suffice
    whole_eval = node.stage.startswith("evaluate") and not node.cfg.eval.stream
    gpus = eval_gpus(r) if whole_eval else r.gpus
    return {"gpus": int(gpus), "cpus": int(r.cpus), "mem_gb": int(r.mem_gb),
            "time_min": int(r.time_min)}


def slurm_parameters(stage: str, res: dict, lc, sweep_id: str) -> dict:
    """submitit's update_parameters for one job array of `stage` with resources `res` under
    launcher config `lc` (SlurmQueueConf's keys; see conf/launcher/local.yaml)."""
    params = {"name": f"spikellm-{sweep_id}-{stage}", "timeout_min": res["time_min"],
              "slurm_array_parallelism": int(lc.array_parallelism),
              "slurm_signal_delay_s": int(lc.signal_delay_s)}
    gpu = res["gpus"] > 0
    if gpu and lc.get("cpus_per_gpu"):
        params["slurm_cpus_per_gpu"] = int(lc.cpus_per_gpu)
    else:
        params["cpus_per_task"] = res["cpus"]
    if gpu and lc.get("mem_per_gpu_gb"):
        params["slurm_mem_per_gpu"] = f"{int(lc.mem_per_gpu_gb)}G"
    else:
        params["mem_gb"] = res["mem_gb"]
    if gpu and lc.get("gres"):
        params["slurm_gres"] = str(lc.gres)
    elif gpu:
        params["gpus_per_node"] = res["gpus"]
    partition = (lc.cpu_jobs.partition if stage in CPU_STAGES else None) or lc.get("partition")
    if partition:
        params["slurm_partition"] = str(partition)
    for key in ("account", "qos", "constraint", "exclude"):
        if lc.get(key):
            params[f"slurm_{key}"] = str(lc.get(key))
    if lc.get("setup"):
        params["slurm_setup"] = [str(x) for x in lc.setup]
    extra = {"kill-on-invalid-dep": "yes"}
    extra.update({str(k): v for k, v in (lc.get("additional_parameters") or {}).items()})
    params["slurm_additional_parameters"] = extra
    return params


def submit(plan: Plan, store: ArtifactStore, sweep_dir: Path, labels: dict[str, str],
           launcher_cfg, group: str | None, kind: str) -> list:
    """Submit every not-yet-cached node; returns the submitit jobs (one per node)."""
    import submitit

    save_plan(plan, sweep_dir, labels, group)
    pending = OrderedDict()
    cached = resolve_cached(plan, store)
    for node in plan.nodes.values():
        hit = cached[node.id]
        if hit is not None:
            set_state(sweep_dir, node, "cached", path=str(hit.path))
        else:
            pending[node.id] = node
    # one array per (stage, resource class), in dependency order
    arrays: OrderedDict[tuple, list] = OrderedDict()
    for node in pending.values():
        arrays.setdefault((node.stage, tuple(sorted(stage_resources(node).items()))), []).append(node)
    job_of: dict[str, object] = {}
    array_of: dict[str, str] = {}
    jobs = []
    for (stage, res_items), nodes in arrays.items():
        res = dict(res_items)
        folder = launcher_cfg.get("submitit_folder") or sweep_dir / "submitit" / "%j"
        if kind == "slurm":
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                             slurm_max_num_timeout=int(launcher_cfg.max_num_timeout))
            params = slurm_parameters(stage, res, launcher_cfg, sweep_dir.name)
            dep = _dependency(nodes, pending, job_of, array_of)
            if dep:
                params["slurm_additional_parameters"]["dependency"] = dep
        else:
            executor = submitit.AutoExecutor(folder=folder, cluster="local")
            params = {"name": f"spikellm-{sweep_dir.name}-{stage}", "timeout_min": res["time_min"],
                      "mem_gb": res["mem_gb"], "cpus_per_task": res["cpus"]}
        executor.update_parameters(**params)
        batch = executor.map_array(NodeJob(), [str(sweep_dir)] * len(nodes),
                                   [n.id for n in nodes])
        for node, job in zip(nodes, batch):
            job_of[node.id] = job
            array_of[node.id] = str(job.job_id).split("_")[0]
            set_state(sweep_dir, node, "queued", job_id=str(job.job_id), log=str(job.paths.stdout))
        jobs.extend(batch)
        say(f"submitted {stage}: {len(nodes)} job(s) {batch[0].job_id.split('_')[0]}"
            + (f" after {params['slurm_additional_parameters'].get('dependency')}"
               if kind == "slurm" and "dependency" in params["slurm_additional_parameters"] else ""))
        if kind == "submitit_local":     # no dependencies locally: finish each array first
            for job in batch:
                try:
                    job.result()
                except Exception:
                    pass
    return jobs


def _dependency(nodes, pending, job_of, array_of) -> str:
    """`aftercorr:<array>` when task i depends exactly on task i of one upstream array of the
    same size, else `afterok` on every upstream job that is pending (cached ones need none)."""
    ups = [[d for d in n.deps.values() if d in pending] for n in nodes]
    if not any(ups):
        return ""
    arrays = {array_of[d] for u in ups for d in u}
    if len(nodes) > 1 and len(arrays) == 1 and all(len(u) == 1 for u in ups):
        arr = arrays.pop()
        members = [i for i, a in array_of.items() if a == arr]
        if len(members) == len(nodes) and [u[0] for u in ups] == members:
            return f"aftercorr:{arr}"
    return "afterok:" + ":".join(sorted({str(job_of[d].job_id) for u in ups for d in u}))


def _squeue_ids() -> set[str] | None:
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(p.stdout.split()) if p.returncode == 0 else None


def wait_slurm(jobs: list, plan: Plan, sweep_dir: Path, poll_s: float = 2.0) -> None:
    """Wait until none of `jobs` is queued or running. Jobs SLURM removed without running
    them (an `afterok` that can never be met, `--kill-on-invalid-dep=yes`) are recorded as
    cancelled. Polls squeue, so it needs no accounting database."""
    import json
    import time
    ids = {str(j.job_id) for j in jobs}
    failures = 0
    while True:
        live = _squeue_ids()
        if live is None:
            failures += 1
            if failures > 60:
                raise RuntimeError("squeue keeps failing: is SLURM_CONF set and the controller up?")
        elif not (ids & live):
            break
        else:
            failures = 0
        time.sleep(poll_s)
    from .execute import state_path
    for node in plan.nodes.values():
        f = state_path(sweep_dir, node.id)
        if f.exists() and json.loads(f.read_text()).get("state") in ("queued", "running"):
            set_state(sweep_dir, node, "cancelled",
                      reason="SLURM removed the job before it finished (failed upstream dependency, "
                             "time limit or node failure)")
