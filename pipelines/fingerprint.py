"""What a stage's output depends on besides its config: file contents, the model checkpoint, the
code and the libraries. Each becomes part of the stage key (`pipelines.dag`), so a changed data
file, checkpoint, source file or torch/transformers version can never return an old artifact.

- `file_digest(path)`: SHA-256 of a file's bytes, remembered by (real path, size, mtime, inode,
  ctime) in
  `<cache>/digests.json`, so a large file (a 70B shard, C4) is read once, not on every plan.
- `model_identity(cfg)`: a local checkpoint's content (its config, tokenizer and weight files),
  or a hub id with the revision the local HF cache resolves `main` to.
- `code_digest()`: SHA-256 of the source of every project module the stages import (the import
  closure of `pipelines.stages`, found by reading the files' imports), so editing the method's
  code changes every key, and editing the README or a test does not.
- `library_versions()`: torch and transformers (and lm-eval for zero-shot stages).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import threading
from pathlib import Path

from spikellm.embedded import cache_root, sha256_file

_LOCK = threading.Lock()
_MEMO: dict[str, dict] | None = None
#: project packages whose sources make up the code digest
_PACKAGES = ("spikellm", "pipelines")
#: store infrastructure the stages import but whose code computes no stage output (its edits
#: must not invalidate every artifact): locking, checksums, hashing
_NOT_OUTPUT = ("pipelines.artifacts", "pipelines.locks", "pipelines.fingerprint", "pipelines.store")
_ROOT = Path(__file__).resolve().parent.parent


def _digest_cache_file() -> Path:
    return cache_root() / "digests.json"


def _load_memo() -> dict[str, dict]:
    global _MEMO
    if _MEMO is None:
        try:
            _MEMO = json.loads(_digest_cache_file().read_text())
        except (OSError, ValueError):
            _MEMO = {}
    return _MEMO


def _save_memo() -> None:
    path = _digest_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_MEMO))
        os.replace(tmp, path)
    except OSError:                      # a read-only cache only costs re-hashing next time
        pass


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes; cached by (real path, size, mtime, inode, ctime)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    with _LOCK:
        memo = _load_memo()
        hit = memo.get(str(p))
        if hit and hit.get("stamp") == stamp:
            return hit["sha256"]
    digest = sha256_file(p)
    with _LOCK:
        memo = _load_memo()
        memo[str(p)] = {"stamp": stamp, "sha256": digest}
        _save_memo()
    return digest


#: files of a local checkpoint directory that decide what it computes
_MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.txt")


def checkpoint_fingerprint(directory: str | os.PathLike) -> dict[str, str]:
    """{file name: SHA-256} of a local checkpoint's config, tokenizer and weights."""
    d = Path(directory)
    names = sorted({p.name for pat in _MODEL_FILES for p in d.glob(pat) if p.is_file()})
    return {n: file_digest(d / n) for n in names}


def _hub_revision(hub_id: str) -> str | None:
    """The commit the local HF cache resolves `main` of `hub_id` to, if it has it."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return None


def model_identity(cfg) -> dict:
    """What identifies the weights and tokenizer a stage loads (not the path they are at)."""
    if cfg.paths.cache:            # where the stages will look for the embedded model
        os.environ.setdefault("SPIKELLM_CACHE", str(Path(cfg.paths.cache).expanduser()))
    return _model_identity(cfg.model.path, cfg.model.hub_id, cfg.model.name)


@functools.lru_cache(maxsize=None)
def _model_identity(path: str | None, hub_id: str | None, name: str) -> dict:
    from spikellm.embedded import CHECKPOINT_NAME
    from spikellm.models import resolve_source
    converted = cache_root() / CHECKPOINT_NAME
    if path == "embedded" and (converted / "model.safetensors").exists():
        source = str(converted)        # its SHA-256 stamp is checked when a stage loads it
    else:
        source = resolve_source(path, hub_id, f"model={name}")
    if Path(source).is_dir():
        return {"checkpoint": checkpoint_fingerprint(source)}
    return {"hub_id": source, "revision": _hub_revision(source) or "unresolved (not in the HF cache yet)"}


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported by the source file of `module` (absolute and relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)   # `from pkg import module`
    return {m for m in found if m.split(".")[0] in _PACKAGES}


def _source_of(module: str) -> Path | None:
    base = _ROOT.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=None)
def code_files(root: str = "pipelines.stages") -> tuple[Path, ...]:
    """The source files of `root` and every project module it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [root]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _source_of(mod)
        if path is None or mod in _NOT_OUTPUT:
            continue
        seen[mod] = path
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))   # parent packages run too
        todo.extend(_imports(path, mod))
    return tuple(sorted(set(seen.values())))


@functools.lru_cache(maxsize=None)
def code_digest(root: str = "pipelines.stages") -> str:
    """SHA-256 over the sources of `code_files(root)` (relative path + bytes)."""
    h = hashlib.sha256()
    for p in code_files(root):
        h.update(p.relative_to(_ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def library_versions(zero_shot: bool = False) -> dict[str, str]:
    """Installed versions (package metadata: no import needed) of the libraries stages run on."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("torch", "transformers", *(("lm_eval",) if zero_shot else ())):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out
