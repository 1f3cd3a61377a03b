"""Never a silent stale result: complete keys, checked artifacts, sound block checkpoints, locks
that hold across processes, and faults that end in one line (issue 11's fault table)."""
from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, data_dir

REDUCED = ["calib.nsamples=4", "calib.seqlen=128", "eval.seqlen=128", "eval.max_windows=2",
           "progress=false", "launcher=local", "logger=none"]


def _keys(overrides):
    from pipelines.config import compose_config
    from pipelines.dag import plan
    p = plan([compose_config(overrides)])
    return {p.nodes[i].stage: p.nodes[i].key for i in p.points[0].values()}


def _copy_data(dst: Path, shuffle: bool = False) -> Path:
    src = data_dir() / "wikitext-2-raw-v1"
    (dst / "wikitext-2-raw-v1").mkdir(parents=True)
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        lines = (src / name).read_text(encoding="utf-8").split("\n")
        if shuffle:
            import random
            random.Random(0).shuffle(lines)
        (dst / "wikitext-2-raw-v1" / name).write_text("\n".join(lines), encoding="utf-8")
    return dst


# ---- keys ---------------------------------------------------------------------------------

def test_keys_follow_data_content_not_its_path(tmp_path):
    base = _keys(["spiking=none", f"paths.data_dir={data_dir()}"])
    same = _keys(["spiking=none", f"paths.data_dir={_copy_data(tmp_path / 'copy')}"])
    assert same == base                             # same bytes elsewhere: one dataset, one key
    changed = _keys(["spiking=none", f"paths.data_dir={_copy_data(tmp_path / 'shuf', True)}"])
    assert all(changed[s] != base[s] for s in base)  # shuffled lines: every stage recomputes


def test_a_relative_data_path_from_two_directories_is_two_keys(tmp_path, monkeypatch):
    _copy_data(tmp_path / "a" / "data")
    _copy_data(tmp_path / "b" / "data", shuffle=True)
    monkeypatch.chdir(tmp_path / "a")
    ka = _keys(["spiking=none", "paths.data_dir=data"])
    monkeypatch.chdir(tmp_path / "b")
    kb = _keys(["spiking=none", "paths.data_dir=data"])
    assert ka["calibrate"] != kb["calibrate"] and ka["evaluate_fp"] != kb["evaluate_fp"]


def test_file_digests_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import pipelines.fingerprint as fpr
    monkeypatch.setenv("SPIKELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fpr, "_MEMO", None)
    f = tmp_path / "big.txt"
    f.write_text("a" * 1000)
    calls = []
    real = fpr.sha256_file
    monkeypatch.setattr(fpr, "sha256_file", lambda p: calls.append(p) or real(p))
    d1 = fpr.file_digest(f)
    assert fpr.file_digest(f) == d1 and len(calls) == 1          # second time: from the memo
    f.write_text("b" * 1000)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fpr.file_digest(f) != d1 and len(calls) == 2


def test_code_digest_covers_the_method_sources_and_only_them(tmp_path, monkeypatch):
    import pipelines.fingerprint as fpr
    files = {p.relative_to(ROOT).as_posix() for p in fpr.code_files()}
    assert {"spikellm/gptq.py", "spikellm/omniquant.py", "pipelines/stages.py",
            "spikellm/data.py"} <= files
    assert not any(f.startswith(("tests/", "bench/")) for f in files)
    copy = tmp_path / "repo"
    for pkg in ("spikellm", "pipelines"):
        shutil.copytree(ROOT / pkg, copy / pkg)
    monkeypatch.setattr(fpr, "_ROOT", copy)
    fpr.code_files.cache_clear()
    fpr.code_digest.cache_clear()
    try:
        before = fpr.code_digest()
        gptq = copy / "spikellm" / "gptq.py"
        gptq.write_text(gptq.read_text() + "\n# changed\n")
        fpr.code_digest.cache_clear()
        assert fpr.code_digest() != before
    finally:
        fpr.code_files.cache_clear()
        fpr.code_digest.cache_clear()


def test_code_and_library_versions_enter_every_key(monkeypatch):
    import pipelines.dag as dag
    base = _keys([])
    monkeypatch.setattr(dag, "code_digest", lambda: "another-commit")
    assert all(v != base[k] for k, v in _keys([]).items())
    monkeypatch.undo()
    monkeypatch.setattr(dag, "library_versions", lambda **_: {"torch": "9.9", "transformers": "1"})
    assert all(v != base[k] for k, v in _keys([]).items())
    monkeypatch.undo()
    assert _keys(["device=cpu"]) == base            # auto resolves to cpu here: same device


def test_the_quantize_stage_computes_only_from_its_key():
    """A key the chosen method does not have is rejected in one line (never hashed, never
    silently ignored); the stage's typed config holds the values its key hashes."""
    from pipelines.config import ConfigError, compose_config
    from pipelines.dag import method_configs
    with pytest.raises(ConfigError, match="quant.epochs is not a key of quant=gptq .*omniquant"):
        compose_config(["quant=gptq", "spiking=none", "+quant.epochs=7"])
    q, s = method_configs(compose_config(["quant=omniquant", "spiking=t2", "quant.epochs=7"]))
    assert q.epochs == 7 and s.mode == "gif"


# ---- artifacts ------------------------------------------------------------------------------

def _built(store, stage="evaluate", key="k", upstream=None):
    return store.build(stage, key, lambda out: {"ppl/wikitext2": 12.5}, {"config": {}}, upstream)[0]


def test_an_edited_cached_number_is_detected_in_one_line_and_recomputed(tmp_path, capfd):
    from pipelines.artifacts import ArtifactStore
    store = ArtifactStore(tmp_path)
    art = _built(store)
    assert "metrics.json" in art.manifest["files"]           # evaluate artifacts list files too
    m = art.file("manifest.json")
    m.write_text(m.read_text().replace("12.5", "10.5"))
    assert store.get("evaluate", "k") is None
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "manifest.json" in err[0]
    assert any(p.name.startswith(".corrupt-k-") for p in (tmp_path / "evaluate").iterdir())
    art = _built(store)
    art.file("metrics.json").write_text('{"ppl/wikitext2": 10.5}\n')
    assert store.get("evaluate", "k") is None
    assert _built(store).metrics["ppl/wikitext2"] == 12.5


def test_an_io_error_is_retried_then_fails_without_discarding_the_artifact(tmp_path, monkeypatch):
    import pipelines.artifacts as arts
    store = arts.ArtifactStore(tmp_path)
    _built(store)
    monkeypatch.setattr(arts, "IO_RETRY_S", (0.0, 0.0))
    calls = []

    def flaky(path):
        calls.append(path)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(arts, "file_sha256", flaky)
    with pytest.raises(arts.StoreIOError, match="not treated as corruption"):
        store.get("evaluate", "k")
    assert len(calls) == 3 and (tmp_path / "evaluate" / "k").is_dir()     # still there
    monkeypatch.undo()
    assert store.get("evaluate", "k").metrics["ppl/wikitext2"] == 12.5


def test_a_downstream_artifact_of_changed_upstream_content_is_stale(tmp_path, capfd):
    from pipelines.artifacts import ArtifactStore
    store = ArtifactStore(tmp_path)
    _built(store, upstream={"quantize": "aaa"})
    assert store.get("evaluate", "k", {"quantize": "aaa"}) is not None
    assert store.get("evaluate", "k", {"quantize": "bbb"}) is None
    assert "stale" in capfd.readouterr().err


def test_gc_removes_what_was_set_aside_and_keeps_live_work(tmp_path):
    from pipelines.artifacts import ArtifactStore
    from pipelines.gc import main as gc_main
    store = ArtifactStore(tmp_path / "cache")
    art = _built(store)
    m = art.file("manifest.json")
    m.write_text(m.read_text() + " ")
    assert store.get("evaluate", "k") is None                  # -> .corrupt-k-*
    (tmp_path / "cache" / "evaluate" / ".tmp-dead-999999999").mkdir()
    live = tmp_path / "cache" / "evaluate" / ".tmp-live-1"
    live.mkdir()
    with store.lock("evaluate", "live"):
        assert gc_main([str(tmp_path)]) == 0
    left = sorted(p.name for p in (tmp_path / "cache" / "evaluate").iterdir())
    assert left == [".locks", ".tmp-live-1"]


# ---- locks ---------------------------------------------------------------------------------

def _build_slowly(root: str, log: str) -> None:
    from pipelines.artifacts import ArtifactStore

    def fn(out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return {"x": 1}
    ArtifactStore(root).build("quantize", "same", fn, {"config": {}})


def test_two_processes_on_one_key_compute_it_once(tmp_path):
    log = tmp_path / "calls.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "c"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1


def test_a_dead_owners_lock_is_taken_over_and_a_live_one_times_out(tmp_path, capsys):
    from pipelines.locks import FileLock, LockTimeout
    lock = tmp_path / "k.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    msgs = []
    with FileLock(lock, timeout_s=5, say=msgs.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "is gone" in msgs[0] and not lock.exists()
    holder = FileLock(lock, say=msgs.append)
    holder.acquire()
    try:
        msgs.clear()
        with pytest.raises(LockTimeout, match=f"pid {os.getpid()}"):
            FileLock(lock, timeout_s=0.5, poll_s=0.1, say=msgs.append).acquire()
        assert msgs and msgs[0].startswith("waiting for") and str(os.getpid()) in msgs[0]
    finally:
        holder.release()


def test_status_reports_a_running_stage_whose_process_died(tmp_path):
    from pipelines.status import collect
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (tmp_path / "state").mkdir()
    (tmp_path / "plan.json").write_text(json.dumps({"nodes": {"quantize/k": {
        "stage": "quantize", "key": "k", "points": [0]}}}))
    (tmp_path / "state" / "quantize__k.json").write_text(json.dumps(
        {"state": "running", "pid": dead.pid, "host": socket.gethostname()}))
    (row,) = collect(tmp_path)
    assert row["state"] == "failed" and "ended while running" in row["reason"]


# ---- block checkpoints ----------------------------------------------------------------------

def _crash_after_blocks(lm, ids, q, s, ckpt, n, monkeypatch):
    qmod = importlib.import_module("spikellm.quantize")   # the module (spikellm.quantize is the function)
    real = qmod.quantize_linear

    def crash(name, *a, **kw):
        if name.startswith(f"{n}."):
            raise KeyboardInterrupt("killed")
        return real(name, *a, **kw)
    monkeypatch.setattr(qmod, "quantize_linear", crash)
    with pytest.raises(KeyboardInterrupt):
        qmod.quantize(lm.model, ids, q, s, progress=False, checkpoint_dir=ckpt)
    monkeypatch.setattr(qmod, "quantize_linear", real)


def test_a_bad_block_checkpoint_is_discarded_and_recomputed_bit_equal(smollm, data_root, tmp_path,
                                                                      monkeypatch):
    """Killed after block 3: blocks 0..3 committed. The newest file is then cut short: it is
    discarded in one line and block 3 is recomputed from block 2 (which keeps its streams),
    giving exactly the uninterrupted run's weights. Blocks under another tag are never used."""
    from spikellm.blockwise import load_block_checkpoint
    from spikellm.config import QuantConfig, SpikingConfig
    from spikellm.data import CalibSpec, calibration_set
    from spikellm.models import blocks_of
    from spikellm.quantize import quantize
    lm = smollm
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 2, 32, 0), data_root)
    q, s = QuantConfig(method="gptq", wbits=3), SpikingConfig()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tag.json").write_text('{"key": "k1"}')
    try:
        ref_report = quantize(lm.model, ids, q, s, progress=False)
        ref = {k: v.clone() for k, v in lm.model.state_dict().items()}
        lm.model.load_state_dict(original)
        _crash_after_blocks(lm, ids, q, s, ckpt, 4, monkeypatch)
        assert len(list(ckpt.glob("block-*.json"))) == 4
        # a foreign tag (another config or code wrote these blocks): nothing is resumed
        foreign = tmp_path / "foreign"
        shutil.copytree(ckpt, foreign)
        (foreign / "tag.json").write_text('{"key": "k2"}')
        msgs = []
        start, *_ = load_block_checkpoint(foreign, blocks_of(lm.model, lm.spec), log=msgs.append)
        assert start == 0 and "another config" in msgs[0] and "from the start" in msgs[0]
        assert not list(foreign.glob("block-*"))
        f = ckpt / "block-00003.pt"                # the newest block file cut short
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        lm.model.load_state_dict(original)         # a fresh process: original weights
        msgs = []
        rep = quantize(lm.model, ids, q, s, progress=False, checkpoint_dir=ckpt, log=msgs.append)
        line = next(m for m in msgs if "unusable" in m)
        assert "block 3" in line and "checksum" in line and "after block 2" in line
        for k, v in ref.items():
            torch.testing.assert_close(lm.model.state_dict()[k], v, rtol=0, atol=0)
        assert len(rep.stats) == len(ref_report.stats) and rep.cost["ace"] == ref_report.cost["ace"]
    finally:
        lm.model.load_state_dict(original)


# ---- faults, end to end through the CLI -------------------------------------------------------

def _cli(args, outputs, **kw):
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()))
    return subprocess.run([sys.executable, "-m", "pipelines.run", f"paths.outputs={outputs}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.parametrize("make,args,expect", [
    (lambda t: (t / "out").write_text("x") and t / "out", [], "is a file"),
    (lambda t: t / "f" / "sub", [], "is a file"),
    (lambda t: t / "o", ["eval.seqlen=100000"], "eval.seqlen=100000 exceeds the model's context of 8192"),
    (lambda t: t / "o", ["device=cuda"], "no CUDA GPU"),
])
def test_faults_outside_the_config_are_one_line(make, args, expect, tmp_path):
    (tmp_path / "f").write_text("a file where a directory should be")
    if torch.cuda.is_available() and "device=cuda" in args:
        pytest.skip("a GPU is visible")
    p = _cli(REDUCED + args, make(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-2000:]
    assert expect in lines[0]


def test_a_data_file_that_is_not_utf8_is_named(tmp_path):
    data = _copy_data(tmp_path / "d")
    f = data / "wikitext-2-raw-v1" / "wiki.test.raw"
    f.write_bytes(f.read_bytes()[:1000] + b"\xff\xfe bad bytes\n")
    p = _cli(REDUCED + ["spiking=none", "quant=rtn", f"paths.data_dir={data}"], tmp_path / "o")
    assert p.returncode != 0
    assert f"{f} is not UTF-8" in p.stderr


def _wait_for_blocks(root: Path, n: int, proc, timeout=600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(list(root.glob("cache/quantize/.ckpt-*/*/block-*.json"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError("no block checkpoints appeared")


def _interrupt_and_resume(sig, tmp_path):
    args = REDUCED + ["spiking=none", "quant.wbits=3", "eval.fp_baseline=false"]
    ref = _cli(args, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", f"paths.outputs={out}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_blocks(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {name} in quantize/") and "resume" in last
    (state,) = [json.loads(f.read_text()) for f in out.glob("sweeps/*/*/state/quantize__*.json")]
    assert state["state"] == "interrupted"
    again = _cli(args, out)
    assert again.returncode == 0 and "resuming quantize/" in again.stderr, again.stderr[-2000:]
    (a,) = (tmp_path / "ref").glob("cache/quantize/*/weights.safetensors")
    (b,) = out.glob("cache/quantize/*/weights.safetensors")
    from safetensors.torch import load_file
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_mid_quantize_marks_interrupted_and_resumes_bit_equal(tmp_path):
    _interrupt_and_resume(signal.SIGTERM, tmp_path)


@pytest.mark.slow
def test_sigint_mid_quantize_marks_interrupted_and_resumes_bit_equal(tmp_path):
    _interrupt_and_resume(signal.SIGINT, tmp_path)
