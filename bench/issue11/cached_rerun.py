"""Issue 11: the time content hashing adds to a fully cached re-run of `experiment=ratio_sweep -m`.

A cached re-run plans the sweep (computing every key) and checks each artifact; what issue 11
added to the keys is the data-file and checkpoint digests, the code digest and the versions.
This plans the real recipe's 8 points three ways in fresh processes: with the digests from a cold
memo (`digests.json` removed: every file hashed once), from the warm memo (the normal case), and
with the fingerprint functions replaced by constants (the cost without them).

    SPIKELLM_DATA_DIR=../shared/data .venv/bin/python bench/issue11/cached_rerun.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = r'''
import json, sys, time
t0 = time.time()
from pipelines.config import compose_config, expand_points
import pipelines.run             # what a re-run has imported before it plans (torch, transformers)
import pipelines.dag as dag
if sys.argv[1] == "stub":
    dag.code_digest = lambda: "x"
    dag.library_versions = lambda **_: {}
    dag.model_identity = lambda cfg: {}
    dag.file_digest = lambda p: "x"
cfgs = [compose_config(p) for p in expand_points(["experiment=ratio_sweep"])]
t1 = time.time()
p = dag.plan(cfgs)
t2 = time.time()
print(json.dumps({"compose_s": t1 - t0, "plan_s": t2 - t1, "nodes": len(p.nodes)}))
'''


def child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from spikellm.embedded import cache_root
    memo = cache_root() / "digests.json"
    if memo.exists():
        memo.unlink()
    cold = child("real")
    warm = [child("real") for _ in range(3)]
    stub = [child("stub") for _ in range(3)]
    best = lambda rs: min(r["plan_s"] for r in rs)                       # noqa: E731
    print(f"ratio_sweep: {cold['nodes']} stage instances")
    print(f"plan, cold digest memo (every file hashed): {cold['plan_s']:.2f} s")
    print(f"plan, warm memo (normal re-run), best of 3:  {best(warm):.2f} s")
    print(f"plan, fingerprints stubbed out, best of 3:   {best(stub):.2f} s")
    print(f"added by content hashing: {best(warm) - best(stub):.2f} s warm, "
          f"{cold['plan_s'] - best(stub):.2f} s cold (goal < 2 s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SPIKELLM_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    sys.exit(main())
