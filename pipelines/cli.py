"""The command-line flags of `python -m pipelines.run`, behaving as Hydra's do.

`--help`, `--cfg job|hydra|all` (`-c`), `--resolve`, `--package` (`-p`), `--info`,
`--shell-completion` (`-sc`), `--config-dir` (`-cd`) and `hydra.searchpath`. `parse_flags`
takes them off the command line; what remains are overrides and `-m`.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf

from .config import (GROUPS, HYDRA_SEARCHPATH, ConfigError, _compose_raw, config_dirs, group_options,
                     option_file, parse_search_path, set_search_path)

HELP = """spikellm: post-training spiking LLMs (SpikeLLM) as cached, SLURM-launched experiments.

usage: python -m pipelines.run [overrides] [-m] [--cfg job|hydra|all] [--resolve] [--package KEY]
       python -m pipelines.run --help | --info [all|config|defaults|searchpath|plugins]
       eval "$(python -m pipelines.run -sc install=bash)"        (also zsh)

  overrides   Hydra's grammar: group=option (quant=omniquant), key=value (spiking.ratio=0.1),
              sweeps with -m (spiking.ratio=0,0.1,0.2, range(2,5), glob(*)), +key=value to add
  -m          run every point of the sweep (one DAG: shared stages run once)
  --cfg, -c   print the composed config and exit: job (the run's keys, default), hydra (Hydra's
              node), all; --resolve resolves interpolations, --package KEY prints that key only
  --info      print the config search path, the chosen options and their files, the launchers
  --config-dir, -cd DIR   also look for options in DIR (DIR/model/mymodel.yaml: model=mymodel);
              the same as hydra.searchpath=[file:///abs/DIR]; conf/ wins on a name clash
  --shell-completion, -sc install=bash|zsh   print a completion script (uninstall=... removes it)
  hydra.run.dir=D / hydra.sweep.dir=D   a run's / a -m sweep's directory (default under paths.outputs)

Config groups (conf/<group>/<option>.yaml):
{groups}

Examples:
  python -m pipelines.run                                   # the main job: GPTQ W4 + ternary spiking
  python -m pipelines.run quant=omniquant quant.wbits=4 quant.abits=4 spiking=t2
  python -m pipelines.run -m spiking.ratio=0,0.1,0.2 spiking.select=saliency,random
  python -m pipelines.run model=llama2_70b quant=gptq dry_run=true
  python -m pipelines.run -cd ~/my_conf model=mymodel      # ~/my_conf/model/mymodel.yaml
Status and control: python -m pipelines.status --latest, python -m pipelines.cancel --latest
"""

INFO_KINDS = ("all", "config", "defaults", "searchpath", "plugins")
SHELLS = ("bash", "zsh")
#: every flag this driver takes (for the unknown-flag error and for completion)
FLAGS = ("--help", "--cfg", "--resolve", "--package", "--info", "--config-dir",
         "--shell-completion", "--multirun", "-m", "-c", "-p", "-cd", "-sc")


def help_text() -> str:
    return HELP.format(groups="\n".join(f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS))


def flag_value(argv: list[str], names: tuple[str, ...], default: str | None,
               choices=None) -> tuple[str | None, list[str]]:
    """(value of the first flag in `names`, or `default` when it is given bare; argv without it).
    A flag given with no value and no default is an error."""
    out, value = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in names:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            takes = nxt is not None and not nxt.startswith("-") and (
                nxt in choices if choices is not None else "=" not in nxt or names[0] == "--shell-completion")
            if takes:
                value, i = nxt, i + 2
                continue
            if default is None:
                raise ConfigError(f"{a} needs a value" + (f" (one of: {', '.join(choices)})" if choices else ""))
            value, i = default, i + 1
            continue
        out.append(a)
        i += 1
    return value, out


@dataclass
class Flags:
    """What the command line asked for besides overrides."""
    cfg: str | None = None           #: --cfg job|hydra|all
    resolve: bool = False
    package: str | None = None
    info: str | None = None          #: --info <kind>
    completion: str | None = None    #: --shell-completion install=bash | query=bash | ...
    help: bool = False


def parse_flags(argv: list[str]) -> tuple[Flags, list[str]]:
    """Take the flags off `argv`; apply --config-dir / hydra.searchpath to this process's search
    path. Returns (flags, the overrides plus -m). ConfigError: one line."""
    f = Flags(help=any(a in ("--help", "-h") for a in argv))
    argv = [a for a in argv if a not in ("--help", "-h")]
    f.cfg, argv = flag_value(argv, ("--cfg", "-c"), "job", ("job", "hydra", "all"))
    f.package, argv = flag_value(argv, ("--package", "-p"), None)
    f.info, argv = flag_value(argv, ("--info",), "all", INFO_KINDS)
    f.completion, argv = flag_value(argv, ("--shell-completion", "-sc"), None)
    dirs = []
    while any(a in ("--config-dir", "-cd") for a in argv):
        d, argv = flag_value(argv, ("--config-dir", "-cd"), None)
        dirs += parse_search_path(d)
    f.resolve = "--resolve" in argv
    argv = [a for a in argv if a != "--resolve"]
    unknown = [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not an option of this driver (--help lists them)")
    rest = []
    for a in argv:
        if a.partition("=")[0].lstrip("+") == HYDRA_SEARCHPATH:
            dirs += parse_search_path(a.partition("=")[2])
        else:
            rest.append(a)
    set_search_path(dirs)
    return f, rest


def shadowed_options() -> list[str]:
    """Options a user directory defines that conf/ defines too (conf/'s wins, as in Hydra)."""
    conf, *users = config_dirs()
    return [f"{u / g / (p.stem + '.yaml')}" for u in users for g in GROUPS
            for p in sorted((u / g).glob("*.yaml")) if (conf / g / p.name).exists()]


def print_cfg(cfgs, which: str, resolve: bool, package: str | None) -> None:
    """`--cfg`: each point's composed config (job keys, Hydra's node, or both), YAML."""
    for i, c in enumerate(cfgs):
        node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(c).items() if not k.startswith("_")})
        if which in ("hydra", "all"):
            hydra = OmegaConf.create({"hydra": OmegaConf.to_container(_compose_raw(c._overrides).hydra)})
            for key in ("id", "num"):        # set per job, as Hydra's basic launcher does (point i),
                if OmegaConf.is_missing(hydra.hydra.job, key):      # so that --resolve resolves
                    hydra.hydra.job[key] = i                        # hydra.sweep.subdir
            node = hydra if which == "hydra" else OmegaConf.merge(node, hydra)
        if package:
            sel = OmegaConf.select(node, package)
            if sel is None:
                raise ConfigError(f"--package {package}: no such key in the composed config")
            node = sel if OmegaConf.is_config(sel) else OmegaConf.create({package: sel})
        print(OmegaConf.to_yaml(_resolved(node) if resolve else node))


def _resolved(node):
    """`node` with every interpolation resolved that can be before a run; one that needs a
    run-time value (hydra.runtime.output_dir: the run directory) stays as written."""
    try:
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    except Exception:           # some value is known only at run time: resolve node by node
        pass

    def walk(n):
        if n._is_interpolation():
            try:
                n = n._maybe_dereference_node(throw_on_resolution_failure=True)
            except Exception:                   # missing at compose time: keep the expression
                return n._value()
        if OmegaConf.is_dict(n):
            return {k: walk(n._get_node(k)) for k in n.keys()}
        if OmegaConf.is_list(n):
            return [walk(n._get_node(i)) for i in range(len(n))]
        return n._value()
    return OmegaConf.create(walk(node))


def info(kind: str, cfg) -> str:
    """`--info`: Hydra's sections for this driver: the config search path, the defaults (chosen
    option of each group and its file), the composed config, and the plugins (launchers, sweeper,
    loggers)."""
    from .launch import slurm_status
    out = []
    raw = _compose_raw(cfg._overrides)
    if kind in ("all", "searchpath"):
        out.append("Config search path")
        for s in raw.hydra.runtime.config_sources:
            out.append(f"  provider={s.provider}, path={s.schema}://{s.path}")
    if kind in ("all", "defaults"):
        out.append("Defaults (group: option -> file)")
        for g in GROUPS:
            opt = cfg._choices.get(g)
            if opt:
                out.append(f"  {g}: {opt} -> {option_file(g, opt)}")
    if kind in ("all", "plugins"):
        st = slurm_status()
        out += ["Plugins",
                "  sweeper: spikellm's DAG planner (Hydra's basic-sweeper grammar: a=1,2, range(), glob())",
                f"  launcher: local (in this process); slurm via submitit ({'a controller answers' if st is None else st})",
                "  logger: wandb (online/offline), none"]
    if kind in ("all", "config"):
        out.append("Config")
        node = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_")}
        out.append(OmegaConf.to_yaml(node).rstrip())
    return "\n".join(out)


# --- shell completion -------------------------------------------------------------------------

_BASH = """# spikellm completion for python -m pipelines.run ({shell})
_spikellm_pipelines_run() {{
    if [[ "$COMP_LINE" == *"pipelines.run"* ]]; then
        local IFS=$'\\n'
        COMPREPLY=( $(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" {python} -m pipelines.run -sc query={shell} 2>/dev/null) )
    fi
}}
COMP_WORDBREAKS=${{COMP_WORDBREAKS//=}}   # complete key=value as one word, as Hydra's script does
complete -o nospace -o default -F _spikellm_pipelines_run python python3 {python}
"""


def completion_script(request: str) -> str:
    """`-sc install=bash|zsh` -> the script to eval; `uninstall=...` -> the lines that remove it."""
    action, _, shell = request.partition("=")
    if shell not in SHELLS or action not in ("install", "uninstall", "query"):
        raise ConfigError(f"--shell-completion {request}: use install=bash, install=zsh or uninstall=<shell> "
                          f"(fish is not supported)")
    python = shlex.quote(sys.executable)
    if action == "uninstall":
        return f"complete -r python python3 {python} 2>/dev/null; unset -f _spikellm_pipelines_run"
    script = _BASH.format(shell=shell, python=python)
    return ("autoload -Uz bashcompinit && bashcompinit\n" + script) if shell == "zsh" else script


def _keys(node, prefix: str) -> list[str]:
    out = []
    for k, v in node.items():
        out.append(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}=")
    return out


def complete(line: str) -> list[str]:
    """Candidates for the last word of `line` (a command line up to the cursor): flags, groups
    (`quant=`), their options (`quant=gptq`), and dotted keys of the config the earlier words
    compose (`quant.wbits=` after `quant=gptq`)."""
    words = shlex.split(line) if line.strip() else []
    partial = "" if not words or line.endswith(" ") else words[-1]
    before = words[: len(words) - (1 if partial else 0)]
    if "pipelines.run" in before:
        before = before[before.index("pipelines.run") + 1:]
    if partial.startswith("-"):
        return [f for f in FLAGS if f.startswith(partial)]
    key, eq, value = partial.partition("=")
    if eq:
        if key.lstrip("+") in GROUPS:
            return [f"{key}={o}" for o in group_options(key.lstrip("+")) if o.startswith(value)]
        return [f"{key}={v}" for v in ("true", "false") if v.startswith(value)] if value in ("", "t", "f") else []
    overrides = [w for w in before if "=" in w and not w.startswith("-")]
    try:
        from .config import compose_config
        cfg = compose_config(overrides)
    except Exception:               # an unfinished command line: complete against the defaults
        from .config import compose_config
        cfg = compose_config([])
    tree = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_")}
    if "." in partial:
        head = partial.rsplit(".", 1)[0]
        node = OmegaConf.select(OmegaConf.create(tree), head)
        cands = _keys(OmegaConf.to_container(node), head + ".") if OmegaConf.is_dict(node) else []
    else:
        cands = [f"{g}=" for g in GROUPS] + _keys(tree, "")
    return [c for c in cands if c.startswith(partial)]


def completion_query() -> str:
    """The answer to the installed script's callback (COMP_LINE / COMP_POINT from the shell)."""
    line = os.environ.get("COMP_LINE", "")
    point = int(os.environ.get("COMP_POINT", len(line)))
    return "\n".join(complete(line[:point]))
