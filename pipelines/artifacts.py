"""Content-keyed stage artifacts: directories committed atomically with a checksummed manifest.

An artifact lives at `<root>/<stage>/<key>/`. It is built in a temporary directory beside it
and renamed into place only when complete, under a lock file that works across hosts
(`pipelines.locks`), so two processes asking for the same key compute it once and a killed
writer never leaves a half-written artifact behind. Every file, `metrics.json` included, is
listed in `manifest.json` with its SHA-256, and `manifest.sha256` covers the manifest itself.

On every lookup all of it is checked. A missing file, a checksum mismatch or an unreadable
manifest is corruption: said in one line, the artifact is moved aside (`.corrupt-*`) and
rebuilt. Any other I/O error (a transient NFS fault) is retried, then fails the stage with the
path; a good artifact is never discarded for it. An artifact whose recorded upstream content
differs from the upstream artifact now in the store is stale and rebuilt the same way.
`python -m pipelines.gc` removes what is left aside.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spikellm.blockwise import fsync_dir
from spikellm.embedded import sha256_file

from .locks import FileLock

MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
METRICS = "metrics.json"
#: retries of an I/O error that is not corruption (e.g. an NFS hiccup), with these waits
IO_RETRY_S = (0.5, 2.0, 5.0)

file_sha256 = sha256_file


def _say(msg: str) -> None:
    print(f"[spikellm] {msg}", file=sys.stderr, flush=True)


class StoreIOError(OSError):
    """Reading an artifact failed for a reason other than corruption, after retries."""


class Corrupt(Exception):
    """An artifact's content does not match its manifest (the reason is the message)."""


@dataclass
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict
    digest: str = ""          # `content_digest` of its files: what downstream artifacts record

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        return self.path / name


def content_digest(files: dict[str, str]) -> str:
    """One hash of an artifact's content: its files' SHA-256 map, less `metrics.json` (which holds
    timings), so an identical rebuild leaves its dependents valid."""
    content = {k: v for k, v in files.items() if k != METRICS}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


class ArtifactStore:
    """Artifacts under `root` (e.g. `outputs/cache`)."""

    def __init__(self, root: str | os.PathLike, lock_timeout_s: float | None = 86400.0,
                 lock_stale_s: float = 600.0):
        self.root = Path(root)
        self.lock_timeout_s, self.lock_stale_s = lock_timeout_s, lock_stale_s

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        return FileLock(self.root / stage / ".locks" / f"{key}.lock", self.lock_timeout_s,
                        self.lock_stale_s, say=_say)

    def _check(self, path: Path) -> tuple[dict, str]:
        """(manifest, its digest) if intact; raises Corrupt (with why) or OSError."""
        try:
            raw = (path / MANIFEST).read_bytes()
            want = (path / MANIFEST_SUM).read_text().split()[0]
        except FileNotFoundError as e:
            raise Corrupt(f"{Path(e.filename).name} is missing") from None
        except (IndexError, UnicodeDecodeError):
            raise Corrupt(f"{MANIFEST_SUM} is empty or garbled") from None
        if hashlib.sha256(raw).hexdigest() != want:
            raise Corrupt(f"{MANIFEST} does not match {MANIFEST_SUM} (edited or truncated)")
        try:
            manifest = json.loads(raw)
            files = dict(manifest["files"])
        except (ValueError, KeyError, TypeError):
            raise Corrupt(f"{MANIFEST} is not a manifest") from None
        digest = content_digest(files)
        for name, sha in files.items():
            try:
                ok = file_sha256(path / name) == sha
            except FileNotFoundError:
                raise Corrupt(f"{name} is missing") from None
            if not ok:
                raise Corrupt(f"{name} does not match its checksum")
        return manifest, digest

    def verify(self, path: Path) -> dict | None:
        """The manifest if every listed file exists with its checksum, None if corrupt; other
        I/O errors are retried, then raised as StoreIOError naming the path."""
        try:
            return self._verify(path)[0]
        except Corrupt:
            return None

    def _verify(self, path: Path) -> tuple[dict, str]:
        for wait in (*IO_RETRY_S, None):
            try:
                return self._check(path)
            except Corrupt:
                raise
            except OSError as e:
                if wait is None:
                    raise StoreIOError(f"cannot read artifact {path}: {e.strerror or e} "
                                       f"(retried {len(IO_RETRY_S)} times; not treated as "
                                       f"corruption, nothing was moved)") from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _set_aside(self, stage: str, key: str, kind: str, why: str) -> None:
        path = self.path(stage, key)
        aside = path.with_name(f".{kind}-{key}-{int(time.time() * 1000)}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return
        _say(f"cache: {stage}/{key} is {kind} ({why}); moved aside to {aside.name}, recomputing")

    def get(self, stage: str, key: str, upstream: dict[str, str] | None = None) -> Artifact | None:
        """A committed, intact artifact, or None. A corrupted one (or, with `upstream` = {role:
        upstream digest}, one built from other upstream content) is moved aside."""
        path = self.path(stage, key)
        if not path.exists():
            return None
        try:
            manifest, digest = self._verify(path)
        except Corrupt as e:
            self._set_aside(stage, key, "corrupt", str(e))
            return None
        if upstream is not None:
            built_from = manifest.get("upstream_digests", {})
            changed = sorted(r for r, d in upstream.items() if built_from.get(r) != d)
            if changed:
                self._set_aside(stage, key, "stale", f"its upstream {', '.join(changed)} "
                                f"changed since it was built")
                return None
        return Artifact(stage, key, path, manifest, digest)

    def build(self, stage: str, key: str, fn: Callable[[Path], dict], record: dict[str, Any],
              upstream: dict[str, str] | None = None) -> tuple[Artifact, bool]:
        """Return (artifact, built_now). `fn(tmpdir)` writes the files and returns metrics;
        `record` (config, upstream keys, versions, ...) goes into the manifest; `upstream`
        ({role: digest}) is recorded and checked on later lookups."""
        hit = self.get(stage, key, upstream)
        if hit is not None:
            return hit, False
        with self.lock(stage, key):
            hit = self.get(stage, key, upstream)    # someone else built it while we waited
            if hit is not None:
                return hit, False
            final = self.path(stage, key)
            tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            t0 = time.time()
            try:
                metrics = fn(tmp) or {}
                (tmp / METRICS).write_text(json.dumps(metrics, indent=1, default=str) + "\n")
                files = {p.relative_to(tmp).as_posix(): file_sha256(p)
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"stage": stage, "key": key, **record,
                            "upstream_digests": dict(upstream or {}),
                            "created": _dt.datetime.now().isoformat(timespec="seconds"),
                            "timings": {**record.get("timings", {}), "total_s": time.time() - t0},
                            "metrics": metrics, "files": files}
                raw = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
                (tmp / MANIFEST).write_bytes(raw)
                (tmp / MANIFEST_SUM).write_text(f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n")
                digest = content_digest(files)
                _fsync_tree(tmp)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            return Artifact(stage, key, final, json.loads(raw), digest), True
