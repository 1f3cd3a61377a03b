"""`python -m pipelines.run [overrides] [-m]`: quantize, evaluate, write a manifest, print a table.

Overrides use Hydra's grammar (`quant=rtn quant.wbits=3 spiking.ratio=0.1`); `-m` expands
sweeps (`spiking.ratio=0,0.1,0.2`) and runs every point. `--cfg` prints the composed
config and exits. Bad input exits 2 with one line naming the key.
"""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError, compose_config, expand_sweep, run_name
from .store import write_json

METRIC_ORDER = ("ppl/fp/", "ppl/", "cost/avg_steps", "cost/ace", "cost/", "time/", "mem/")


def _versions() -> dict:
    import torch
    import transformers

    import spikellm
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "spikellm": getattr(spikellm, "__version__", "0.1.0")}
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def run_point(cfg) -> Path:
    """Run one configuration end to end; returns the manifest path."""
    from spikellm.blockwise import peak_memory_gb

    from . import stages

    t_all = time.time()
    name = run_name(cfg)
    stamp = _dt.datetime.now()
    run_dir = Path(cfg.paths.outputs) / "runs" / stamp.strftime("%Y-%m-%d") / \
        f"{stamp.strftime('%H-%M-%S-%f')[:-3]}_{name}"
    timings, metrics = {}, {}
    device = stages.resolve_device(cfg.device)

    t0 = time.time()
    lm = stages.load(cfg)
    timings["load_s"] = time.time() - t0
    t0 = time.time()
    calib = stages.calibrate(cfg, lm)
    timings["calibrate_s"] = time.time() - t0
    if cfg.eval.fp_baseline:
        t0 = time.time()
        metrics.update(stages.fp_perplexity(cfg, lm, device))
        timings["eval_fp_s"] = time.time() - t0
    stages.say(f"quantizing {cfg.model.name}: quant={cfg._choices['quant']} "
               f"(wbits={cfg.quant.wbits}) spiking={cfg.spiking.mode} on "
               f"{calib.shape[0]} x {calib.shape[1]} calibration tokens")
    report = stages.run_quantize(cfg, lm, calib, device)
    metrics["time/quantize_s"] = report.seconds
    t0 = time.time()
    metrics.update(stages.evaluate_ppl(cfg, lm, device, "quant"))
    timings["eval_s"] = time.time() - t0
    metrics.update({f"cost/{k}": v for k, v in report.cost.items()})
    metrics["mem/peak_gb"] = peak_memory_gb(device)
    timings["total_s"] = time.time() - t_all
    if cfg.save_model:
        lm.model.save_pretrained(run_dir / "model")
        lm.tokenizer.save_pretrained(run_dir / "model")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices, overrides = resolved.pop("_choices"), resolved.pop("_overrides")
    manifest = {
        "name": name, "created": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["python -m pipelines.run", *overrides]),
        "choices": choices, "overrides": overrides, "config": resolved,
        "versions": _versions(), "timings": timings, "metrics": metrics,
        "calibration": {"dataset": cfg.calib.dataset, "split": cfg.calib.split,
                        "windows": list(calib.shape), "seed": cfg.calib.seed},
        "notes": report.notes,
    }
    write_json(run_dir / "module_stats.json", [r.row() for r in report.stats])
    write_json(run_dir / "manifest.json", manifest)
    print_table(manifest, run_dir / "manifest.json")
    return run_dir / "manifest.json"


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
    spiking = "none" if sp["mode"] == "none" else \
        f"{sp['mode']} ({sp['ratio']:.0%} of columns x {sp['steps']} steps, {sp['select']})"
    print(f"\nspikellm  model={cfg['model']['name']}  quant={manifest['choices']['quant']} "
          f"(wbits={cfg['quant']['wbits']}, group={cfg['quant']['group_size'] or 'per-channel'})  "
          f"spiking={spiking}")
    m = manifest["metrics"]
    width = max(len(k) for k in m)
    print(f"  {'metric'.ljust(width)}  value")
    for k in _ordered(m):
        print(f"  {k.ljust(width)}  {_fmt(m[k])}")
    print(f"results: {path}\n", flush=True)


def print_sweep(rows: list[tuple[list[str], dict]]) -> None:
    keys = [k for k in _ordered(rows[0][1]) if not k.startswith("time/") and k != "cost/ace"]
    head = ["point"] + keys
    table = [[" ".join(ov) or "(defaults)"] + [_fmt(m.get(k, "")) for k in keys] for ov, m in rows]
    widths = [max(len(str(r[i])) for r in [head] + table) for i in range(len(head))]
    print("sweep:")
    for r in [head] + table:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("-m", "--multirun", "--cfg")]
    try:
        points = expand_sweep(overrides) if multirun else [overrides]
        if not multirun and len(expand_sweep(overrides)) > 1:
            raise ConfigError("an override sweeps several values (a=1,2): add -m to run a sweep")
        cfgs = [compose_config(p) for p in points]   # every point validated before any work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show_cfg:
        for c in cfgs:
            print(OmegaConf.to_yaml(c))
        return 0
    rows = []
    for pt, cfg in zip(points, cfgs):
        try:
            manifest = run_point(cfg)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            from spikellm.data import DataError
            if isinstance(e, (FileNotFoundError, DataError)) or "device=" in str(e):
                print(f"error: {e}", file=sys.stderr)
                return 2
            raise
        import json
        rows.append((pt, json.loads(manifest.read_text())["metrics"]))
    if multirun and len(rows) > 1:
        print_sweep(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
