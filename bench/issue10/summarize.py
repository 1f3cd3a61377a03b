"""Tables of the fair-comparison runs (issue 10) from a results store's run manifests.

Groups the runs of `<outputs>/runs/*/*/manifest.json` by method (quant, spiking design,
granularity, recipe), averages each perplexity over calibration seeds and machines (mean ± std,
n = the number of (seed, machine) runs: the same seed on another CPU is another run, since the
far-from-FP regimes here move with floating-point summation order) and prints
one markdown row per method with equal steps, storage bits per weight, ACE (relative to FP16)
and the additive share beside the perplexities. Every number comes from the manifests.

    python bench/issue10/summarize.py outputs/issue10 [more stores or .jsonl] [--family gptq|omniquant|w4a4|...]
        [--export bench/results/issue10_gptq.jsonl] [--host SUBSTRING] [--time]

Runs of the GPTQ pipeline with quantized activations or a rotation (issue 14) are labelled
QuaRot-RTN / QuaRot-GPTQ / RTN / GPTQ W<w>A<a>KV<kv> (+ SpikeLLM t2/t4) and grouped under the
family "w<w>a<a>".
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def method_label(cfg: dict) -> tuple:
    """A sortable key and a readable name of the method a run used (seed excluded)."""
    q, s = cfg["quant"], cfg["spiking"]
    g = q["group_size"]
    gran = "per-row" if not g else f"g{g}"
    if q["method"] == "omniquant":
        recipe = f"let_lr {q['let_lr']:g}, α {q['alpha']:g}{', aug_loss' if q.get('aug_loss') else ''}"
        base = f"W{q['wbits']}A{q['abits']}"
        if s["mode"] == "none":
            name = ("RTN " if not (q["lwc"] or q["let"]) or q["epochs"] == 0 and not q["let"] else
                    "OmniQuant ") + base
        else:
            name = f"SpikeLLM {base} {'t2' if s['addbit'] == 1 else 't4'}" + \
                   (" random" if s["select"] == "random" else "")
        return ("omniquant", q["k_axis"], name, recipe), f"{name} (K {q['k_axis']}; {recipe})"
    rotated = (cfg.get("rotate") or {}).get("mode", "none") != "none"
    if q["method"] in ("rtn", "gptq") and (q.get("abits", 16) < 16 or rotated):
        # the rotation table (issue 14): QuaRot's grid with and without the rotation, + GIF spiking
        a = q.get("abits", 16)
        grid = f"W{q['wbits']}A{a}" + (f"KV{q.get('kv_bits') or a}" if a < 16 else "")
        name = ("QuaRot-" if rotated else "") + q["method"].upper()
        if s["mode"] == "gif":
            name += f" + SpikeLLM {'t2' if s['addbit'] == 1 else 't4'}" + \
                (" random" if s["select"] == "random" else "")
        rank = (0 if q["method"] == "rtn" else 1) + (2 if rotated else 0) + (4 if s["mode"] == "gif" else 0)
        return (f"w{q['wbits']}a{a}", rank, name), f"{name} {grid}"
    if q["method"] == "pbllm":
        name = f"PB-LLM {q['salient_frac']:.0%} at {q['high_bits']} bits"
    elif s["mode"] == "ternary":
        name = (f"SpikeLLM ternary {s['ratio']:.0%} x {s['steps']}, {s['granularity']} "
                f"{s['select']}")
    else:
        name = f"{q['method'].upper()} W{q['wbits']}"
    rank = {"rtn": 0, "gptq": 1, "pbllm": 2}.get(q["method"], 3) + (3 if s["mode"] == "ternary" else 0)
    return ("gptq", g, rank, name), f"{name}, {gran}"


def load(source: Path) -> list[dict]:
    """Runs of a results store (its run manifests) or of an exported `.jsonl` record file."""
    if source.suffix == ".jsonl":
        return [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    runs = []
    for f in sorted(source.glob("runs/*/*/manifest.json")):
        m = json.loads(f.read_text())
        runs.append({"cfg": m["config"], "metrics": m["metrics"], "path": str(f),
                     "command": m.get("command"), "versions": m.get("versions", {}),
                     "host": _machine()})
    return runs


def _machine() -> str:
    """The CPU the runs were measured on (numbers move across machines: README)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def export(runs: list[dict], out: Path) -> None:
    """Append the runs (config, metrics, command, versions, machine) to a `.jsonl` record, so
    tables can be rebuilt from committed records when the store is gone; skips runs already in."""
    have = {r["path"] for r in load(out)} if out.exists() else set()
    with out.open("a") as f:
        for r in runs:
            if r["path"] not in have:
                f.write(json.dumps(r, sort_keys=True) + "\n")


def fmt(xs: list[float], pct: bool = False) -> str:
    if not xs:
        return ""
    m = statistics.mean(xs)
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3g}") if m >= 1e4 else \
        (lambda v: f"{v:.1f}")
    if len(xs) == 1:
        return f"{f(m)} (n=1)"
    return f"{f(m)} ± {f(statistics.stdev(xs))} (n={len(xs)})"


def summarize(runs: list[dict], family: str | None = None, host: str | None = None,
              times: bool = False) -> str:
    by: dict[tuple, dict] = defaultdict(lambda: {"ppl": defaultdict(dict), "cost": {}, "name": ""})
    fp: dict[str, set] = defaultdict(set)
    hosts: dict[str, int] = defaultdict(int)
    for r in runs:
        key, name = method_label(r["cfg"])
        if family and key[0] != family or host and host not in r.get("host", ""):
            continue
        e = by[key]
        e["name"] = name
        seed = (r["cfg"]["calib"]["seed"], r.get("host", "unknown"))
        hosts[r.get("host", "unknown")] += 1
        for k, v in r["metrics"].items():
            if k.startswith(("ppl/fp/", "acc/fp/")):
                fp[k.replace("/fp/", " ")].add(round(v, 4))
            elif k.startswith("ppl/") or k.startswith("acc/") and isinstance(v, (int, float)):
                e["ppl"][k.replace("/", " ", 1)][seed] = v
            elif k.startswith("cost/") and k not in e["cost"]:
                e["cost"][k] = v
            elif times and k == "time/quantize_s":
                e["ppl"]["quantize s"][seed] = v
    cols = sorted({c for e in by.values() for c in e["ppl"]},
                  key=lambda c: (c.startswith("acc"), c.startswith("acc") and c != "acc avg",
                                 not c.startswith("ppl dev"), c))
    head = ["method", "equal steps", "storage bits/weight", "ACE vs FP16", "additive share"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by):
        e = by[key]
        c = e["cost"]
        row = [e["name"], f"{c.get('cost/avg_steps', float('nan')):.2f}",
               f"{c.get('cost/storage_bits', float('nan')):.2f}",
               f"{c.get('cost/ace_rel_fp16', float('nan')):.4f}",
               f"{c.get('cost/additive_fraction', 0.0):.1%}"]
        row += [fmt([v for _, v in sorted(e["ppl"][col].items())], pct=col.startswith("acc"))
                for col in cols]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("FP: " + ", ".join(f"{k} {sorted(v)}" for k, v in sorted(fp.items())))
    lines.append("machines (runs): " + ", ".join(f"{h} ({n})" for h, n in sorted(hosts.items())))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", type=Path, nargs="+",
                    help="paths.outputs of the runs, or exported .jsonl records")
    ap.add_argument("--family", help="gptq, omniquant, or a regime of the rotation table (w4a4, w4a8, w3a16)")
    ap.add_argument("--export", type=Path, help="also append the runs to this .jsonl record")
    ap.add_argument("--host", help="only the runs measured on a CPU whose name contains this")
    ap.add_argument("--time", action="store_true", help="add a column: quantization wall time (s)")
    a = ap.parse_args()
    runs = [r for src in a.sources for r in load(src)]
    if a.export:
        export(runs, a.export)
    print(summarize(runs, a.family, a.host, a.time))


if __name__ == "__main__":
    main()
