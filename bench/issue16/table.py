"""The issue-16 energy table from a results store's run manifests (eval.spikes=true runs):
per method, equal steps, storage bits, ACE vs FP16, the mean firing rate and per linear role,
and energy per token: FP16 (every MAC), formula-based (cost/energy_pj), measured event-driven
(cost/energy_event_pj) and their ratio. Every number comes from the manifests.

    python bench/issue16/table.py outputs/issue16 [--export bench/results/issue16_spikes.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "issue10"))
from summarize import export, load, method_label  # noqa: E402

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.k", "self_attn.v")


def rows(runs: list[dict]) -> str:
    head = ["method", "equal steps", "storage bits/weight", "ACE vs FP16", "firing rate",
            *[f"rate {r.split('.')[-1]}" for r in ROLES], "FP16 pJ/token", "formula pJ/token",
            "measured pJ/token", "measured / formula", "SOPs/token"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for r in sorted(runs, key=lambda r: r["metrics"].get("cost/ace_rel_fp16", 0)):
        m = r["metrics"]
        if "cost/energy_event_pj" not in m:
            continue
        name = method_label(r["cfg"])[1]
        if name in seen:
            continue
        seen.add(name)
        rate = lambda k: f"{m[k]:.3f}" if k in m else "-"    # noqa: E731
        out.append("| " + " | ".join([
            name, f"{m.get('cost/avg_steps', 1):.2f}", f"{m.get('cost/storage_bits', 16):.2f}",
            f"{m.get('cost/ace_rel_fp16', 1):.4f}", rate("spike/firing_rate"),
            *[rate(f"spike/firing_rate/{role}") for role in ROLES],
            f"{m['cost/energy_fp16_pj']:.3g}", f"{m['cost/energy_pj']:.3g}", f"{m['cost/energy_event_pj']:.3g}",
            f"{m.get('cost/energy_event_rel_formula', float('nan')):.3f}", f"{m['cost/sops']:.3g}"]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", type=Path, nargs="+")
    ap.add_argument("--export", type=Path)
    a = ap.parse_args()
    runs = [r for s in a.sources for r in load(s)]
    if a.export:
        export(runs, a.export)
    print(rows(runs))


if __name__ == "__main__":
    main()
