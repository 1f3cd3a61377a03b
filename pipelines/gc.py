"""`python -m pipelines.gc [outputs] [--dry-run]`: remove what the results store left aside.

- `.corrupt-*` and `.stale-*`: artifacts moved aside after a failed check (corrupt files, or
  built from upstream content that has changed since);
- `.tmp-*`: half-built artifacts whose writer is gone (killed before committing);
- `.ckpt-*`: block checkpoints of stages that are committed (leftovers) or that no live process
  holds the lock of and that are older than `--keep-hours` (default 24: a killed run can still
  resume within a day);
- `*.lock.stale-*`: lock files a waiter took over.

A lock file held by a live owner protects its key's `.tmp-*` and `.ckpt-*`. Prints one line per
removed path and the space freed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .locks import owner_alive


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _newest(p: Path) -> float:
    """The newest mtime in a tree (block checkpoints are written a level down)."""
    return max([p.stat().st_mtime, *(f.stat().st_mtime for f in p.rglob("*"))])


def _held(stage_dir: Path, key: str, stale_s: float) -> bool:
    lock = stage_dir / ".locks" / f"{key}.lock"
    try:
        owner = json.loads(lock.read_text() or "{}")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    if not owner:                  # no owner recorded (an older store's flock file): keep
        return True
    return owner_alive(owner, age, stale_s)


def garbage(cache: Path, keep_hours: float = 24.0, stale_s: float = 600.0) -> list[tuple[Path, str]]:
    """[(path, why)] of what can be removed under a store's cache root."""
    out = []
    now = time.time()
    for stage_dir in sorted(p for p in cache.iterdir() if p.is_dir()) if cache.exists() else []:
        for p in sorted(stage_dir.iterdir()):
            name = p.name
            if name.startswith((".corrupt-", ".stale-")):
                out.append((p, "set aside after a failed check"))
            elif name.startswith(".tmp-"):
                key = name[len(".tmp-"):].rsplit("-", 1)[0]
                if not _held(stage_dir, key, stale_s):
                    out.append((p, "unfinished build, writer gone"))
            elif name.startswith(".ckpt-"):
                key = name[len(".ckpt-"):]
                if (stage_dir / key).exists():
                    out.append((p, "checkpoint of a committed artifact"))
                elif not _held(stage_dir, key, stale_s) and now - _newest(p) > keep_hours * 3600:
                    out.append((p, f"orphaned checkpoint, untouched for > {keep_hours:g} h"))
        locks = stage_dir / ".locks"
        if locks.is_dir():
            out.extend((f, "lock taken over from a dead owner") for f in sorted(locks.glob("*.lock.stale-*")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.gc", description=__doc__.split("\n")[0])
    ap.add_argument("outputs", nargs="?", default="outputs", help="paths.outputs (default: outputs)")
    ap.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    ap.add_argument("--keep-hours", type=float, default=24.0,
                    help="keep unheld checkpoints younger than this (resumable)")
    args = ap.parse_args(argv)
    cache = Path(args.outputs) / "cache"
    if not cache.is_dir():
        print(f"error: {cache} is not a results store (give paths.outputs)", file=sys.stderr)
        return 2
    freed = 0
    items = garbage(cache, args.keep_hours)
    for p, why in items:
        size = _size(p)
        print(f"{'would remove' if args.dry_run else 'removed'} {p} ({size / 2**20:.1f} MiB; {why})")
        if not args.dry_run:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            freed += size
    print(f"{len(items)} item(s), {freed / 2**20:.1f} MiB freed" if not args.dry_run
          else f"{len(items)} item(s) would be removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
