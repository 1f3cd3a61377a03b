"""Run a planned DAG in this process, recording each stage instance's state in the sweep
directory (`state/<stage>__<key>.json`: cached, running, done, failed with the reason, or
cancelled because an upstream stage failed) and logging every executed stage to W&B."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import platform
import subprocess
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from .artifacts import Artifact, ArtifactStore
from .dag import STAGE_VERSIONS, Plan
from .stages import STAGE_FUNCTIONS, resolve_device, say
from .store import write_json
from .tracking import Tracker


def zero_shot_rows(metrics: dict) -> list[dict]:
    """acc/<task>, acc_norm/<task>, n/<task> metrics -> one row per task (and the average)."""
    tasks = [k.split("/", 1)[1] for k in metrics if k.startswith("acc/")]
    return [{"task": t, "acc": metrics[f"acc/{t}"], "acc_norm": metrics.get(f"acc_norm/{t}"),
             "n": metrics.get(f"n/{t}")} for t in tasks]


def versions() -> dict:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def state_path(sweep_dir: Path, node_id: str) -> Path:
    return sweep_dir / "state" / (node_id.replace("/", "__") + ".json")


def set_state(sweep_dir: Path, node, state: str, **extra) -> None:
    path = state_path(sweep_dir, node.id)
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            pass
    write_json(path, {**old, "stage": node.stage, "key": node.key, "points": node.points,
                      "state": state, "updated": _now(), **extra})


def write_plan(plan: Plan, sweep_dir: Path, overrides: list[list[str]]) -> None:
    write_json(sweep_dir / "plan.json", {
        "created": _now(), "points": [{"overrides": ov, "nodes": ids}
                                      for ov, ids in zip(overrides, plan.points)],
        "nodes": {n.id: {"stage": n.stage, "key": n.key, "deps": n.deps, "points": n.points}
                  for n in plan.nodes.values()},
        "counts": plan.count()})


def _config_dict(cfg) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("_overrides", None)
    return d


class Interrupted(KeyboardInterrupt):
    """A stage was stopped by SIGINT/SIGTERM; its state is `interrupted`, its block checkpoints
    are kept, and the same command resumes it."""

    def __init__(self, node_id: str, signal_name: str):
        super().__init__(signal_name)
        self.node_id, self.signal_name = node_id, signal_name


def checkpoint_root(store: ArtifactStore, node) -> Path:
    return store.root / node.stage / f".ckpt-{node.key}"


def claim_checkpoint(store: ArtifactStore, node) -> Path:
    """This process's block-checkpoint directory for `node` (`.ckpt-<key>/<host>-<pid>/`),
    called under the node's lock. A previous owner's directory (a killed or preempted run) is
    adopted, the one with the most committed blocks; the others are removed, so two owners'
    blocks are never mixed. Its `tag.json` (the stage key) is what every block records."""
    from spikellm.blockwise import CHECKPOINT_TAG
    base = checkpoint_root(store, node)
    mine = base / f"{socket.gethostname()}-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    others = [d for d in base.iterdir() if d.is_dir() and d != mine]
    best = max(others, key=lambda d: len(list(d.glob("block-*.json"))), default=None)
    if best is not None and not mine.exists() and any(best.glob("block-*.json")):
        os.replace(best, mine)
        say(f"resuming {node.id} from the blocks {best.name} committed")
    for d in others:
        if d != best or d.exists():
            shutil.rmtree(d, ignore_errors=True)
    mine.mkdir(exist_ok=True)
    from .fingerprint import code_digest
    (mine / CHECKPOINT_TAG).write_text(json.dumps({"key": node.key, "stage": node.stage,
                                                   "code": code_digest()}))
    return mine


def upstream_digests(deps: dict[str, Artifact]) -> dict[str, str]:
    """{role: content digest} of a node's upstream artifacts: recorded in the artifact built
    from them, compared on every later lookup (an upstream rebuilt since makes it stale)."""
    return {role: a.digest for role, a in deps.items()}


def lookup(node, store: ArtifactStore, done: dict[str, Artifact | None]) -> Artifact | None:
    """The node's cached artifact if every upstream is resolved in `done` and it was built from
    exactly their content; else None (a stale artifact is moved aside with one line)."""
    deps = {role: done.get(i) for role, i in node.deps.items()}
    if any(a is None for a in deps.values()):
        return None
    return store.get(node.stage, node.key, upstream_digests(deps))


def resolve_cached(plan: Plan, store: ArtifactStore) -> dict[str, Artifact | None]:
    """node id -> its valid cached artifact (or None), in dependency order."""
    done: dict[str, Artifact | None] = {}
    for node in plan.nodes.values():
        done[node.id] = lookup(node, store, done)
    return done


class DiskSpaceError(OSError):
    """Less free space where the store is than the dry run estimates a stage writes."""


def check_disk(node, root: Path) -> None:
    """Fail before a stage starts when the dry run's disk estimate exceeds the free space."""
    from .dryrun import stage_disk_gb
    try:
        need = stage_disk_gb(node)
    except Exception:            # no estimate for this model (no config to plan from): no check
        return
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free / 2 ** 30
    if need > free:
        raise DiskSpaceError(f"{node.id} needs about {need:.1f} GB in {root} (dry-run estimate) "
                             f"but {free:.1f} GB are free: free space, or set paths.outputs to a "
                             f"larger filesystem")


def _reset_gpu_peak(cfg) -> None:
    """Per-stage GPU peaks: reset CUDA's peak counter when a stage starts (host RSS cannot be)."""
    import torch
    dev = resolve_device(cfg.device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)


def run_tags(cfg) -> list[str]:
    """W&B tags of a run: the model, quant and spiking choices (and the recipe)."""
    ch = cfg.get("_choices") or {}
    return [str(ch[g]) for g in ("model", "quant", "spiking", "experiment") if ch.get(g)]


def run_node(node, deps: dict[str, Artifact], store: ArtifactStore, tracker: Tracker,
             sweep_dir: Path, name: str) -> Artifact:
    """Build one stage instance (under the store's lock), log it as one W&B run and record its
    state. Raises the stage's exception after recording it as failed."""
    t_start = time.time()
    _reset_gpu_peak(node.cfg)
    set_state(sweep_dir, node, "running", started=_now(), pid=os.getpid(),
              host=socket.gethostname(), slurm_job=os.environ.get("SLURM_JOB_ID"))
    record = {"config": node.inputs, "upstream": {r: a.key for r, a in deps.items()},
              "code_version": STAGE_VERSIONS[node.stage], "versions": versions()}
    try:
        check_disk(node, store.root)
        with tracker.stage_run(node.stage, name, {**_config_dict(node.cfg), "stage_key": node.key},
                               tags=run_tags(node.cfg)) as run:
            art, built = store.build(node.stage, node.key,
                                 lambda out: STAGE_FUNCTIONS[node.stage](
                                     node.cfg, deps, out, checkpoint=claim_checkpoint(store, node),
                                     on_block=run.log_block),
                                 record, upstream_digests(deps))
            shutil.rmtree(checkpoint_root(store, node), ignore_errors=True)   # committed: done
            run.log(art.metrics)
            stats = art.path / "module_stats.json"
            if stats.exists():
                run.table("module_stats", json.loads(stats.read_text()))
            if node.stage.startswith("evaluate"):
                run.table("perplexity", [{"metric": k, "value": v}
                                         for k, v in art.metrics.items() if k.startswith("ppl/")])
                run.table("zero_shot", zero_shot_rows(art.metrics))
                spikes = art.path / "spikes.json"
                if spikes.exists():
                    run.table("spikes", json.loads(spikes.read_text()))
    except KeyboardInterrupt as e:          # SIGINT, or SIGTERM turned into one (pipelines.run)
        why = str(e) or "SIGINT"
        set_state(sweep_dir, node, "interrupted", ended=_now(), reason=f"stopped by {why}")
        raise Interrupted(node.id, why) from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {msg}"
        say(f"stage {node.id} failed: {reason}")
        (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
        (sweep_dir / "logs" / f"{node.stage}__{node.key}.traceback").write_text(
            traceback.format_exc())
        set_state(sweep_dir, node, "failed", ended=_now(), reason=reason)
        raise
    if built:
        set_state(sweep_dir, node, "done", ended=_now(), path=str(art.path))
        from spikellm.blockwise import peak_memory_gb
        dev = resolve_device(node.cfg.device)
        what = "GPU peak (this stage)" if dev.startswith("cuda") else "peak RSS (this process so far)"
        say(f"stage {node.stage} {node.key} done: {time.time() - t_start:.1f}s, {what} "
            f"{peak_memory_gb(dev):.2f} GiB")
    else:                    # another process built it while this one waited on the lock
        set_state(sweep_dir, node, "cached", ended=_now(), path=str(art.path),
                  reason="built by another process while this one waited")
    return art


def execute_local(plan: Plan, store: ArtifactStore, tracker: Tracker, sweep_dir: Path,
                  labels: dict[str, str]) -> dict[str, Artifact | None]:
    """Run every node in dependency order; a failed node cancels its dependents but not the
    rest. `labels`: node id -> its W&B run name (`sweep.stage_labels`). Returns node id ->
    artifact (None when failed or cancelled)."""
    done: dict[str, Artifact | None] = {}
    for node in plan.nodes.values():
        bad = [d for d in node.deps.values() if done.get(d) is None]
        if bad:
            set_state(sweep_dir, node, "cancelled", reason=f"upstream {bad[0]} did not finish")
            done[node.id] = None
            continue
        hit = lookup(node, store, done)
        if hit is not None:
            set_state(sweep_dir, node, "cached", path=str(hit.path))
            done[node.id] = hit
            continue
        try:
            done[node.id] = run_node(node, {role: done[i] for role, i in node.deps.items()},
                                     store, tracker, sweep_dir, labels[node.id])
        except Exception:  # recorded by run_node; keep going with what does not depend on it
            done[node.id] = None
    return done
