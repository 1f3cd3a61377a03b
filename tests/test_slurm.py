"""A real sweep on the real local SLURM cluster (`slurm/cluster.sh start`; .ci/run starts it).

Checks the order of execution from SLURM's own job-completion records."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, data_dir

pytestmark = pytest.mark.slurm


def _cluster():
    from pipelines.launch import slurm_available
    if not slurm_available():
        pytest.skip("no SLURM cluster answers: run `bash slurm/cluster.sh start` and "
                    "`source /tmp/spikellm-slurm/env.sh` (.ci/run does both)")
    conf = os.environ.get("SLURM_CONF", "")
    comp = Path(conf).parent.parent / "log" / "jobcomp.txt" if conf else None
    return comp


def _jobcomp(path: Path) -> dict[str, dict]:
    """SLURM's job-completion records keyed as submitit names jobs: "<array>_<task>" or "<id>"."""
    out = {}
    for line in path.read_text().splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayJobId") else f["JobId"]
        out[key] = f
    return out


def test_sweep_on_slurm_runs_stages_in_dependency_order(tmp_path):
    comp = _cluster()
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()))
    args = [sys.executable, "-m", "pipelines.run", "-m", f"paths.outputs={tmp_path}",
            "launcher=slurm", "launcher.wait=true", "logger=none", "calib.nsamples=4",
            "calib.seqlen=128", "eval.seqlen=128", "eval.max_windows=2", "progress=false",
            "spiking.ratio=0.1,0.2", "spiking.saliency_from=fp",
            "launcher.setup=['echo setup-line-ran']", "+launcher.additional_parameters.comment=from-test"]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = sorted((tmp_path / "sweeps").glob("*/*"))[-1]
    # status: every job's id, elapsed time and log; the setup lines ran in each job
    st = subprocess.run([sys.executable, "-m", "pipelines.status", "--latest", str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True)
    assert st.returncode == 0 and f"sweep {sweep}" in st.stdout
    logs = re.findall(r" log (\S+)", st.stdout)
    assert len(logs) == 7 and all("setup-line-ran" in Path(f).read_text() for f in logs)
    assert len(re.findall(r" job \d+(?:_\d+)? ", st.stdout)) == 7
    states = [json.loads(f.read_text()) for f in (sweep / "state").glob("*.json")]
    assert sorted(s["stage"] for s in states) == ["calibrate", "evaluate", "evaluate",
                                                 "evaluate_fp", "quantize", "quantize", "score"]
    assert all(s["state"] == "done" for s in states)
    assert "sweep:" in p.stdout and p.stdout.count("ppl/wikitext2") >= 2
    if comp is not None and comp.exists():
        jobs = _jobcomp(comp)
        by_stage: dict[str, list[dict]] = {}
        for s in states:
            job = jobs[s["job_id"]]
            assert job["JobState"] == "COMPLETED" and job["Name"] == f"spikellm-{sweep.name}-{s['stage']}"
            by_stage.setdefault(s["stage"], []).append(job)
        end = {st: max(j["EndTime"] for j in js) for st, js in by_stage.items()}
        start = {st: min(j["StartTime"] for j in js) for st, js in by_stage.items()}
        assert end["calibrate"] <= start["score"] and end["score"] <= start["quantize"]
        assert end["quantize"] <= max(j["StartTime"] for j in by_stage["evaluate"])


def test_failed_stage_on_slurm_cancels_its_dependents(tmp_path):
    _cluster()
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()))
    # a model path that exists but holds no checkpoint: calibrate fails inside its job
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    args = [sys.executable, "-m", "pipelines.run", f"paths.outputs={tmp_path}", "launcher=slurm",
            "launcher.wait=true", "logger=none", f"model.path={bad}", "calib.nsamples=2",
            "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=1", "eval.fp_baseline=false"]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 1
    sweep = sorted((tmp_path / "sweeps").glob("*/*"))[-1]
    st = subprocess.run([sys.executable, "-m", "pipelines.status", str(sweep)], cwd=ROOT,
                        capture_output=True, text=True)
    assert "calibrate" in st.stdout and "failed" in st.stdout
    rows = [line for line in st.stdout.splitlines() if not line.startswith("total")]
    assert sum(" cancelled " in line for line in rows) == 2    # quantize and evaluate never ran


def test_cancel_stops_exactly_that_sweeps_jobs(tmp_path):
    """`pipelines.cancel --latest` scancels the queued/running jobs of the newest sweep and no
    other job (a job outside the sweep keeps running), and marks the stages cancelled."""
    _cluster()
    other = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 120"], capture_output=True,
                           text=True, timeout=60).stdout.strip().split(";")[0]
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()))
    args = [sys.executable, "-m", "pipelines.run", f"paths.outputs={tmp_path}", "launcher=slurm",
            "logger=none", "calib.nsamples=2", "calib.seqlen=64", "eval.seqlen=64",
            "eval.max_windows=1", "quant=rtn", "spiking=none", "launcher.cpu_jobs.mem_gb=1",
            "eval.fp_baseline=false"]
    try:
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "submitted" in p.stdout, p.stderr[-2000:]
        sweep = sorted((tmp_path / "sweeps").glob("*/*"))[-1]
        ids = {json.loads(f.read_text())["job_id"] for f in (sweep / "state").glob("*.json")
               if json.loads(f.read_text()).get("job_id")}
        c = subprocess.run([sys.executable, "-m", "pipelines.cancel", "--latest", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert c.returncode == 0 and "cancelled" in c.stdout, c.stderr
        import time
        for _ in range(60):             # scancel returns at once; the jobs leave the queue soon after
            left = set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                                      timeout=60).stdout.split())
            if not ids & left:
                break
            time.sleep(1)
        assert not (ids & left) and other in left
        st = subprocess.run([sys.executable, "-m", "pipelines.status", str(sweep)], cwd=ROOT,
                            capture_output=True, text=True)
        rows = [ln for ln in st.stdout.splitlines() if ln.startswith(("quantize", "evaluate"))]
        assert len(rows) == 2 and all(" cancelled " in ln for ln in rows), st.stdout
    finally:
        subprocess.run(["scancel", other], timeout=60)


def test_a_stage_on_another_host_is_judged_by_its_slurm_job():
    """Issue 11: liveness of a lock owner or a `running` stage on another host comes from SLURM's
    job state, not from a local pid (which means nothing there)."""
    import time

    from pipelines.locks import owner_alive
    _cluster()
    sub = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 60"], capture_output=True,
                         text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    owner = {"host": "some-compute-node", "pid": 1, "slurm_job": job}
    try:
        assert owner_alive(owner, heartbeat_age_s=10**6)     # running: alive despite a stale heartbeat
    finally:
        subprocess.run(["scancel", job], timeout=60)
    for _ in range(60):
        if not owner_alive(owner, heartbeat_age_s=0.0):
            break
        time.sleep(1)
    assert not owner_alive(owner, heartbeat_age_s=0.0)        # ended: gone despite a fresh heartbeat
