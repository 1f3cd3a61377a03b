"""Zero-shot accuracy through the real lm-eval on the real embedded model and local task files."""
from __future__ import annotations

import pytest
import torch

from pipelines.zeroshot import LOCAL, local_task_specs, zero_shot
from spikellm.config import QuantConfig, SpikingConfig

#: items per local file, as the data README lists them
COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042,
          "winogrande": 1267}


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_local_files_convert_to_the_hub_schema(task, data_root):
    docs = LOCAL[task][0](data_root)
    assert len(docs) == COUNTS[task]
    d = docs[0]
    if task == "piqa":
        assert set(d) == {"goal", "sol1", "sol2", "label"} and d["label"] in (0, 1)
    elif task.startswith("arc"):
        assert d["answerKey"] in d["choices"]["label"] and len(d["choices"]["text"]) >= 3
    elif task == "boolq":
        assert d["label"] == 0 and sum(x["label"] for x in docs) == 2033    # README: 2,033 true
    elif task == "hellaswag":
        assert d["query"].startswith("Roof shingle removal") and d["label"] == 3 and len(d["choices"]) == 4
    else:
        assert d["answer"] in ("1", "2") and "_" in d["sentence"]


def test_missing_task_data_is_skipped_with_one_warning(tmp_path, data_root):
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    for f in ("valid.jsonl", "valid-labels.lst"):
        (tmp_path / "data" / "piqa" / f).write_bytes((data_root / "piqa" / f).read_bytes())
    warnings = []
    specs = local_task_specs(["piqa", "boolq"], tmp_path / "data", tmp_path / "cache", warnings.append)
    assert [s["task"] for s in specs] == ["piqa"]
    assert len(warnings) == 1 and "boolq" in warnings[0] and "skipped" in warnings[0]


def test_in_memory_quantized_model_is_the_one_scored(fresh_smollm, data_root, tmp_path):
    """The accuracy changes when the in-memory model is quantized (RTN W2: destroyed)."""
    from spikellm.quantize import quantize
    lm = fresh_smollm
    kw = dict(data_dir=data_root, cache_dir=tmp_path, batch_size=16, limit=40)
    fp = zero_shot(lm.model, lm.tokenizer, ["arc_easy"], **kw)
    assert fp["n/arc_easy"] == 40 and fp["acc/avg"] == fp["acc/arc_easy"]
    assert 0.4 < fp["acc/arc_easy"] <= 1 and "acc_norm/arc_easy" in fp
    calib = torch.zeros(1, 16, dtype=torch.long)
    quantize(lm.model, calib, QuantConfig(method="rtn", wbits=2), SpikingConfig(mode="none"),
             progress=False, log=lambda *_: None)
    q = zero_shot(lm.model, lm.tokenizer, ["arc_easy"], **kw)
    assert q["acc/arc_easy"] != fp["acc/arc_easy"] and q["acc/arc_easy"] < fp["acc/arc_easy"]


N_DOCS = 8


def _loglikelihoods(model, tokenizer, data_root, cache_dir, batch_size) -> torch.Tensor:
    """Per document of the first N_DOCS piqa items, its choices' log-likelihoods [N_DOCS, 2]."""
    from pipelines.zeroshot import run_tasks
    res = run_tasks(model, tokenizer, ["piqa"], data_root, cache_dir, batch_size=batch_size,
                    limit=N_DOCS, log_samples=True)
    docs = sorted(res["samples"]["piqa"], key=lambda d: d["doc_id"])
    return torch.tensor([[float(r[0][0]) for r in d["resps"]] for d in docs], dtype=torch.float64)


@pytest.mark.parametrize("k_axis", ["token", "channel",
                                    # causal like token (test_omniquant checks that it is): slow
                                    pytest.param("channel_static", marks=pytest.mark.slow)])
def test_w4a4_log_likelihoods_do_not_depend_on_the_batch_size(k_axis, data_root, tmp_path, capsys,
                                                              monkeypatch):
    """lm-eval right-pads a batch and passes no attention mask: with causal quantizers the pads
    cannot reach a real position; SpikeLLM's per-channel K is scored one request at a time.

    The model runs in float64 (its quantizers then compute in float64): in float32 the matmuls
    of a padded batch round differently from the unpadded ones (~1 ulp), and a W4A4 quantizer
    can turn such a difference into a different code; this test is about the pads, not that."""
    import pipelines.zeroshot as zs
    from spikellm.data import CalibSpec, calibration_set
    from spikellm.models import load_model, resolve_source
    from spikellm.omniquant import omniquant
    lm = load_model(resolve_source("embedded", None))
    calib = calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 2, 32, 2), data_root)
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=0, k_axis=k_axis)
    omniquant(lm.model, calib, q, SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2), progress=False)
    lm.model.double()
    one = _loglikelihoods(lm.model, lm.tokenizer, data_root, tmp_path, 1)
    capsys.readouterr()
    eight = _loglikelihoods(lm.model, lm.tokenizer, data_root, tmp_path, 8)
    note = capsys.readouterr().err
    assert one.shape == (N_DOCS, 2) and torch.isfinite(one).all()
    torch.testing.assert_close(eight, one, atol=1e-6, rtol=0)
    assert ("one request at a time" in note) == (k_axis == "channel")
    if k_axis == "channel":           # without the forced batch 1 the pads do change the scores
        monkeypatch.setattr(zs, "scoring_batch_size", lambda model, bs, note: bs)
        padded = _loglikelihoods(lm.model, lm.tokenizer, data_root, tmp_path, 8)
        assert (padded - one).abs().max() > 1e-2


def test_only_per_channel_k_forces_batch_one():
    from pipelines.zeroshot import has_non_causal_kv, scoring_batch_size
    from spikellm.omni_attention import KVQuantizer
    notes = []
    for axis, expect in (("token", 8), ("channel_static", 8), ("channel", 1)):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), KVQuantizer(4, 2, 8, axis))
        assert has_non_causal_kv(model) == (axis == "channel")
        assert scoring_batch_size(model, 8, notes.append) == expect
    assert len(notes) == 1 and "quant.k_axis=channel" in notes[0] and "\n" not in notes[0]


def test_few_shot_reports_standard_errors_and_saves_lm_evals_results(fresh_smollm, data_root, tmp_path):
    """eval.num_fewshot reaches lm-eval; acc_stderr/<task> is lm-eval's analytic standard error
    sqrt(acc (1 - acc) / (n - 1)); lm-eval's own results JSON is written."""
    import json
    import math
    lm = fresh_smollm
    out = zero_shot(lm.model, lm.tokenizer, ["piqa"], data_dir=data_root, cache_dir=tmp_path,
                    batch_size=8, limit=6, num_fewshot=1, results_file=tmp_path / "res.json")
    acc, n = out["acc/piqa"], out["n/piqa"]
    assert n == 6 and out["acc_stderr/piqa"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["n-shot"]["piqa"] == 1 and saved["results"]["piqa"]["acc,none"] == acc
    zero = zero_shot(lm.model, lm.tokenizer, ["piqa"], data_dir=data_root, cache_dir=tmp_path,
                     batch_size=8, limit=6)
    assert zero["n/piqa"] == 6          # (0-shot and 1-shot prompts differ; both are scored)


def test_tasks_that_cannot_be_scored_are_refused_in_one_line(data_root, tmp_path, monkeypatch):
    from pipelines.zeroshot import check_tasks
    check_tasks(["piqa", "boolq"], data_root)                     # local: fine offline
    with pytest.raises(ValueError, match="lm-eval has no task 'no_such_task'"):
        check_tasks(["no_such_task"], data_root)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")               # as on this machine
    with pytest.raises(ValueError, match="lambada_openai has no local files here and the HuggingFace hub"):
        check_tasks(["piqa", "lambada_openai"], data_root)
    with pytest.raises(ValueError, match="boolq's local file boolq/val.jsonl is missing"):
        check_tasks(["boolq"], tmp_path)
