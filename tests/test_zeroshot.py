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
