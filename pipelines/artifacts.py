"""Content-keyed stage artifacts: directories committed atomically with a checksummed manifest.

An artifact lives at `<root>/<stage>/<key>/`. It is built in a temporary directory beside it
and renamed into place only when complete, under an exclusive file lock, so two processes
asking for the same key compute it once and a killed writer never leaves a half-written
artifact behind. On every lookup the files are checked against the manifest's SHA-256 sums;
a corrupted artifact is moved aside and rebuilt.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spikellm.embedded import sha256_file

MANIFEST = "manifest.json"


file_sha256 = sha256_file


@dataclass
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        return self.path / name


class ArtifactStore:
    """Artifacts under `root` (e.g. `outputs/cache`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @contextmanager
    def lock(self, stage: str, key: str):
        lock_dir = self.root / stage / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def verify(self, path: Path) -> dict | None:
        """The manifest if every listed file exists with its checksum, else None."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            for name, digest in manifest["files"].items():
                if file_sha256(path / name) != digest:
                    return None
            return manifest
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, stage: str, key: str) -> Artifact | None:
        """A committed, intact artifact, or None. A corrupted one is moved aside."""
        path = self.path(stage, key)
        if not path.exists():
            return None
        manifest = self.verify(path)
        if manifest is None:
            aside = path.with_name(f".corrupt-{key}-{int(time.time() * 1000)}")
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return None
        return Artifact(stage, key, path, manifest)

    def build(self, stage: str, key: str, fn: Callable[[Path], dict], record: dict[str, Any]) -> tuple[Artifact, bool]:
        """Return (artifact, built_now). `fn(tmpdir)` writes the files and returns metrics;
        `record` (config, upstream keys, versions, ...) goes into the manifest."""
        hit = self.get(stage, key)
        if hit is not None:
            return hit, False
        with self.lock(stage, key):
            hit = self.get(stage, key)          # someone else built it while we waited
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
                files = {p.relative_to(tmp).as_posix(): file_sha256(p)
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"stage": stage, "key": key, **record,
                            "created": _dt.datetime.now().isoformat(timespec="seconds"),
                            "timings": {**record.get("timings", {}), "total_s": time.time() - t0},
                            "metrics": metrics, "files": files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            return Artifact(stage, key, final, manifest), True
