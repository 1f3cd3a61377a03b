"""The GPU block benchmark runs (tiny shape, CPU) and reports every phase of our own code."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT


def test_block_bench_reports_phases_and_peak_memory(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import block_bench
    out = tmp_path / "b.jsonl"
    assert block_bench.main(["--shape", "tiny", "--nsamples", "4", "--seqlen", "32", "--dtype", "float32",
                             "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"gptq_w4", "gptq_ternary", "omni_w4a4_t2"}
    for m in ("gptq_w4", "gptq_ternary"):
        ph = rows[m]["phases_s"]
        assert set(ph) == {"capture", "forward_hessian", "saliency", "solve"}
        assert all(v > 0 for v in ph.values())
        assert sum(ph.values()) == pytest.approx(rows[m]["total_s"])
    assert rows["omni_w4a4_t2"]["phases_s"]["epoch"] == pytest.approx(rows["omni_w4a4_t2"]["total_s"] / 2)
    assert all(r["peak_gb"] > 0 for r in rows.values())
