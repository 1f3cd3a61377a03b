"""`python -m pipelines.status <sweep dir> | --latest [outputs]`: the state of every stage
instance of a sweep (cached, queued, running, done, failed with the reason, cancelled), with
its SLURM job id, elapsed time and log file where it has them."""
from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

from .locks import owner_alive


def _alive(st: dict) -> bool:
    """A running stage's process still exists: its pid on this host, its SLURM job's state on
    another (`pipelines.locks.owner_alive`); unknowable cases count as alive."""
    return owner_alive({"host": st.get("host"), "pid": st.get("pid"), "slurm_job": st.get("slurm_job")})


def _elapsed(st: dict) -> float | None:
    """Seconds from start to end (or to now while running)."""
    if not st.get("started"):
        return None
    try:
        t0 = _dt.datetime.fromisoformat(st["started"])
        t1 = _dt.datetime.fromisoformat(st["ended"]) if st.get("ended") else _dt.datetime.now(t0.tzinfo)
    except ValueError:
        return None
    return max(0.0, (t1 - t0).total_seconds())


def collect(sweep_dir: Path) -> list[dict]:
    plan = json.loads((sweep_dir / "plan.json").read_text())
    rows = []
    for node_id, node in plan["nodes"].items():
        f = sweep_dir / "state" / (node_id.replace("/", "__") + ".json")
        st = json.loads(f.read_text()) if f.exists() else {"state": "queued"}
        if st.get("state") == "running" and not _alive(st):
            who = f"SLURM job {st['slurm_job']}" if st.get("slurm_job") else f"process {st.get('pid')}"
            st = {**st, "state": "failed", "reason": f"{who} on {st.get('host')} ended while running"}
        rows.append({"id": node_id, "stage": node["stage"], "key": node["key"], "points": node["points"],
                     "state": st.get("state"), "reason": st.get("reason", ""),
                     "updated": st.get("updated", ""), "job_id": st.get("job_id") or st.get("slurm_job"),
                     "elapsed_s": _elapsed(st), "log": st.get("log")})
    return rows


def latest_sweep(outputs: Path) -> Path | None:
    """The most recently created sweep record under `outputs`/sweeps (by its plan.json)."""
    plans = list((outputs / "sweeps").glob("*/*/plan.json"))
    return max(plans, key=lambda p: p.stat().st_mtime).parent if plans else None


def sweep_from_args(argv: list[str], prog: str) -> Path | None:
    """<sweep dir> or --latest [outputs dir] (default: outputs) -> the sweep record, or None
    after printing a one-line usage error."""
    if argv[:1] == ["--latest"] and len(argv) <= 2:
        outputs = Path(argv[1] if len(argv) == 2 else "outputs")
        found = latest_sweep(outputs)
        if found is None:
            print(f"error: no sweep record under {outputs}/sweeps: pass the outputs directory "
                  f"(paths.outputs) after --latest", file=sys.stderr)
        return found
    if len(argv) != 1 or not (Path(argv[0]) / "plan.json").exists():
        print(f"usage: python -m {prog} <sweep dir containing plan.json> | --latest [outputs dir] "
              "(sweeps are in <paths.outputs>/sweeps/<date>/<time>)", file=sys.stderr)
        return None
    return Path(argv[0])


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = sweep_from_args(argv, "pipelines.status")
    if sweep is None:
        return 2
    rows = collect(sweep)
    print(f"sweep {sweep}")
    width = max(len(r["stage"]) for r in rows)
    for r in rows:
        pts = ",".join(map(str, r["points"]))
        line = (f"{r['stage'].ljust(width)}  {r['key']}  {r['state']:<11}  points {pts:<6}  "
                f"job {r['job_id'] or '-':<10}  {_fmt_s(r['elapsed_s']):>7}")
        if r["log"]:
            line += f"  log {r['log']}"
        print(line + (f"  ({r['reason']})" if r["reason"] else ""))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print("total: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
