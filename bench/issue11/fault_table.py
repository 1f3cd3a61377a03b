"""Issue 11's fault table, re-run: each fault injected through the real CLI on the embedded model
(reduced sizes), with its command, exit code, first line and whether the result was correct and
nothing was lost. Prints a markdown table; every cell is measured here.

    SPIKELLM_DATA_DIR=../shared/data .venv/bin/python bench/issue11/fault_table.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SPIKELLM_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
BASE = ["calib.nsamples=4", "calib.seqlen=128", "eval.seqlen=128", "eval.max_windows=2",
        "progress=false", "launcher=local", "logger=none", "eval.fp_baseline=false",
        "spiking.ratio=0.1"]


def cli(args, outputs, cwd=ROOT, wait=True):
    cmd = [sys.executable, "-m", "pipelines.run", f"paths.outputs={outputs}", *BASE, *args]
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(DATA), OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def manifest(p) -> dict | None:
    """The run manifest a successful CLI call printed the path of."""
    for line in p.stdout.splitlines():
        if line.startswith("results: "):
            return json.loads(Path(line.split("results: ", 1)[1]).read_text())
    return None


def ppl(p) -> float:
    m = manifest(p)
    return m["metrics"]["ppl/wikitext2"] if m else float("nan")


def first(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith(("error:", "interrupted", "[spikellm] cache:",
                                                                 "[spikellm] checkpoint", "[spikellm] lock",
                                                                 "[spikellm] stage "))]
    return (lines[0] if lines else (p.stderr.strip().splitlines() or [""])[-1])[:150]


def states(outputs: Path) -> dict[str, int]:
    sweep = sorted((outputs / "sweeps").glob("*/*"))[-1]
    out: dict[str, int] = {}
    for f in (sweep / "state").glob("*.json"):
        st = json.loads(f.read_text())
        k = f"{st['stage']}:{st['state']}"
        out[k] = out.get(k, 0) + 1
    return out


def weights(p) -> dict:
    """The quantized weights of the run a successful CLI call `p` reported (its manifest names
    the quantize artifact; a store may hold several)."""
    from safetensors.torch import load_file
    return load_file(str(Path(manifest(p)["artifacts"]["quantize"]) / "weights.safetensors"))


def same_weights(a, b) -> bool:
    import torch
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def copy_data(dst: Path, shuffle: bool) -> Path:
    shutil.copytree(DATA / "wikitext-2-raw-v1", dst / "wikitext-2-raw-v1")
    if shuffle:
        for name in ("wiki.valid.raw", "wiki.test.raw"):
            f = dst / "wikitext-2-raw-v1" / name
            lines = f.read_text(encoding="utf-8").split("\n")
            random.Random(0).shuffle(lines)
            f.write_text("\n".join(lines), encoding="utf-8")
    return dst


def wait_blocks(out: Path, n: int, proc) -> None:
    while len(list(out.glob("cache/quantize/.ckpt-*/*/block-*.json"))) < n:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read()[-2000:])
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="faults-"))
    rows = []

    def row(fault, command, p, correct, lost="nothing"):
        rows.append((fault, command, p.returncode, first(p), correct, lost))
        print(rows[-1], file=sys.stderr, flush=True)

    # reference: the same run in a fresh store
    ref = work / "ref"
    r0 = cli([], ref)
    assert r0.returncode == 0, r0.stderr[-2000:]
    ref_ppl = ppl(r0)

    # 1. data content changed under the same data_dir string
    d = copy_data(work / "data", shuffle=False)
    s1 = work / "s1"
    cli([f"paths.data_dir={d}"], s1)
    shutil.rmtree(d)
    copy_data(d, shuffle=True)
    p = cli([f"paths.data_dir={d}"], s1)
    fresh = cli([f"paths.data_dir={d}"], work / "s1-fresh")
    row("data file content changed (shuffled lines, same path)", "paths.data_dir=<copy>, rerun", p,
        f"recomputed: {ppl(p):.2f} = fresh store {ppl(fresh):.2f} (was {ref_ppl:.2f}); "
        f"states {states(s1)}")

    # 2. batch_size changes the weights: now a different key
    p = cli(["batch_size=2"], ref)
    fresh = cli(["batch_size=2"], work / "s2-fresh")
    row("batch_size=2 after the default 8", "batch_size=2", p,
        f"recomputed ({states(ref).get('quantize:done', 0)} quantize run): {ppl(p):.2f} = fresh "
        f"{ppl(fresh):.2f}; default was {ref_ppl:.2f}")

    # 3. code changed (a copy of the repo with one method file edited)
    repo = work / "repo"
    repo.mkdir()
    subprocess.run(f"git -C {ROOT} archive HEAD | tar -x -C {repo}", shell=True, check=True,
                   executable="/bin/bash")
    (repo / ".venv").symlink_to(ROOT / ".venv")
    s3 = work / "s3"
    cli([], s3, cwd=repo)
    g = repo / "spikellm" / "gptq.py"
    g.write_text(g.read_text() + "\n# an edit\n")
    p = cli([], s3, cwd=repo)
    row("method source edited (spikellm/gptq.py)", "same command after the edit", p,
        f"recomputed: states {states(s3)}")

    # 4. a cached perplexity edited by hand
    m = Path(manifest(r0)["artifacts"]["evaluate"]) / "manifest.json"
    m.write_text(m.read_text().replace(f"{ref_ppl}", "12.345", 1))
    p = cli([], ref)
    row("a digit of a cached ppl edited in manifest.json", "rerun", p,
        f"detected, recomputed: {ppl(p):.2f} (true {ref_ppl:.2f})", "the edited copy kept as .corrupt-*")

    # 5. SIGTERM, then SIGINT mid-quantize; 6. a truncated block checkpoint on resume
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        out = work / f"sig-{name}"
        proc = cli([], out, wait=False)
        wait_blocks(out, 3, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        st = states(out)
        p_int = subprocess.CompletedProcess([], proc.returncode, "", err)
        row(f"{name} mid-quantize", f"kill -{name[3:]} <pid>", p_int, f"state {st}",
            "finished stages and committed blocks kept")
        if name == "SIGINT":          # damage the newest block before resuming
            newest = sorted(out.glob("cache/quantize/.ckpt-*/*/block-*.pt"))[-1]
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        p = cli([], out)
        label = "resume after SIGINT with the newest block file truncated" if name == "SIGINT" \
            else "resume after SIGTERM"
        row(label, "same command", p,
            f"resumed; weights bit-equal to an uninterrupted run: {same_weights(r0, p)}; "
            f"ppl {ppl(p):.2f}")

    # 7. outputs that cannot be written
    f = work / "afile"
    f.write_text("x")
    p = cli([], f)
    row("paths.outputs is a file", f"paths.outputs={f.name}", p, "nothing started")
    o = work / "runs-file"
    o.mkdir()
    (o / "runs").write_text("x")
    p = cli([], o)
    row("outputs/runs is a file (root ignores chmod here)", "paths.outputs=<dir>", p, "nothing started")

    # 8. context length, device, encoding
    p = cli(["eval.seqlen=100000"], work / "ctx")
    row("eval.seqlen=100000 (model: 8192 positions)", "eval.seqlen=100000", p, "nothing started")
    p = cli(["device=cuda"], work / "cuda")
    row("device=cuda on a CPU machine", "device=cuda", p, "checked before calibrate")
    bad = copy_data(work / "bad", shuffle=False)
    t = bad / "wikitext-2-raw-v1" / "wiki.test.raw"
    t.write_bytes(t.read_bytes()[:5000] + b"\xff\xfe\n")
    p = cli([f"paths.data_dir={bad}"], work / "utf8")
    row("a data file that is not UTF-8", "paths.data_dir=<dir with a bad byte>", p,
        "file named; calibrate and quantize kept for the rerun")

    # 9. two processes on one key
    two = work / "two"
    procs = [cli([], two, wait=False) for _ in range(2)]
    outs = [pr.communicate(timeout=1800) for pr in procs]
    done = 0                      # a waiter that finds the artifact records it as cached
    for sw in (two / "sweeps").glob("*/*"):
        for fst in (sw / "state").glob("quantize__*.json"):
            done += json.loads(fst.read_text())["state"] == "done"
    built = len(list((two / "cache" / "quantize").glob("[0-9a-f]*")))
    waited = any("waiting for" in e for _, e in outs)
    p = subprocess.CompletedProcess([], max(pr.returncode for pr in procs), "",
                                    next((e for _, e in outs if "waiting for" in e), outs[1][1]))
    row("two processes, one key, at once", "the same command twice", p,
        f"quantize computed {done} time(s), {built} artifact; a 'waiting for' line: {waited}")

    # 10. a stale lock left by a killed process on this host
    import socket
    dead = subprocess.Popen(["true"])
    dead.wait()
    ev = Path(manifest(r0)["artifacts"]["evaluate"])
    shutil.rmtree(ev)                                   # the evaluate stage must run again...
    (ev.parent / ".locks" / f"{ev.name}.lock").write_text(json.dumps(  # ...behind a dead owner's lock
        {"host": socket.gethostname(), "pid": dead.pid, "since": time.time() - 60}))
    p = cli([], ref)
    row("a lock file left by a killed process", "rerun", p, f"taken over; ppl {ppl(p):.2f}")

    print("| fault | command | exit | first line | result | lost |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
