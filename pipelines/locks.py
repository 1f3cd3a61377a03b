"""A lock that works on a cluster's shared filesystem (NFS, Lustre), not only on one host.

`fcntl.flock` is node-local on some filesystems and absent on Lustre mounts without `flock`, so a
stage key is locked by creating `<key>.lock` with `O_CREAT | O_EXCL` (atomic on NFSv3+ and Lustre)
and writing its owner into it: host, pid, SLURM job id, start time. The owner refreshes the file's
mtime every `heartbeat_s` while it holds the lock. A waiter says once whom it waits for, and takes
the lock over when the owner is gone:

- same host: the owner's pid no longer exists;
- another host: SLURM says the owner's job is no longer running, or (no SLURM answer) the
  heartbeat is older than `stale_s`.

Waiting longer than `timeout_s` raises `LockTimeout`, naming the owner and the lock file.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable


#: when this process started (a lock with our host and pid from before then is a leftover)
_STARTED = time.time()


class LockTimeout(RuntimeError):
    """Another process held the lock for longer than the timeout."""


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


def slurm_job_running(job_id: str) -> bool | None:
    """True/False from `squeue` when SLURM answers, None when it cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # an unknown (long finished) job id is an error for squeue: the job is not running
        return False if "Invalid job id" in out.stderr else None
    state = out.stdout.strip()
    return state in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")


def owner_alive(owner: dict, heartbeat_age_s: float | None = None, stale_s: float = 600.0) -> bool:
    """Whether the process that recorded `owner` can still be running."""
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        try:
            os.kill(int(owner["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    if owner.get("slurm_job"):
        running = slurm_job_running(owner["slurm_job"])
        if running is not None:
            return running
    return heartbeat_age_s is None or heartbeat_age_s < stale_s


def describe(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    since = time.strftime("%H:%M:%S", time.localtime(owner["since"])) if owner.get("since") else "?"
    return f"{owner.get('host', '?')} pid {owner.get('pid', '?')}{job} (since {since})"


class FileLock:
    """Exclusive lock file `path`; use as a context manager."""

    def __init__(self, path: str | os.PathLike, timeout_s: float | None = 86400.0,
                 stale_s: float = 600.0, heartbeat_s: float = 30.0, poll_s: float = 1.0,
                 say: Callable[[str], None] = print):
        self.path = Path(path)
        self.timeout_s, self.stale_s, self.heartbeat_s, self.poll_s = timeout_s, stale_s, heartbeat_s, poll_s
        self.say = say
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._record: dict | None = None

    def _try_create(self) -> bool:
        """Write the owner record to a private file, then hard-link it to the lock path: the link
        fails if the lock exists (atomic on NFS and Lustre), and the lock is never seen empty."""
        record = owner_record()
        tmp = self.path.with_name(f".{self.path.name}.{record['host']}.{record['pid']}")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._record = record
        return True

    def _owner(self) -> tuple[dict | None, float | None]:
        """(owner record, seconds since its heartbeat), or (None, None) when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        except OSError:
            return {"unreadable": True}, None
        try:
            return json.loads(text) or {"unreadable": True}, age
        except ValueError:
            return {"unreadable": True}, age

    def _break(self, owner: dict) -> None:
        """Remove a dead owner's lock file, unless someone else replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            taken = json.loads(aside.read_text() or "{}")
        except (OSError, ValueError):
            taken = {}
        if taken != owner:          # we moved a fresh owner's file: put it back, never over another
            try:
                os.link(aside, self.path)
            except (FileExistsError, FileNotFoundError):
                pass
        aside.unlink(missing_ok=True)

    def _dead(self, owner: dict, age: float | None) -> bool:
        """Whether `owner` (read from the lock file, `age` seconds since its heartbeat) is gone."""
        if owner.get("unreadable"):            # garbled (written by hand or a broken disk)
            return age is None or age > 60
        me = owner_record()
        if owner.get("slurm_job") and owner["slurm_job"] == me["slurm_job"]:
            return True                         # our own job, requeued: its old lock is a leftover
        if (owner.get("host"), owner.get("pid")) == (me["host"], me["pid"]) and \
                owner.get("since", 0) < _STARTED:
            return True                         # our pid from before we started: a previous life
        return not owner_alive(owner, age, self.stale_s)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0, told = time.time(), False
        while not self._try_create():
            owner, age = self._owner()
            if owner is None:
                continue                       # released between our create and our read
            if self._dead(owner, age):
                self.say(f"lock {self.path}: owner {describe(owner)} is gone; taking it over")
                self._break(owner)
                continue
            if not told:
                self.say(f"waiting for {describe(owner) if owner else 'another process'}, "
                         f"which holds {self.path}")
                told = True
            if self.timeout_s is not None and time.time() - t0 > self.timeout_s:
                raise LockTimeout(f"{self.path} is still held by {describe(owner)} after "
                                  f"{self.timeout_s:.0f}s; if that process is gone, delete the "
                                  f"file (or raise store.lock_timeout_s)")
            time.sleep(self.poll_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        owner, _ = self._owner()
        if owner == self._record:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
