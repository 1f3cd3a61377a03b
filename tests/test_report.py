"""The sweep report's plot fits the sweep (pipelines.report.plot_axes, write_plots): rows as
`collect` builds them from a sweep record (the end-to-end report is in tests/test_pipeline.py)."""
from __future__ import annotations

from pipelines.report import plot_axes, table, write_plots


def _row(swept: dict, ppl: float, ace: float) -> dict:
    return {"overrides": " ".join(f"{k}={v}" for k, v in swept.items()), "state": "done",
            "swept": swept, "metrics": {"ppl/wikitext2": ppl, "ppl/fp/wikitext2": 30.0,
                                        "cost/ace_rel_fp16": ace, "time/eval_wikitext2_s": 1.0}}


def test_a_numeric_swept_key_is_the_x_axis_and_the_others_are_series(tmp_path):
    rows = [_row({"spiking.ratio": r, "spiking.select": sel}, 100 + i, 0.1)
            for i, (r, sel) in enumerate([("0.1", "saliency"), ("0.2", "saliency"), ("0.1", "random")])]
    assert plot_axes(rows) == ("spiking.ratio", ["spiking.select"])
    (title, path), = write_plots(rows, tmp_path)
    assert title == "ppl/wikitext2 against spiking.ratio" and path.read_bytes()[:4] == b"\x89PNG"
    head, body = table(rows)
    assert head[:3] == ["spiking.ratio", "spiking.select", "state"] and "time/eval_wikitext2_s" not in head
    assert body[2][:2] == ["0.1", "random"]


def test_a_sweep_over_choices_is_plotted_against_cost():
    rows = [_row({"spiking": m}, p, a) for m, p, a in (("none", 600, 0.066), ("t2", 350, 0.072))]
    assert plot_axes(rows) == ("cost/ace_rel_fp16", ["spiking"])
