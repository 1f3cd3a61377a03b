"""The in-process executor: failure isolation, recorded states, and redoing only what failed.

The stage functions are replaced by small stand-ins here (the real ones run in
test_pipeline.py); the planner, artifact store, state records and status command are real."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from pipelines import execute
from pipelines.artifacts import ArtifactStore
from pipelines.config import compose_config, expand_sweep
from pipelines.dag import plan
from pipelines.tracking import Tracker


@pytest.fixture()
def stand_ins(monkeypatch):
    calls = []

    def make(stage, fail=False):
        def fn(cfg, deps, out, **_):
            calls.append(stage)
            if fail:
                raise RuntimeError(f"{stage} broke on purpose")
            (out / "result.json").write_text(json.dumps({"stage": stage, "deps": sorted(deps)}))
            return {f"test/{stage}": 1.0}
        return fn

    for stage in ("calibrate", "score", "quantize", "evaluate", "evaluate_fp"):
        monkeypatch.setitem(execute.STAGE_FUNCTIONS, stage, make(stage))
    return calls, make, monkeypatch


def _run(tmp_path, sweep_name):
    cfgs = [compose_config(p + ["logger=none"]) for p in expand_sweep(["spiking.ratio=0.1,0.2"])]
    p = plan(cfgs)
    sweep_dir = tmp_path / "sweeps" / sweep_name
    execute.write_plan(p, sweep_dir, [[]] * len(cfgs))
    done = execute.execute_local(p, ArtifactStore(tmp_path / "cache"), Tracker("none"), sweep_dir,
                                 {i: n.stage for i, n in p.nodes.items()})
    return p, done, sweep_dir


def test_failed_stage_cancels_dependents_and_keeps_the_rest(tmp_path, stand_ins):
    calls, make, mp = stand_ins
    mp.setitem(execute.STAGE_FUNCTIONS, "quantize", make("quantize", fail=True))
    p, done, sweep_dir = _run(tmp_path, "s1")
    states = {i: json.loads(execute.state_path(sweep_dir, i).read_text()) for i in p.nodes}
    by_stage = {}
    for i, st in states.items():
        by_stage.setdefault(p.nodes[i].stage, []).append(st)
    assert [s["state"] for s in by_stage["quantize"]] == ["failed", "failed"]
    assert "quantize broke on purpose" in by_stage["quantize"][0]["reason"]
    assert [s["state"] for s in by_stage["evaluate"]] == ["cancelled", "cancelled"]
    assert by_stage["calibrate"][0]["state"] == "done" and by_stage["evaluate_fp"][0]["state"] == "done"
    assert (sweep_dir / "logs").exists()
    st = subprocess.run([sys.executable, "-m", "pipelines.status", str(sweep_dir)], cwd=ROOT,
                        capture_output=True, text=True)
    assert st.returncode == 1 and "failed" in st.stdout and "broke on purpose" in st.stdout

    # fixed and run again: what was computed is reused, only the failed part and its dependents run
    calls.clear()
    mp.setitem(execute.STAGE_FUNCTIONS, "quantize", make("quantize"))
    p2, done2, sweep2 = _run(tmp_path, "s2")
    assert sorted(calls) == ["evaluate", "evaluate", "quantize", "quantize"]
    assert all(a is not None for a in done2.values())
    calls.clear()
    _run(tmp_path, "s3")
    assert calls == []


def test_report_tables_every_point_from_the_sweep_record(tmp_path, stand_ins):
    from pipelines.report import write_report
    p, done, sweep_dir = _run(tmp_path, "r1")
    html, md = write_report(sweep_dir)
    text = md.read_text()
    assert text.count("| done |") == 2 and "test/evaluate" in text and "test/quantize" in text
    assert "<svg" in html.read_text() or "no finished points" in html.read_text()


def test_a_stage_another_process_built_meanwhile_is_recorded_cached_not_done(tmp_path, stand_ins):
    """The race of two launches: this one's lookup missed, the other process committed the
    artifact while this one waited on the lock. Nothing is recomputed and the state says so."""
    calls, _, mp = stand_ins
    _run(tmp_path, "first")
    calls.clear()
    mp.setattr(execute, "lookup", lambda *a, **k: None)      # the lookup ran before the commit
    p, done, sweep_dir = _run(tmp_path, "second")
    assert calls == [] and all(a is not None for a in done.values())
    states = [json.loads(execute.state_path(sweep_dir, i).read_text()) for i in p.nodes]
    assert {s["state"] for s in states} == {"cached"}
    assert all("another process" in s["reason"] for s in states)
