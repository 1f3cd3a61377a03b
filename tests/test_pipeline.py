"""The real CLI, end to end, on the real embedded model and real WikiText-2 (reduced sizes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, data_dir

REDUCED = ["calib.nsamples=4", "calib.seqlen=128", "eval.seqlen=128", "eval.max_windows=2",
           "progress=false"]


def _run(args, tmp_path, env_extra=None):
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.run", f"paths.outputs={tmp_path}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("override,key", [("quant.wbits=0", "quant.wbits"),
                                          ("spiking.ratio=1.5", "spiking.ratio"),
                                          ("model=unknown_model", "model=unknown_model")])
def test_bad_override_exits_nonzero_with_one_line(override, key, tmp_path):
    p = _run([override], tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("error:")
    assert not any(tmp_path.iterdir())                      # nothing started


def test_missing_data_dir_is_one_line_error(tmp_path):
    p = _run(REDUCED + [f"paths.data_dir={tmp_path / 'nodata'}"], tmp_path / "out")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "wiki.valid.raw" in err and "nodata" in err


def test_default_pipeline_end_to_end_reduced(tmp_path):
    p = _run(REDUCED, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest_path = Path(p.stdout.strip().splitlines()[-1].split("results: ")[-1])
    m = json.loads(manifest_path.read_text())
    metrics = m["metrics"]
    for key in ("ppl/wikitext2", "ppl/fp/wikitext2", "cost/avg_steps", "cost/ace",
                "time/quantize_s", "mem/peak_gb"):
        assert key in metrics and metrics[key] == metrics[key]      # present, not NaN
    assert metrics["ppl/wikitext2"] > metrics["ppl/fp/wikitext2"] > 1
    assert abs(metrics["cost/avg_steps"] - 1.4) < 0.01
    assert m["config"]["spiking"]["mode"] == "ternary" and m["choices"]["quant"] == "gptq"
    assert m["calibration"]["windows"] == [4, 128]
    stats = json.loads((manifest_path.parent / "module_stats.json").read_text())
    assert len(stats) == 30 * 7 and all(r["loss"] >= 0 for r in stats)
    assert "ppl/wikitext2" in p.stdout and "results:" in p.stdout
    # the FP perplexity and the calibration windows are cached for the next run
    assert list((tmp_path / "cache" / "fp_ppl").glob("*.json"))
