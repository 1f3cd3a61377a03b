"""Run a validated sweep: plan its DAG, execute it (in-process or on SLURM), write one run
manifest per point (config, metrics, artifacts, energy detail) and print the tables.
`pipelines.run` parses the command line and calls `run_sweep`."""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import stages
from .config import point_values, run_name, varying_keys
from .schema import open_store, slurm_only_settings
from .store import write_json


METRIC_ORDER = ("ppl/fp/", "ppl/", "acc/fp/", "acc/", "acc_norm/", "cost/avg_steps", "cost/ace", "cost/", "time/", "mem/")


def _state_counts(sweep_dir: Path) -> dict[str, dict[str, int]]:
    """{state: {stage: count}} over the sweep's stage instances (done = executed here)."""
    from .status import collect
    out: dict[str, dict[str, int]] = {}
    for r in collect(sweep_dir):
        per = out.setdefault(r["state"], {})
        per[r["stage"]] = per.get(r["stage"], 0) + 1
    return out


def run_sweep(cfgs: list, points: list[list[str]], dirs: dict[str, str] | None = None
              ) -> tuple[list[Path], bool]:
    """Plan all points as one DAG, run each distinct stage once, write one manifest per point.
    `dirs`: Hydra's output directories from the command line ({"run": hydra.run.dir} for a
    single run, {"sweep": hydra.sweep.dir} for -m, point n then in <sweep>/<n>); by default the
    sweep record is <paths.outputs>/sweeps/<date>/<time> and each run <paths.outputs>/runs/...
    Returns (manifest paths, all succeeded)."""
    from .dag import plan as make_plan
    from .execute import execute_local, resolve_cached, write_plan
    from .launch import launcher_choice, resolve_launcher, submit, wait_slurm
    from .tracking import Tracker

    first = cfgs[0]
    stamp = _dt.datetime.now()
    outputs = Path(first.paths.outputs)
    dirs = dirs or {}
    sweep_dir = Path(dirs["sweep"]) if "sweep" in dirs else \
        outputs / "sweeps" / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S-%f")[:-3]
    the_plan = make_plan(cfgs)
    write_plan(the_plan, sweep_dir, points)
    names = [run_name(c) for c in cfgs]
    labels = stage_labels(the_plan, points, names)
    lg = first.logger
    tracker = Tracker(lg.backend, lg.mode, lg.project, lg.entity, sweep_dir,
                      group=sweep_group(first, sweep_dir, len(cfgs)))
    counts = the_plan.count()
    stages.say(f"plan: {len(cfgs)} point(s), " + ", ".join(f"{k} {v}" for k, v in counts.items())
               + f"; sweep record {sweep_dir}")
    t0 = time.time()
    store = open_store(first)
    kind = resolve_launcher(first.launcher.kind)
    if first.launcher.kind == "auto":
        stages.say(launcher_choice(first.launcher.kind))
        unused = slurm_only_settings(first.launcher) if kind == "local" else []
        if unused:
            stages.say(f"note: {', '.join(unused)} only apply to SLURM jobs: unused by this local run")
    if kind == "local":
        done = execute_local(the_plan, store, tracker, sweep_dir, labels)
    else:
        jobs = submit(the_plan, store, sweep_dir, labels, first.launcher, tracker.group, kind)
        if kind == "slurm" and not first.launcher.wait:
            print(f"submitted {len(jobs)} job(s); follow them with: python -m pipelines.status "
                  f"{sweep_dir}")
            return [], True
        if kind == "slurm":
            wait_slurm(jobs, the_plan, sweep_dir)
        done = resolve_cached(the_plan, store)
    manifests, ok = [], True
    swept = varying_keys(points) if len(points) > 1 else []     # once per sweep, not per point
    for p, (cfg, ids) in enumerate(zip(cfgs, the_plan.points)):
        arts = {stage: done[i] for stage, i in ids.items()}
        if any(a is None for a in arts.values()):
            ok = False
            failed = [i for i in ids.values() if done[i] is None]
            print(f"point {' '.join(points[p]) or '(defaults)'}: did not finish ({failed[0]}); "
                  f"see python -m pipelines.status {sweep_dir}", file=sys.stderr)
            continue
        run_dir = Path(dirs["run"]) if "run" in dirs else (sweep_dir / str(p) if "sweep" in dirs else None)
        manifests.append(write_run_manifest(cfg, arts, names[p], sweep_dir, run_dir))
        log_point(tracker, cfg, json.loads(manifests[-1].read_text()), swept, points[p], names[p])
    executed = _state_counts(sweep_dir)
    wall = time.time() - t0
    write_json(sweep_dir / "summary.json", {"wall_s": wall, "points": len(cfgs), "counts": counts,
                                            "states": executed, "ok": ok})
    stages.say("stages " + "; ".join(
        f"{state}: " + ", ".join(f"{st} {n}" for st, n in per.items())
        for state, per in executed.items()) + f"; wall {wall:.1f}s")
    if len(cfgs) > 1:
        from .report import write_report
        html, _ = write_report(sweep_dir)
        print(f"report: {html}")
    return manifests, ok


def stage_labels(plan, points: list[list[str]], names: list[str]) -> dict[str, str]:
    """node id -> its W&B run name: in a sweep, the stage and the swept values its points share
    ("quantize spiking.ratio=0.1 spiking.select=random"; "calibrate (shared by 8 points)",
    "score (shared by 4 points: spiking.select=saliency)"); in a single run, run name:stage."""
    keys = varying_keys(points)
    out = {}
    for node in plan.nodes.values():
        if len(points) == 1:
            out[node.id] = f"{names[0]}:{node.stage}"
            continue
        vals = [point_values(points[p], keys) for p in node.points]
        common = [f"{k}={vals[0][k]}" for k in keys if k in vals[0] and all(v.get(k) == vals[0][k] for v in vals)]
        if len(node.points) == 1:
            out[node.id] = " ".join([node.stage, *common])
        else:
            out[node.id] = f"{node.stage} (shared by {len(node.points)} points" + \
                (f": {' '.join(common)})" if common else ")")
    return out


def sweep_group(cfg, sweep_dir: Path, n_points: int) -> str:
    """The W&B group of a sweep's runs: its recipe (or "sweep" / "run"), date and time."""
    label = cfg._choices.get("experiment") or ("sweep" if n_points > 1 else "run")
    date = sweep_dir.parent.name if sweep_dir.parent.parent.name == "sweeps" else \
        _dt.date.today().isoformat()
    return f"{label}-{date}-{sweep_dir.name}"


def log_point(tracker, cfg, manifest: dict, keys: list[str], point: list[str], name: str) -> None:
    """One W&B run for a sweep point (its overrides `point`, the sweep's swept `keys`) with its
    whole result (`Tracker.point_run`)."""
    from .execute import run_tags
    config = dict(manifest["config"])
    for k in keys:                     # the swept keys as top-level columns, typed
        config[k] = cfg._choices.get(k) if k in cfg._choices else OmegaConf.select(cfg, k)
    config["choices"] = manifest["choices"]
    label = " ".join(f"{k}={v}" for k, v in point_values(point, keys).items()) or name
    tracker.point_run(label, config, manifest["metrics"], run_tags(cfg))


def write_run_manifest(cfg, arts: dict, name: str, sweep_dir: Path, run_dir: Path | None = None) -> Path:
    """The point's run directory (default <paths.outputs>/runs/<date>/<time>_<name>): manifest.json,
    module_stats.json, and with save_model its exported model/."""
    stamp = _dt.datetime.now()
    run_dir = run_dir or Path(cfg.paths.outputs) / "runs" / stamp.strftime("%Y-%m-%d") / \
        f"{stamp.strftime('%H-%M-%S-%f')[:-3]}_{name}"
    metrics: dict = {}
    for stage in ("evaluate_fp", "quantize", "evaluate", "export"):
        if stage in arts:
            metrics.update(arts[stage].metrics)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices, overrides = resolved.pop("_choices"), resolved.pop("_overrides")
    q = arts["quantize"]
    calib = torch_load_shape(arts["calibrate"].file("ids.pt"))
    manifest = {
        "name": name, "created": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["python -m pipelines.run", *overrides]),
        "choices": choices, "overrides": overrides, "config": resolved,
        "versions": q.manifest.get("versions", {}),
        "timings": {stage: a.manifest.get("timings", {}).get("total_s") for stage, a in arts.items()},
        "metrics": metrics,
        "calibration": {"dataset": cfg.calib.dataset, "split": cfg.calib.split,
                        "windows": calib, "seed": cfg.calib.seed},
        "artifacts": {stage: str(a.path) for stage, a in arts.items()},
        "sweep": str(sweep_dir),
        "notes": json.loads(q.file("notes.json").read_text()) if q.file("notes.json").exists() else [],
    }
    # per-layer detail; the totals (cost/energy_*) are the quantize stage's own metrics
    manifest["energy"] = energy_estimate(cfg, q.file("layer_costs.json"))
    run_dir.mkdir(parents=True, exist_ok=True)
    if "export" in arts:        # save_model=true: the checkpoint into the run directory, cached or not
        from spikellm.export import link_checkpoint
        link_checkpoint(arts["export"].file("model"), run_dir / "model")
        manifest["model_dir"] = str(run_dir / "model")
    stats = q.file("module_stats.json")
    if stats.exists():
        (run_dir / "module_stats.json").write_text(stats.read_text())
    if "evaluate" in arts and arts["evaluate"].file("spikes.json").exists():   # eval.spikes: per layer
        (run_dir / "spikes.json").write_text(arts["evaluate"].file("spikes.json").read_text())
    write_json(run_dir / "manifest.json", manifest)
    print_table(manifest, run_dir / "manifest.json")
    return run_dir / "manifest.json"


def energy_estimate(cfg, layer_costs: Path) -> dict:
    """Per-layer and total energy per token (pJ) of the quantized linears from the quantize
    artifact's layer costs and the `energy.*` constants, which are assumptions (labelled so)."""
    from spikellm.allocation import LayerCost, energy_cost, layer_energy

    from .stages import energy_model
    if not layer_costs.exists():
        return {}
    layers = [LayerCost(**r) for r in json.loads(layer_costs.read_text())]
    e = energy_model(cfg)
    return {"assumption": f"per-operation energies in pJ from {cfg.energy.source}", "constants_pj": asdict(e),
            "total": energy_cost(layers, e),
            "layers": [{"name": c.name, "ace": c.ace, "additive_fraction": c.additive_fraction,
                        "avg_steps": c.avg_steps, "energy_pj": layer_energy(c, e)[0]} for c in layers]}


def torch_load_shape(path: Path) -> list[int]:
    import torch
    return list(torch.load(path, weights_only=True).shape)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def _ordered(metrics: dict) -> list[str]:
    def rank(k):
        return next((i for i, p in enumerate(METRIC_ORDER) if k.startswith(p)), len(METRIC_ORDER))
    return sorted(metrics, key=lambda k: (rank(k), k))


def print_table(manifest: dict, path: Path) -> None:
    cfg = manifest["config"]
    sp = cfg["spiking"]
    unit = "weights" if sp.get("granularity") == "element" else "columns"
    spiking = "none" if sp["mode"] == "none" else \
        f"{sp['mode']} ({sp['ratio']:.0%} of {unit} x {sp['steps']} steps, {sp['select']}"
    if sp["mode"] == "ternary":
        spiking += f", thresholds per {sp.get('group_size') or 'row'}" + \
            (" columns" if sp.get("group_size") else "") + ")"
    elif sp["mode"] != "none":
        spiking += ")"
    qc = cfg["quant"]
    extra = ""
    if qc["method"] == "omniquant" and qc.get("abits", 16) < 16:
        axis = qc.get("k_axis", "token")
        extra = f"  K={axis}" + (" (NON-CAUSAL: per channel over the window)" if axis == "channel" else "")
    acts = ""
    if qc.get("abits", 16) < 16:
        acts = f", abits={qc['abits']}"
        if qc["method"] != "omniquant":
            kv = qc.get("kv_bits") or qc["abits"]
            acts += f", kv_bits={kv}, a_clip={qc.get('a_clip', 1.0):g}, kv_clip={qc.get('kv_clip', 1.0):g}"
    rot = cfg.get("rotate") or {}
    if rot.get("mode", "none") != "none":
        extra += f"  rotate={rot['mode']} (seed {rot.get('seed', 0)})"
    split = cfg.get("eval", {}).get("split", "test")
    print(f"\nspikellm  model={cfg['model']['name']}  quant={manifest['choices']['quant']} "
          f"(wbits={qc['wbits']}{acts}, group={qc['group_size'] or 'per-channel'})  "
          f"spiking={spiking}{extra}  eval={split}")
    m = manifest["metrics"]
    width = max(len(k) for k in m)
    print(f"  {'metric'.ljust(width)}  value")
    per_layer = [k for k in m if k.startswith("spike/firing_rate/") and k.split("/")[-1][:1].isdigit()]
    for k in _ordered(m):
        if k not in per_layer:
            print(f"  {k.ljust(width)}  {_fmt(m[k])}")
    if per_layer:
        print(f"  ({len(per_layer)} per-layer spike/firing_rate/<block>.<role> in the manifest and spikes.json)")
    if manifest.get("energy"):
        print(f"  (cost/energy_*: ASSUMED constants, {manifest['energy']['assumption']})")
    if manifest.get("model_dir"):
        print(f"model: {manifest['model_dir']}  (load: spikellm.load_quantized(path))")
    print(f"results: {path}\n", flush=True)


def print_sweep(rows: list[tuple[list[str], dict]]) -> None:
    keys = [k for k in _ordered(rows[0][1]) if not k.startswith("time/") and k != "cost/ace"]
    head = ["point"] + keys
    table = [[" ".join(ov) or "(defaults)"] + [_fmt(m.get(k, "")) for k in keys] for ov, m in rows]
    widths = [max(len(str(r[i])) for r in [head] + table) for i in range(len(head))]
    print("sweep:")
    for r in [head] + table:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
