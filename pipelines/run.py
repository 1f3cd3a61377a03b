"""`python -m pipelines.run [overrides] [-m]`: quantize, evaluate, write a manifest, print a table.

Overrides use Hydra's grammar (`quant=rtn quant.wbits=3 spiking.ratio=0.1`); `-m` expands
sweeps (`spiking.ratio=0,0.1,0.2`) and runs every point. Hydra's flags (`--help`, `--cfg`,
`--info`, `--config-dir`, `--shell-completion`, ...) are in `pipelines.cli`. Bad input exits 2
with one line naming the key.
"""
from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf

from spikellm.data import DataError

from .artifacts import StoreIOError
from .cli import completion_query, completion_script, help_text, info, parse_flags, print_cfg, shadowed_options
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, argv = parse_flags(argv)
        if flags.completion:
            script = completion_script(flags.completion)        # validates the request
            print(completion_query() if flags.completion.startswith("query=") else script)
            return 0
        if flags.help:
            print(help_text())
            return 0
        for path in shadowed_options():
            print(f"[spikellm] note: {path} has the name of an option in conf/, which wins (as in Hydra): "
                  f"rename it to use it", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg_kind, package, resolve = flags.cfg, flags.package, flags.resolve
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = cfg_kind is not None or flags.info is not None
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
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
            if flags.info is not None:
                print(info(flags.info, cfgs[0]))
            else:
                print_cfg(cfgs, cfg_kind, resolve, package)
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
