"""`dry_run=true`: every model config is planned on meta tensors (no weights exist here: the 7B-70B
checkpoints are what users bring on their clusters)."""
from __future__ import annotations

import json

import pytest

from pipelines.config import compose_config, group_options
from pipelines.dryrun import dry_run, plan_sweep
from spikellm.footprint import arch_config, footprint, meta_model


@pytest.mark.parametrize("quant", ["gptq", "omniquant"])
@pytest.mark.parametrize("model", group_options("model"))
def test_dry_run_of_every_model_config_fits_its_requested_resources(model, quant, tmp_path, capsys):
    cfg = compose_config([f"model={model}", f"quant={quant}", "dry_run=true", f"paths.outputs={tmp_path}"])
    assert dry_run([cfg]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "quantize" in out and "SLURM request" in out and "error:" not in out
    plan = json.loads((tmp_path / "dry_run.json").read_text())
    q = next(s for s in plan["stages"] if s["stage"] == "quantize")
    assert q["host_gb"] > 0 and q["disk_gb"] > 0 and q["time_s"] > 0
    if model.startswith("llama"):
        assert q["gpu_gb"] > 1 and q["resources"]["gpus"] == 1 and "streamed" in q["note"]


def test_llama2_70b_shapes_from_meta_tensors():
    fp = footprint(meta_model(arch_config(dict(layers=80, hidden=8192, intermediate=28672, heads=64,
                                                kv_heads=8, vocab=32000))))
    assert fp.n_blocks == 80 and fp.block_params == 2 * 8192 ** 2 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    assert round(fp.params / 1e9, 2) == 68.98           # LLaMA-2-70B
    assert [i for _, _, i in fp.linears] == [8192] * 6 + [28672]


@pytest.mark.parametrize("quant", ["gptq", "omniquant"])
def test_streaming_keeps_70b_quantize_on_one_gpu_and_whole_model_does_not(quant, tmp_path):
    stream = compose_config(["model=llama2_70b", f"quant={quant}", "dry_run=true"])
    whole = compose_config(["model=llama2_70b", f"quant={quant}", "dry_run=true", "model.stream=false"])
    rows_s, err_s = plan_sweep([stream])
    rows_w, err_w = plan_sweep([whole])
    q_s = next(sp for _, sp in rows_s if sp.stage == "quantize")
    q_w = next(sp for _, sp in rows_w if sp.stage == "quantize")
    assert q_w.host_gb - q_s.host_gb > 120          # 138 GB of fp16 weights vs one block
    assert q_s.host_gb < 20 and "streamed" in q_s.note
    assert not err_s
    assert any("quantize: needs" in e and "model.stream=true" in e for e in err_w)


def test_streamed_evaluation_plans_70b_on_one_gpu_and_one_block_of_host_memory():
    rows, errors = plan_sweep([compose_config(["model=llama2_70b", "quant=omniquant", "eval.stream=true",
                                               "dry_run=true"])])
    evals = [sp for _, sp in rows if sp.stage.startswith("evaluate")]
    assert not errors and len(evals) == 2
    assert all(sp.resources["gpus"] == 1 and sp.host_gb < 20 and "streamed" in sp.note for sp in evals)


@pytest.mark.parametrize("override,fix", [("model.resources.eval_gpus=1", "model.resources.eval_gpus"),
                                          ("model.resources.mem_gb=100", "model.resources.mem_gb"),
                                          ("plan.gpu_mem_gb=24", "calib.nsamples")])
def test_dry_run_fails_early_naming_the_fix(override, fix, tmp_path, capsys):
    cfg = compose_config(["model=llama2_70b", "quant=gptq", "dry_run=true", override,
                          f"paths.outputs={tmp_path}"])
    assert dry_run([cfg]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert errors and any(fix in e for e in errors)
