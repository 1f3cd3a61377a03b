"""`python -m pipelines.cancel <sweep dir> | --latest [outputs]`: cancel exactly that sweep's
SLURM jobs that have not finished (scancel of the job ids its state records hold), and mark
those stages cancelled. Finished stages and committed blocks stay in the store: running the
sweep's command again resumes it."""
from __future__ import annotations

import json
import subprocess
import sys

from .execute import _now, state_path
from .status import collect, sweep_from_args
from .store import write_json

ACTIVE = ("queued", "running")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = sweep_from_args(argv, "pipelines.cancel")
    if sweep is None:
        return 2
    rows = [r for r in collect(sweep) if r["state"] in ACTIVE and r["job_id"]]
    if not rows:
        print(f"sweep {sweep}: no queued or running SLURM job to cancel")
        return 0
    ids = sorted({str(r["job_id"]) for r in rows})
    try:
        p = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"error: scancel failed ({type(e).__name__}: {e}); nothing was cancelled", file=sys.stderr)
        return 1
    if p.returncode != 0:
        print(f"error: scancel {' '.join(ids)} exited {p.returncode}: "
              f"{(p.stderr or '').strip().splitlines()[:1]}", file=sys.stderr)
        return 1
    for r in rows:
        path = state_path(sweep, r["id"])
        st = json.loads(path.read_text()) if path.exists() else {}
        write_json(path, {**st, "state": "cancelled", "updated": _now(), "ended": _now(),
                          "reason": "cancelled by pipelines.cancel"})
    print(f"sweep {sweep}: cancelled {len(ids)} job(s): {' '.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
