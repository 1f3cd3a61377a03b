"""`python -m pipelines.run [overrides] [-m]`: quantize, evaluate, write a manifest, print a table.

Overrides use Hydra's grammar (`quant=rtn quant.wbits=3 spiking.ratio=0.1`); `-m` expands
sweeps (`spiking.ratio=0,0.1,0.2`) and runs every point. `--cfg` prints the composed
config and exits (`--cfg job|hydra|all`, `--resolve`, `--package KEY`, as Hydra's); `--help`
lists the config groups. Bad input exits 2 with one line naming the key.
"""
from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf

from spikellm.data import DataError

from .artifacts import StoreIOError
from .config import (HYDRA_DIRS, ConfigError, check_cli_overrides, compose_config, compose_sweep,
                     expand_points, expand_sweep, output_dirs, recipe_sweep)
from .schema import PreflightError, preflight
from .sweep import print_sweep, run_sweep

def _sigterm_as_interrupt() -> None:
    """SIGTERM (scancel, a time limit, kill) stops a stage like Ctrl-C does: one line, state
    `interrupted`, block checkpoints kept."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:            # not the main thread (e.g. called from a test harness)
        pass


def _check_output_dirs(dirs: dict[str, str]) -> None:
    """hydra.run.dir / hydra.sweep.dir must not hold an earlier run's record (it would be mixed
    with this one's or overwritten)."""
    from pathlib import Path
    for kind, marker in (("run", "manifest.json"), ("sweep", "plan.json")):
        d = dirs.get(kind)
        if d and (Path(d) / marker).exists():
            raise ConfigError(f"hydra.{kind}.dir={d} already holds a {kind} record ({marker}): choose a "
                              f"new directory (cached stages are reused from paths.outputs either way)")


HELP = """spikellm: post-training spiking LLMs (SpikeLLM) as cached, SLURM-launched experiments.

usage: python -m pipelines.run [overrides] [-m] [--cfg job|hydra|all] [--resolve] [--package KEY]
       python -m pipelines.run --help

  overrides   Hydra's grammar: group=option (quant=omniquant), key=value (spiking.ratio=0.1),
              sweeps with -m (spiking.ratio=0,0.1,0.2, range(2,5), glob(*)), +key=value to add
  -m          run every point of the sweep (one DAG: shared stages run once)
  --cfg, -c   print the composed config and exit: job (the run's keys, default), hydra (Hydra's
              node), all; --resolve resolves interpolations, --package KEY prints that key only
  hydra.run.dir=D / hydra.sweep.dir=D   a run's / a -m sweep's directory (default under paths.outputs)

Config groups (conf/<group>/<option>.yaml):
{groups}

Examples:
  python -m pipelines.run                                   # the main job: GPTQ W4 + ternary spiking
  python -m pipelines.run quant=omniquant quant.wbits=4 quant.abits=4 spiking=t2
  python -m pipelines.run -m spiking.ratio=0,0.1,0.2 spiking.select=saliency,random
  python -m pipelines.run model=llama2_70b quant=gptq dry_run=true
Status and control: python -m pipelines.status --latest, python -m pipelines.cancel --latest
"""


def _help() -> str:
    from .config import GROUPS, group_options
    return HELP.format(groups="\n".join(f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS))


def _flag_value(argv: list[str], names: tuple[str, ...], default: str | None, choices=None) -> tuple[str | None, list[str]]:
    """(value of the first flag in `names` or `default` when given bare, argv without it)."""
    out, value = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in names:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and (choices is None or nxt in choices) and "=" not in nxt and not nxt.startswith("-"):
                value, i = nxt, i + 2
                continue
            if default is None:
                raise ConfigError(f"{a} needs a value")
            value, i = default, i + 1
            continue
        out.append(a)
        i += 1
    return value, out


def _print_cfg(cfgs, which: str, resolve: bool, package: str | None, overrides: list[str]) -> None:
    from .config import _compose_raw
    for c in cfgs:
        node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(c).items() if not k.startswith("_")})
        if which in ("hydra", "all"):
            hydra = OmegaConf.create({"hydra": OmegaConf.to_container(_compose_raw(c._overrides).hydra)})
            node = hydra if which == "hydra" else OmegaConf.merge(node, hydra)
        if package:
            sel = OmegaConf.select(node, package)
            if sel is None:
                raise ConfigError(f"--package {package}: no such key in the composed config")
            node = sel if OmegaConf.is_config(sel) else OmegaConf.create({package: sel})
        print(OmegaConf.to_yaml(node, resolve=resolve))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv):
        print(_help())
        return 0
    try:
        cfg_kind, argv = _flag_value(argv, ("--cfg", "-c"), "job", ("job", "hydra", "all"))
        package, argv = _flag_value(argv, ("--package", "-p"), None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolve = "--resolve" in argv
    unknown = [a for a in argv if a.startswith("--") and a not in ("--multirun", "--resolve")]
    if unknown:
        print(f"error: {unknown[0]} is not an option of this driver (--help lists them; Hydra's "
              f"--info, --shell-completion and --config-dir are not supported yet)", file=sys.stderr)
        return 2
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = cfg_kind is not None
    overrides = [a for a in argv if a not in ("-m", "--multirun", "--resolve")]
    try:
        check_cli_overrides(overrides, multirun)
        dirs = output_dirs(overrides)          # Hydra's output directories: not config keys
        overrides = [o for o in overrides if o.partition("=")[0].lstrip("+") not in HYDRA_DIRS]
        _check_output_dirs(dirs)
        points = expand_points(overrides) if multirun else [overrides]
        if not multirun and len(expand_sweep(overrides)) > 1:
            raise ConfigError("an override sweeps several values (a=1,2): add -m to run a sweep")
        if not multirun and recipe_sweep(overrides):
            print(f"[spikellm] note: this recipe declares a sweep ({' '.join(recipe_sweep(overrides))}); "
                  "running its default point only, add -m to run the sweep", file=sys.stderr)
        if multirun:                                 # every point validated before any work
            cfgs, points, notes = compose_sweep(points)
            for n in notes:
                print(f"[spikellm] note: {n}", file=sys.stderr)
        else:
            cfgs = [compose_config(p) for p in points]
        if cfgs[0].dry_run:
            from .dryrun import PlanError, dry_run
            try:
                return dry_run(cfgs)
            except PlanError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        if not show_cfg:
            for c in cfgs:
                preflight(c)
    except (ConfigError, FileNotFoundError, DataError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show_cfg:
        try:
            _print_cfg(cfgs, cfg_kind, resolve, package, overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    _sigterm_as_interrupt()
    try:
        manifests, ok = run_sweep(cfgs, points, dirs)
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreIOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from .execute import Interrupted
        sig = str(e) or "SIGINT"
        where = f"in {e.node_id} " if isinstance(e, Interrupted) else ""
        print(f"interrupted by {sig} {where}(marked interrupted; finished stages and committed "
              f"blocks are kept): run the same command again to resume", file=sys.stderr)
        return 143 if sig == "SIGTERM" else 130
    if multirun and len(manifests) > 1:
        print_sweep([(json.loads(m.read_text())["overrides"], json.loads(m.read_text())["metrics"])
                     for m in manifests])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
