"""`python -m pipelines.report <sweep dir>`: the sweep's table (markdown and HTML) and plots
(matplotlib PNGs next to the HTML) from the results store.

The plots fit the sweep: the x axis is the first numeric swept key (e.g. `spiking.ratio`), or,
when every swept key is a choice (`spiking=none,t2,t4`, `quant=gptq,pbllm`: the sweep trades
cost), the ACE relative to FP16; one series per value of the other swept keys; every point
labelled with its swept values; perplexity on a log scale, one plot per `ppl/<dataset>`. The
table shows the swept keys, not every override.

Works from the sweep record alone (plan.json, stage states, artifact manifests), so it also
reports a SLURM sweep that was submitted without waiting."""
from __future__ import annotations

import html
import textwrap
import json
import sys
from pathlib import Path

from .config import point_values, varying_keys


def collect(sweep_dir: Path) -> list[dict]:
    """One row per sweep point: its overrides, swept values, state and its stages' metrics."""
    plan = json.loads((sweep_dir / "plan.json").read_text())
    points = [p["overrides"] for p in plan["points"]]
    keys = varying_keys(points) if len(points) > 1 else []
    rows = []
    for p in plan["points"]:
        metrics, state = {}, "done"
        for stage, node_id in p["nodes"].items():
            f = sweep_dir / "state" / (node_id.replace("/", "__") + ".json")
            st = json.loads(f.read_text()) if f.exists() else {"state": "queued"}
            if st["state"] not in ("done", "cached"):
                state = st["state"]
                continue
            man = json.loads((Path(st["path"]) / "manifest.json").read_text())
            metrics.update(man.get("metrics", {}))
        rows.append({"overrides": " ".join(p["overrides"]) or "(defaults)", "state": state,
                     "swept": point_values(p["overrides"], keys), "metrics": metrics})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-2) else f"{v:.3f}"
    return "" if v is None else str(v)


def swept_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r["swept"]))


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Columns: the swept keys (or the point's overrides when nothing varies), the state, then
    perplexities first and every other metric except per-dataset timings."""
    keys = swept_keys(rows)
    first = ("ppl/", "acc/", "cost/avg_steps", "cost/storage_bits", "cost/ace_rel_fp16", "cost/")
    metrics = sorted({k for r in rows for k in r["metrics"] if not k.startswith("time/eval")
                      and not _per_layer_rate(k)},
                     key=lambda k: (next((i for i, p in enumerate(first) if k.startswith(p)), len(first)), k))
    head = (keys or ["point"]) + ["state"] + metrics
    body = [([r["swept"].get(k, "") for k in keys] if keys else [r["overrides"]]) + [r["state"]]
            + [_fmt(r["metrics"].get(k)) for k in metrics] for r in rows]
    return head, body


def _per_layer_rate(key: str) -> bool:
    """spike/firing_rate/<block>.<role>: one per layer (in the plot and spikes.json, not the table)."""
    return key.startswith("spike/firing_rate/") and key.split("/")[-1][:1].isdigit()


def _label(r: dict, width: int = 40) -> str:
    text = " ".join(f"{k}={v}" for k, v in r["swept"].items()) or r["overrides"]
    return text if len(text) <= width else text[: width - 3] + "..."


def write_spike_plots(rows: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    """With eval.spikes: (1) the firing rate per layer, blocks on the x axis, one line per
    linear role (K/V dashed), one panel per spiking point; (2) the energy per token of every
    point: FP16 MACs, the formula-based estimate (cost/energy_pj), and the measured
    event-driven figure (cost/energy_event_pj), on a log scale. -> [(title, path)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["state"] == "done" and "cost/energy_event_pj" in r["metrics"]]
    out = []
    spiking = [r for r in done if any(_per_layer_rate(k) for k in r["metrics"])]
    if spiking:
        fig, axes = plt.subplots(len(spiking), 1, figsize=(8, 3.2 * len(spiking)), dpi=110, squeeze=False,
                                 layout="constrained")
        for ax, r in zip(axes[:, 0], spiking):
            by_role: dict[str, list] = {}
            for k, v in r["metrics"].items():
                if _per_layer_rate(k):
                    block, role = k.split("/")[-1].split(".", 1)
                    by_role.setdefault(role, []).append((int(block), v))
            for role, pts in sorted(by_role.items()):
                pts.sort()
                kv = role.endswith((".k", ".v"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if not kv else None,
                        ls="--" if kv else "-", label=role)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("block")
            ax.set_ylabel("firing rate")
            ax.set_title(f"spikes per neuron per step: {_label(r)}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, ncol=3)
        path = out_dir / "plot_firing_rate.png"
        fig.savefig(path)
        plt.close(fig)
        out.append(("firing rate per layer", path))
    if done:
        labels = ["FP16 (every MAC)"] + [_label(r) for r in done]
        fp16 = done[0]["metrics"].get("cost/energy_fp16_pj", float("nan"))
        formula = [fp16] + [r["metrics"].get("cost/energy_pj", float("nan")) for r in done]
        event = [float("nan")] + [r["metrics"]["cost/energy_event_pj"] for r in done]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5), dpi=110, layout="constrained")
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], formula, 0.4, label="formula (every GIF step paid)")
        ax.bar([x + 0.2 for x in xs], event, 0.4, label="measured, event-driven (fired spikes)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([textwrap.fill(t, 22) for t in labels], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("pJ per token (linear layers; ASSUMED constants)")
        ax.set_title("energy per token")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / "plot_energy.png"
        fig.savefig(path)
        plt.close(fig)
        out.append(("energy per token: formula vs measured", path))
    return out


def markdown(head, body) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _number(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_axes(rows: list[dict]) -> tuple[str, list[str]]:
    """(x key, series keys): the first swept key whose values are all numbers (a config key,
    x read from the swept value), else "cost/ace_rel_fp16" (x read from the metrics); the other
    swept keys split the points into series."""
    keys = swept_keys(rows)
    numeric = [k for k in keys if all(_number(r["swept"].get(k)) is not None for r in rows if k in r["swept"])]
    if numeric:
        return numeric[0], [k for k in keys if k != numeric[0]]
    return "cost/ace_rel_fp16", keys


def _x(row: dict, x_key: str) -> float | None:
    if x_key in row["swept"]:
        return _number(row["swept"][x_key])
    return row["metrics"].get(x_key)


def write_plots(rows: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    """One PNG per ppl/<dataset> metric: -> [(title, path)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, series_keys = plot_axes(rows)
    ppl_keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("ppl/") and "/fp/" not in k
                       and not k.startswith("ppl/fp/")})
    done = [r for r in rows if r["state"] == "done"]
    out = []
    for y_key in ppl_keys:
        pts = [(x, r["metrics"][y_key], r) for r in done
               if y_key in r["metrics"] and (x := _x(r, x_key)) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        groups: dict[str, list] = {}
        for x, y, r in pts:
            label = " ".join(f"{k}={r['swept'][k]}" for k in series_keys if k in r["swept"]) or y_key
            groups.setdefault(label, []).append((x, y, r))
        for label, g in groups.items():
            g.sort(key=lambda t: t[0])
            ax.plot([t[0] for t in g], [t[1] for t in g], marker="o", label=label)
            for x, y, r in g:
                ax.annotate(" ".join(f"{v}" for v in r["swept"].values()) or r["overrides"], (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        fp = {r["metrics"].get(y_key.replace("ppl/", "ppl/fp/", 1)) for r in done} - {None}
        if len(fp) == 1:
            ax.axhline(fp.pop(), color="gray", ls="--", lw=1, label="full precision")
        xs = sorted({t[0] for t in pts})
        if all(float(x).is_integer() for x in xs) and len(xs) <= 12:      # e.g. quant.wbits
            ax.set_xticks(xs)
        ax.set_yscale("log")
        ax.set_xlabel(x_key if x_key != "cost/ace_rel_fp16" else "cost/ace_rel_fp16 (ACE relative to FP16)")
        ax.set_ylabel(f"{y_key} (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{y_key} against {x_key}")
        fig.tight_layout()
        path = out_dir / f"plot_{y_key.replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        out.append((f"{y_key} against {x_key}", path))
    return out


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    rows = collect(sweep_dir)
    head, body = table(rows)
    md = sweep_dir / "report.md"
    plots = write_plots(rows, sweep_dir) + write_spike_plots(rows, sweep_dir)
    md.write_text(f"# Sweep {sweep_dir}\n\n" + markdown(head, body)
                  + "".join(f"\n![{t}]({p.name})\n" for t, p in plots))
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{html.escape(p.name)}' alt='{html.escape(t)}'>"
                   for t, p in plots) or "<p>(no finished points to plot)</p>"
    page = (f"<html><head><meta charset='utf-8'><title>spikellm sweep</title></head><body>"
            f"<h1>Sweep {html.escape(str(sweep_dir))}</h1>"
            f"<div style='overflow-x:auto'><table border='1' cellspacing='0' cellpadding='4'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table></div>"
            f"{figs}</body></html>")
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
