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
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from .artifacts import Artifact, ArtifactStore
from .dag import STAGE_VERSIONS, Plan
from .stages import STAGE_FUNCTIONS, say
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


def run_node(node, deps: dict[str, Artifact], store: ArtifactStore, tracker: Tracker,
             sweep_dir: Path, name: str) -> Artifact:
    """Build one stage instance (under the store's lock), log it as one W&B run and record its
    state. Raises the stage's exception after recording it as failed."""
    set_state(sweep_dir, node, "running", started=_now(), pid=os.getpid(),
              host=socket.gethostname())
    record = {"config": node.inputs, "upstream": {r: a.key for r, a in deps.items()},
              "code_version": STAGE_VERSIONS[node.stage], "versions": versions()}
    try:
        with tracker.stage_run(node.stage, f"{name}:{node.stage}",
                               {**_config_dict(node.cfg), "stage_key": node.key}) as run:
            ckpt = store.root / node.stage / f".ckpt-{node.key}"
            art, _ = store.build(node.stage, node.key,
                                 lambda out: STAGE_FUNCTIONS[node.stage](node.cfg, deps, out,
                                                                         checkpoint=ckpt),
                                 record)
            shutil.rmtree(ckpt, ignore_errors=True)      # committed: block checkpoints done
            run.log(art.metrics)
            stats = art.path / "module_stats.json"
            if stats.exists():
                run.table("module_stats", json.loads(stats.read_text()))
            if node.stage.startswith("evaluate"):
                run.table("perplexity", [{"metric": k, "value": v}
                                         for k, v in art.metrics.items() if k.startswith("ppl/")])
                run.table("zero_shot", zero_shot_rows(art.metrics))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {msg}"
        say(f"stage {node.id} failed: {reason}")
        (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
        (sweep_dir / "logs" / f"{node.stage}__{node.key}.traceback").write_text(
            traceback.format_exc())
        set_state(sweep_dir, node, "failed", ended=_now(), reason=reason)
        raise
    set_state(sweep_dir, node, "done", ended=_now(), path=str(art.path))
    return art


def execute_local(plan: Plan, store: ArtifactStore, tracker: Tracker, sweep_dir: Path,
                  names: list[str]) -> dict[str, Artifact | None]:
    """Run every node in dependency order; a failed node cancels its dependents but not the
    rest. Returns node id -> artifact (None when failed or cancelled)."""
    done: dict[str, Artifact | None] = {}
    for node in plan.nodes.values():
        bad = [d for d in node.deps.values() if done.get(d) is None]
        if bad:
            set_state(sweep_dir, node, "cancelled", reason=f"upstream {bad[0]} did not finish")
            done[node.id] = None
            continue
        hit = store.get(node.stage, node.key)
        if hit is not None:
            set_state(sweep_dir, node, "cached", path=str(hit.path))
            done[node.id] = hit
            continue
        try:
            done[node.id] = run_node(node, {role: done[i] for role, i in node.deps.items()},
                                     store, tracker, sweep_dir, names[node.points[0]])
        except Exception:  # recorded by run_node; keep going with what does not depend on it
            done[node.id] = None
    return done
