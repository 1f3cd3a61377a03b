"""Compose, type-check and validate a run configuration from Hydra overrides.

We use Hydra's compose API and its override grammar (`key=value`, `group=option`, sweeps
`a=1,2`, `range()`, `glob()`), so every error can be reported as one line naming the key.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import DictConfig, OmegaConf

from spikellm.config import QUANT_CONFIGS, SPIKING_CONFIGS, Rotation, unknown_key

from .schema import typed, validate


def register_schemas() -> None:
    """Register the method and spiking dataclasses with Hydra's ConfigStore as `schema_<name>`
    of the `quant` and `spiking` groups; every `conf/quant/*.yaml` and `conf/spiking/*.yaml`
    starts from its schema (`defaults: [schema_<name>, _self_]`), so Hydra rejects a YAML or an
    override key that its dataclass lacks, and type-checks the rest."""
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    for group, table in (("quant", QUANT_CONFIGS), ("spiking", SPIKING_CONFIGS)):
        for name, cls in table.items():
            cs.store(group=group, name=f"schema_{name}", node=cls)
    cs.store(group="rotate", name="schema_rotate", node=Rotation)


register_schemas()

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "quant", "spiking", "rotate", "calib", "eval", "logger", "launcher", "experiment")


class ConfigError(ValueError):
    """A bad override or value; the message is one line that names the key and the fix."""


#: the user's config directories (`--config-dir`/`-cd`, `hydra.searchpath`), searched after
#: conf/ as Hydra does; set once per command by `set_search_path`
_USER_DIRS: list[Path] = []


def parse_search_path(value: str) -> list[Path]:
    """`hydra.searchpath`'s value ([file:///a,/b] or one path) -> existing directories.
    Hydra's pkg:// entries name Python packages: not supported here (one-line error)."""
    items = [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
    dirs = []
    for it in items:
        if it.startswith("pkg://"):
            raise ConfigError(f"hydra.searchpath: {it}: pkg:// entries are not supported; give the "
                              f"directory as file:///path (or --config-dir /path)")
        d = Path(it[len("file://"):] if it.startswith("file://") else it).expanduser().resolve()
        if not d.is_dir():
            raise ConfigError(f"hydra.searchpath / --config-dir: {d} is not a directory; give a folder "
                              f"that holds <group>/<option>.yaml files (e.g. model/mymodel.yaml)")
        dirs.append(d)
    return dirs


def set_search_path(dirs: list[Path]) -> None:
    """Make `dirs` (after conf/) the config search path of every composition in this process."""
    _USER_DIRS[:] = [Path(d) for d in dirs]


def config_dirs() -> list[Path]:
    """conf/ then the user's directories: where group options are looked up, in Hydra's order."""
    return [CONF_DIR, *_USER_DIRS]


def option_file(group: str, option: str) -> Path | None:
    """The YAML an option of a group comes from (the first directory of the search path that has it)."""
    return next((d / group / f"{option}.yaml" for d in config_dirs()
                 if (d / group / f"{option}.yaml").exists()), None)


def group_options(group: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic-sweeper expansion: the cartesian product of every sweep override
    (`a=1,2`, `range(1,4)`, `choice(...)`, and `glob(...)` over a config group's options)."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:  # hydra.errors.OverrideParseException
        raise ConfigError(f"malformed override: {str(e).splitlines()[0]}") from None
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if isinstance(o.value(), Glob):
            group = o.key_or_group
            if group not in GROUPS:
                raise ConfigError(f"{key}: glob() selects config-group options; use it on one of "
                                  f"{', '.join(GROUPS)} (for values write {key}=a,b)")
            chosen = o.value().filter(group_options(group))
            if not chosen:
                raise ConfigError(f"{key}={o.input_line.split('=', 1)[1]} matches no option; "
                                  f"choose from: {', '.join(group_options(group))}")
            axes.append([f"{key}={v}" for v in chosen])
        elif o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def _compose_raw(overrides: list[str]) -> DictConfig:
    """Hydra's composition of conf/config.yaml (with the hydra node), errors as one line."""
    _check_groups(overrides)
    GlobalHydra.instance().clear()
    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in _USER_DIRS)}]"] if _USER_DIRS else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=[*overrides, *search], return_hydra_config=True)
    except Exception as e:
        cause = f"\n{str(e.__cause__)}" if e.__cause__ is not None else ""
        raise ConfigError(_method_key_error(str(e), overrides) or _first_lines(str(e) + cause)) from None


def _first_lines(msg: str) -> str:
    """Hydra's error as one line: its first line, plus the reason where the first only says
    which override failed (e.g. an enum value that is not an option)."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error merging override"):
        return f"{lines[0]}: {lines[1]}"
    return lines[0]


def _chosen(group: str, overrides: list[str], default: str) -> str:
    """The config class name (method or mode) the `group=` option of `overrides` stands for."""
    opt = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(f"{group}=")), default)
    f = option_file(group, opt)
    node = OmegaConf.load(f) if f is not None else {}
    return str(node.get("method" if group == "quant" else "mode", opt))


def _method_key_error(msg: str, overrides: list[str]) -> str | None:
    """Hydra's struct error for a quant/spiking key the chosen method's dataclass lacks, as our
    one line naming the options that have it."""
    import re
    m = re.search(r"override '(quant|spiking)\.(\w+)'", msg) or re.search(
        r"Key '(\w+)' not in '(\w+)'", msg)
    if not m:
        return None
    if m.re.pattern.startswith("override"):
        group, key = m.group(1), m.group(2)
    else:
        key, cls = m.group(1), m.group(2)
        group = next((g for g, tb in (("quant", QUANT_CONFIGS), ("spiking", SPIKING_CONFIGS))
                      if cls in {c.__name__ for c in tb.values()}), None)
        if group is None:
            return None
    table = QUANT_CONFIGS if group == "quant" else SPIKING_CONFIGS
    name = _chosen(group, overrides, {"quant": "gptq", "spiking": "ternary"}[group])
    return unknown_key(table, group, name, [key]) if name in table else None


def recipe_sweep(overrides: list[str]) -> list[str]:
    """Sweep overrides that the composed config declares under `hydra.sweeper.params` (how an
    `experiment=` recipe carries its sweep, as with Hydra's basic sweeper), minus the keys the
    command line sets itself (the command line wins)."""
    cfg = _compose_raw(overrides)
    params = cfg.hydra.sweeper.get("params") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def expand_points(overrides: list[str]) -> list[list[str]]:
    """All points of a `-m` run: the command-line sweep, each point extended by the sweep its
    `experiment=` recipe declares. Order is kept; duplicate points are dropped."""
    points: list[list[str]] = []
    for p in expand_sweep(overrides):
        extra = recipe_sweep(p)
        for q in (expand_sweep(extra + p) if extra else [p]):
            if q not in points:
                points.append(q)
    return points


def compose_sweep(points: list[list[str]]) -> tuple[list[DictConfig], list[list[str]], list[str]]:
    """Compose every point of a `-m` sweep. A point whose override sets a key that its own
    method or spiking option does not have (`-m spiking=none,t2 spiking.select=saliency,random`:
    `none` has no selection) runs without that override, once, and a note says so; in a sweep
    whose points all choose that one option the key is an error, as in a single run.
    Returns (configs, the points as run, notes)."""
    import re
    cfgs, kept, notes = [], [], []
    for p in points:
        q = list(p)
        while True:
            try:
                cfg = compose_config(q)
                break
            except ConfigError as e:
                m = re.match(r"(quant|spiking)\.(\w+) is not a key of (quant|spiking)=(\w+)", str(e))
                ov = m and next((o for o in q if o.split("=", 1)[0].lstrip("+~") == f"{m[1]}.{m[2]}"), None)
                choices = {next((o for o in pt if o.startswith(f"{m[1]}=")), None) for pt in points} if m else ()
                if not ov or len(choices) < 2:
                    raise
                q.remove(ov)
                note = f"{ov} does not apply to {m[3]}={m[4]}: its points run without it"
                if note not in notes:
                    notes.append(note)
        if q not in kept:
            kept.append(q)
            cfgs.append(cfg)
    return cfgs, kept, notes


#: Hydra's own output directories, honoured: hydra.run.dir (a single run's directory) and
#: hydra.sweep.dir (a -m sweep's record; point n's run directory is <hydra.sweep.dir>/<n>)
HYDRA_DIRS = ("hydra.run.dir", "hydra.sweep.dir")
#: Hydra's config search path, honoured (user config directories after conf/)
HYDRA_SEARCHPATH = "hydra.searchpath"


def check_cli_overrides(overrides: list[str], multirun: bool) -> None:
    """One-line errors for the Hydra habits this driver does not honour, instead of accepting
    and ignoring them: deletions (`~key`), `interval()` sweeps, `hydra.*` keys other than the
    output directories, `hydra/launcher=` (our launcher group is `launcher=`), and an output
    directory of the other mode (hydra.run.dir with -m, hydra.sweep.dir without)."""
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.startswith("~"):
            k = key[1:]
            alt = f"{k}=none" if k in ("logger",) else (f"{k}=<option>" if k in GROUPS else f"{k}=<value>")
            raise ConfigError(f"{ov}: deleting a key is not supported (every key of the config is read); "
                              f"set {alt} instead")
        if value.startswith("interval("):
            raise ConfigError(f"{ov}: interval() needs a sampling sweeper (Optuna, Nevergrad), which "
                              f"spikellm does not run; list values ({key}=a,b) or use range(start,stop,step)")
        bare = key.lstrip("+")
        if bare.startswith("hydra/launcher") or bare.startswith("hydra.launcher"):
            sub = bare.split(".", 2)[2] if bare.count(".") >= 2 else "<key>"
            raise ConfigError(f"{ov}: spikellm launches through its own launcher group: use "
                              f"launcher=slurm (or submitit_local, local) and launcher.{sub}=...")
        if bare.startswith("hydra/") or (bare.startswith("hydra.") and bare not in (*HYDRA_DIRS, HYDRA_SEARCHPATH)):
            raise ConfigError(f"{ov}: spikellm reads no hydra settings other than {', '.join(HYDRA_DIRS)} and "
                              f"{HYDRA_SEARCHPATH}; results go under paths.outputs")
        if bare == "hydra.run.dir" and multirun:
            raise ConfigError(f"{ov} names a single run's directory: with -m set hydra.sweep.dir "
                              f"(or paths.outputs)")
        if bare == "hydra.sweep.dir" and not multirun:
            raise ConfigError(f"{ov} names a -m sweep's directory: for a single run set hydra.run.dir "
                              f"(or paths.outputs)")


def output_dirs(overrides: list[str]) -> dict[str, str]:
    """The Hydra output directories the command line sets: {"run": ..., "sweep": ...}."""
    out = {}
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+") in HYDRA_DIRS and value:
            out[key.lstrip("+").split(".")[1]] = value
    return out


def _check_groups(overrides: list[str]) -> None:
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS and value:
            options = group_options(key)
            if value not in options:
                where = " or ".join(f"{d}/{key}/" for d in config_dirs()[1:])
                raise ConfigError(f"{key}={value} is not a known option; choose one of: "
                                  f"{', '.join(options)} (files in conf/{key}/"
                                  + (f" or {where})" if where else "; add your own with --config-dir DIR)"))


#: quant methods whose default spiking is none (the ternary default belongs to GPTQ/RTN)
_NO_DEFAULT_SPIKING = ("omniquant", "pbllm")


def _default_spiking(overrides: list[str]) -> list[str]:
    """`quant=omniquant` or `quant=pbllm` without a `spiking=` choice means `spiking=none`."""
    quant = [o.split("=", 1)[1] for o in overrides if o.startswith("quant=")]
    if quant and quant[-1] in _NO_DEFAULT_SPIKING and not any(o.startswith("spiking=") for o in overrides):
        return [*overrides, "spiking=none"]
    return overrides


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with `overrides`, merge into the typed schema, validate ranges,
    and return the resolved config plus the group choices under `_choices`."""
    overrides = _default_spiking(overrides)
    cfg = _compose_raw(overrides)
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    try:
        merged = typed(OmegaConf.create(with_hydra))
        OmegaConf.resolve(merged)
    except Exception as e:  # omegaconf ValidationError / ConfigKeyError
        key = getattr(e, "full_key", None) or ""
        msg = str(e).strip().splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    if merged.spiking.mode == "gif" and not any(o.startswith("spiking.steps=") for o in overrides):
        merged.spiking.steps = 2 ** merged.spiking.addbit   # GIF steps follow spiking.addbit
    try:
        validate(merged)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    OmegaConf.set_struct(merged, False)
    merged["_choices"] = choices
    merged["_overrides"] = list(overrides)
    return merged


def _as_dict(point: list[str]) -> dict[str, str]:
    return {k.lstrip("+"): v for k, v in (o.split("=", 1) for o in point if "=" in o)}


def varying_keys(points: list[list[str]]) -> list[str]:
    """The override keys whose value differs between a sweep's points (first-seen order)."""
    dicts = [_as_dict(p) for p in points]
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [k for k in keys if len({d.get(k) for d in dicts}) > 1]


def point_values(point: list[str], keys: list[str]) -> dict[str, str]:
    """The values `point` (a list of overrides) sets for `keys`."""
    d = _as_dict(point)
    return {k: d[k] for k in keys if k in d}


#: overrides that say where or how a run is executed and logged, not what it computes: left out
#: of run names (a run directory named after paths.outputs=... helps no one)
NOT_IN_NAME = ("paths.", "progress", "logger", "launcher", "hydra.", "save_model", "name")


def run_name(cfg: DictConfig) -> str:
    """A readable name: the group choices, then the overrides of what the run computes."""
    if cfg.name:
        return str(cfg.name)
    parts = [cfg._choices["model"], cfg._choices["quant"], cfg._choices["spiking"]]
    if cfg._choices.get("rotate") not in (None, "none"):
        parts.append(f"rotate_{cfg._choices['rotate']}")
    if cfg._choices.get("experiment"):
        parts.insert(0, cfg._choices["experiment"])
    extra = [o for o in cfg._overrides if o.split("=")[0] not in GROUPS
             and not o.lstrip("+~").startswith(NOT_IN_NAME)]
    parts += [o.replace("=", "") .replace("/", "_") for o in extra]
    return "-".join(str(p) for p in parts)[:120]


def retype(container: dict) -> DictConfig:
    """A config saved as a plain container (e.g. pickled for a SLURM job) back as a typed one."""
    c = dict(container)
    extras = {k: c.pop(k) for k in ("_choices", "_overrides") if k in c}
    cfg = typed(OmegaConf.create(c))
    OmegaConf.set_struct(cfg, False)
    for k, v in extras.items():
        cfg[k] = v
    return cfg
