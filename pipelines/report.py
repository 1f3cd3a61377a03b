"""`python -m pipelines.report <sweep dir>`: the sweep table (markdown and HTML) and plots
(perplexity against average steps, one series per selection) from the results store.

Works from the sweep record alone (plan.json, stage states, artifact manifests), so it also
reports a SLURM sweep that was submitted without waiting."""
from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path


def collect(sweep_dir: Path) -> list[dict]:
    """One row per sweep point: its overrides, state and the metrics of its stages."""
    plan = json.loads((sweep_dir / "plan.json").read_text())
    rows = []
    for p in plan["points"]:
        metrics, state, cfg = {}, "done", {}
        for stage, node_id in p["nodes"].items():
            f = sweep_dir / "state" / (node_id.replace("/", "__") + ".json")
            st = json.loads(f.read_text()) if f.exists() else {"state": "queued"}
            if st["state"] not in ("done", "cached"):
                state = st["state"]
                continue
            man = json.loads((Path(st["path"]) / "manifest.json").read_text())
            metrics.update(man.get("metrics", {}))
            if stage == "quantize":
                cfg = man.get("config", {})
        rows.append({"overrides": " ".join(p["overrides"]) or "(defaults)", "state": state,
                     "metrics": metrics, "spiking": cfg.get("spiking", {})})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-2) else f"{v:.3f}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in rows for k in r["metrics"] if not k.startswith("time/eval")},
                  key=lambda k: (not k.startswith("ppl/"), k))
    head = ["point", "state"] + keys
    body = [[r["overrides"], r["state"]] + [_fmt(r["metrics"].get(k)) for k in keys] for r in rows]
    return head, body


def markdown(head, body) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def svg_plot(rows: list[dict], x_key="cost/avg_steps", y_key="ppl/wikitext2") -> str:
    """Perplexity (log scale) against average steps, one series per spiking.select."""
    pts = [(r["metrics"][x_key], r["metrics"][y_key], r["spiking"].get("select", "?"))
           for r in rows if x_key in r["metrics"] and y_key in r["metrics"]]
    if not pts:
        return "<p>(no finished points to plot)</p>"
    W, H, pad = 560, 360, 60
    xs = [p[0] for p in pts]
    ys = [math.log10(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(v):
        return pad + (v - x0) / (x1 - x0) * (W - 2 * pad)

    def sy(v):
        return H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad)

    colors = {"saliency": "#1f77b4", "random": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">{x_key}</text>',
             f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">'
             f'{y_key} (log)</text>']
    for v in (x0, x1):
        parts.append(f'<text x="{sx(v)}" y="{H - pad + 15}" text-anchor="middle" font-size="11">{v:.3g}</text>')
    for v in (y0, y1):
        parts.append(f'<text x="{pad - 5}" y="{sy(v)}" text-anchor="end" font-size="11">{10 ** v:.3g}</text>')
    for sel in sorted({p[2] for p in pts}):
        series = sorted((p[0], math.log10(p[1])) for p in pts if p[2] == sel)
        c = colors.get(sel, "#2ca02c")
        if len(series) > 1:
            d = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in series)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{c}"/>')
        parts += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="4" fill="{c}"/>' for a, b in series]
        parts.append(f'<text x="{W - pad}" y="{pad + 15 * (1 + sorted(colors).index(sel) if sel in colors else 3)}" '
                     f'fill="{c}" text-anchor="end">{html.escape(sel)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    rows = collect(sweep_dir)
    head, body = table(rows)
    md = sweep_dir / "report.md"
    md.write_text(f"# Sweep {sweep_dir}\n\n" + markdown(head, body))
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    page = (f"<html><head><meta charset='utf-8'><title>spikellm sweep</title></head><body>"
            f"<h1>Sweep {html.escape(str(sweep_dir))}</h1>"
            f"<table border='1' cellspacing='0' cellpadding='4'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table>"
            f"<h2>Perplexity against average steps (saliency vs random)</h2>{svg_plot(rows)}"
            f"</body></html>")
    out = sweep_dir / "report.html"
    out.write_text(page)
    return out, md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or not (Path(argv[0]) / "plan.json").exists():
        print("usage: python -m pipelines.report <sweep dir containing plan.json>", file=sys.stderr)
        return 2
    out, md = write_report(Path(argv[0]))
    print(md.read_text())
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
