"""The artifact store: atomic commit, one build under concurrent writers, corruption detection."""
import json
import multiprocessing as mp
import time

from pipelines.artifacts import ArtifactStore


def _slow_build(root, counter_file, results):
    store = ArtifactStore(root)

    def fn(tmp):
        with open(counter_file, "a") as f:
            f.write("built\n")
        time.sleep(0.5)                                 # long enough for the other to wait
        (tmp / "data.txt").write_text("payload")
        return {"value": 1.0}

    art, built = store.build("quantize", "k1", fn, {"config": {"a": 1}})
    results.put((built, (art.path / "data.txt").read_text()))


def test_two_concurrent_writers_build_once(tmp_path):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    counter = tmp_path / "count.txt"
    procs = [ctx.Process(target=_slow_build, args=(tmp_path / "store", counter, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outs = sorted(results.get(timeout=5) for _ in procs)
    assert counter.read_text().count("built") == 1
    assert outs == [(False, "payload"), (True, "payload")]
    assert not [p for p in (tmp_path / "store" / "quantize").iterdir() if p.name.startswith(".tmp")]


def test_failed_build_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("stage failed")

    try:
        store.build("evaluate", "k", boom, {})
    except RuntimeError:
        pass
    assert store.get("evaluate", "k") is None
    assert [p.name for p in (tmp_path / "evaluate").iterdir()] == [".locks"]


def test_corrupted_artifact_is_detected_and_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def fn(tmp):
        calls.append(1)
        (tmp / "w.bin").write_bytes(b"abc")
        return {"m": 2}

    art, built = store.build("calibrate", "k", fn, {"config": {}})
    assert built and json.loads((art.path / "manifest.json").read_text())["metrics"] == {"m": 2}
    assert store.build("calibrate", "k", fn, {})[1] is False          # cached
    (art.path / "w.bin").write_bytes(b"abX")                           # bit rot / half write
    assert store.get("calibrate", "k") is None
    art2, built2 = store.build("calibrate", "k", fn, {})
    assert built2 and len(calls) == 2 and (art2.path / "w.bin").read_bytes() == b"abc"
