"""`python -m pipelines.status <sweep dir>`: the state of every stage instance of a sweep
(cached, queued, running, done, failed with the reason, cancelled)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .locks import owner_alive


def _alive(st: dict) -> bool:
    """A running stage's process still exists: its pid on this host, its SLURM job's state on
    another (`pipelines.locks.owner_alive`); unknowable cases count as alive."""
    return owner_alive({"host": st.get("host"), "pid": st.get("pid"), "slurm_job": st.get("slurm_job")})


def collect(sweep_dir: Path) -> list[dict]:
    plan = json.loads((sweep_dir / "plan.json").read_text())
    rows = []
    for node_id, node in plan["nodes"].items():
        f = sweep_dir / "state" / (node_id.replace("/", "__") + ".json")
        st = json.loads(f.read_text()) if f.exists() else {"state": "queued"}
        if st.get("state") == "running" and not _alive(st):
            who = f"SLURM job {st['slurm_job']}" if st.get("slurm_job") else f"process {st.get('pid')}"
            st = {**st, "state": "failed", "reason": f"{who} on {st.get('host')} ended while running"}
        rows.append({"stage": node["stage"], "key": node["key"], "points": node["points"],
                     "state": st.get("state"), "reason": st.get("reason", ""),
                     "updated": st.get("updated", "")})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or not (Path(argv[0]) / "plan.json").exists():
        print("usage: python -m pipelines.status <sweep dir containing plan.json> "
              "(see outputs/sweeps/<date>/<time>)", file=sys.stderr)
        return 2
    rows = collect(Path(argv[0]))
    width = max(len(r["stage"]) for r in rows)
    for r in rows:
        pts = ",".join(map(str, r["points"]))
        line = f"{r['stage'].ljust(width)}  {r['key']}  {r['state']:<9}  points {pts}"
        print(line + (f"  ({r['reason']})" if r["reason"] else ""))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print("total: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
