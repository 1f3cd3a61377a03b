"""Faithful export (`spikellm.export`): a saved quantized model loads back to the same model.

One method of each pipeline on a tiny random-weight Qwen2 (LLaMA layout, q/k/v biases): the
GPTQ pipeline's ternary spiking weights (weight-only: a plain transformers load is the same
model) and OmniQuant/SpikeLLM W4A4 t2 (activation and K/V quantizers: a plain load must fail
loudly, `load_quantized` restores them). The pipeline's `save_model=true` on the real embedded
model is in tests/test_pipeline.py. Each case also as a packed export (`save_format=packed`:
codes in bits + FP16 scales, `spikellm.packing`): it reloads to exactly the model that was
evaluated, and a plain load of it fails loudly (the linear weights are not in the shards)."""
from __future__ import annotations

import json

import pytest
import torch

from spikellm.config import OmniQuantConfig, QuantConfig, SpikingConfig
from spikellm.export import MODEL_TYPE, load_quantized, pack_checkpoint, quantization_config, save_quantized
from spikellm.quantize import quantize
from test_families import VOCAB, tiny

CASES = {
    "ternary g64": (QuantConfig(method="gptq", group_size=32),
                    SpikingConfig(mode="ternary", ratio=0.2, steps=3, group_size=32)),
    "omniquant w4a4 t2": (OmniQuantConfig(wbits=4, abits=4, epochs=1),
                          SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)),
}


def _ids(n=4, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@pytest.fixture(scope="module", params=[(c, f) for c in CASES for f in ("dense", "packed")],
                ids=lambda p: " ".join(p))
def exported(request, tmp_path_factory):
    from safetensors.torch import save_file
    case, fmt = request.param
    q, s = CASES[case]
    model = tiny("qwen2")
    report = quantize(model, _ids(), q, s, progress=False, log=lambda *_: None, pack=fmt == "packed")
    d = tmp_path_factory.mktemp("export")
    qc = save_quantized(model, None, q, s, d)
    if fmt == "packed":
        assert len(report.packed) > 0
        save_file(report.packed, str(d.parent / f"{d.name}.packed.safetensors"))
        stats = pack_checkpoint(d, d.parent / f"{d.name}.packed.safetensors")
        assert stats["layers"] == 2 * 7                         # every linear of both blocks
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qc["packed"]["layers"] == 14
    return case, model, d, qc, q, s


def test_load_quantized_computes_what_the_quantized_model_computed(exported):
    name, model, d, qc, q, s = exported
    lm = load_quantized(d)
    assert lm.tokenizer is None          # none was saved
    ids = _ids(seed=1)
    assert torch.equal(_logits(lm.model, ids), _logits(model, ids)), name
    assert qc["quant"] == json.loads((d / "config.json").read_text())["quantization_config"]["quant"]
    assert quantization_config(d)["spiking"]["mode"] == s.mode


def test_a_plain_transformers_load_is_the_same_model_or_fails_loudly(exported):
    from transformers import AutoModelForCausalLM
    name, model, d, qc, q, s = exported
    ids = _ids(seed=1)
    if qc["runtime_tensors"] == 0 and "packed" not in qc:
        assert q.method == "gptq"
        plain = AutoModelForCausalLM.from_pretrained(d).eval()
        assert torch.equal(_logits(plain, ids), _logits(model, ids))
    else:                     # weights only (or none) would silently compute another model
        assert q.method == "omniquant" or "packed" in qc
        assert json.loads((d / "config.json").read_text())["model_type"] == MODEL_TYPE
        with pytest.raises((ValueError, KeyError), match=MODEL_TYPE):
            AutoModelForCausalLM.from_pretrained(d)


def test_load_quantized_rejects_a_plain_checkpoint_in_one_line(tmp_path):
    tiny("qwen2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a spikellm export.*load_model"):
        load_quantized(tmp_path)


def test_saving_with_configs_other_than_the_models_is_one_line_error(exported, tmp_path):
    name, model, d, qc, q, s = exported
    other_q, other_s = CASES["ternary g64" if q.method == "omniquant" else "omniquant w4a4 t2"]
    with pytest.raises(ValueError, match="pass the configs the model was quantized with"):
        save_quantized(model, None, other_q, other_s, tmp_path / "x")
