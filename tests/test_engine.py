"""The plug-in contract of the one block-wise engine: every registered method (RTN, GPTQ,
PB-LLM, ternary spiking, OmniQuant/SpikeLLM W4A4 and W2A16) runs on it, resumes after a kill
mid-block with bit-equal weights, and streamed from shards (one block in memory) gives the
same model as the whole-model run. On the real embedded model cut to 6 blocks (`src`)."""
from __future__ import annotations

import pytest
import torch

from conftest import count_materialized
from spikellm import methods
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.models import blocks_of, load_model
from spikellm.quantize import quantize
from spikellm.streaming import materialized_parameters, open_streaming

CASES = {
    "rtn w3": (QuantConfig(method="rtn", wbits=3), SpikingConfig()),
    "gptq w3 g64": (QuantConfig(method="gptq", wbits=3, group_size=64), SpikingConfig()),
    "pbllm": (QuantConfig(method="pbllm"), SpikingConfig()),
    "ternary column g64": (QuantConfig(method="gptq", group_size=64),
                           SpikingConfig(mode="ternary", ratio=0.2, steps=3, group_size=64, granularity="column")),
    "omniquant w4a4 t2": (QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1),
                          SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)),
    "omniquant w2a16 gif weights": (QuantConfig(method="omniquant", wbits=2, abits=16, epochs=1, group_size=64),
                                    SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2, target="weight")),
}


def _ids():
    return torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))


def _run(model, q, s, **kw):
    return quantize(model, _ids(), q, s, progress=False, log=lambda *_: None, **kw)


def test_every_registered_method_has_a_contract_case():
    assert {q.method for q, _ in CASES.values()} == set(methods.METHODS)


@pytest.fixture(scope="module")
def whole(src):
    """name -> (state dict, report) of the whole-model run of each case."""
    out = {}
    for name, (q, s) in CASES.items():
        lm = load_model(str(src))
        report = _run(lm.model, q, s)
        out[name] = ({k: v.clone() for k, v in lm.model.state_dict().items()}, report)
    return out


def dies_in_block(real, k: int):
    """A method factory whose plug-in dies (KeyboardInterrupt) after processing block k, before
    the engine commits it: block k is changed in memory, its checkpoint never written."""
    def factory(*a, **kw):
        m = real(*a, **kw)
        process = m.process

        def killed(i, block, inputs):
            res = process(i, block, inputs)
            if i == k:
                raise KeyboardInterrupt("killed")
            return res
        m.process = killed
        return m
    return factory


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("name", list(CASES))
def test_a_method_reports_costs_for_every_linear(name, whole):
    _, report = whole[name]
    assert len(report.costs) == 6 * 7 and report.cost["ace"] > 0
    assert report.cost["ace_rel_baseline"] >= 1.0 - 1e-9
    assert report.cost["storage_bits"] < 16


@pytest.mark.parametrize("name", list(CASES))
def test_killed_mid_block_then_resumed_equals_the_uninterrupted_run(name, whole, src, tmp_path, monkeypatch):
    q, s = CASES[name]
    real = methods.METHODS[q.method]
    ckpt = tmp_path / "ckpt"
    monkeypatch.setitem(methods.METHODS, q.method, dies_in_block(real, 3))
    with pytest.raises(KeyboardInterrupt):
        _run(load_model(str(src)).model, q, s, checkpoint_dir=ckpt)
    monkeypatch.setitem(methods.METHODS, q.method, real)
    assert len(list(ckpt.glob("block-*.json"))) == 3
    resumed = load_model(str(src))                 # a fresh process
    report = _run(resumed.model, q, s, checkpoint_dir=ckpt)
    _same(resumed.model.state_dict(), whole[name][0])
    assert report.cost == whole[name][1].cost and len(report.stats) == len(whole[name][1].stats)


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_from_shards_holds_one_block_and_equals_the_whole_model_run(name, whole, src, tmp_path):
    from transformers import AutoTokenizer
    q, s = CASES[name]
    stream = open_streaming(src, tmp_path / "q", dtype="float32")
    one_block = sum(p.numel() for p in blocks_of(stream.model)[0].parameters())
    rest = materialized_parameters(stream.model)
    seen = []
    count_materialized(stream, seen)
    report = _run(stream.model, q, s, stream=stream)
    assert len(seen) == 6 and max(seen) == rest + one_block           # never two blocks
    out = stream.finish(AutoTokenizer.from_pretrained(str(src)))
    lm = load_model(str(out))                      # transformers' from_pretrained: weights only
    methods.restore_quantized(lm.model, lm.spec, q, s, out)           # + the quantizers' buffers
    _same(lm.model.state_dict(), whole[name][0])
    assert report.cost == whole[name][1].cost


@pytest.mark.parametrize("name", ["fp", "omniquant w4a4 t2"])
def test_streamed_perplexity_equals_the_whole_model_perplexity(name, src, tmp_path):
    """Block by block from the shards (eval.stream) vs the whole model, on real text ids."""
    from spikellm.evaluate import perplexity, streamed_perplexities, streamed_perplexity
    windows = torch.randint(0, 4000, (5, 48), generator=torch.Generator().manual_seed(3))
    ckpt = src
    if name != "fp":
        from transformers import AutoTokenizer
        q, s = CASES[name]
        st = open_streaming(src, tmp_path / "q", dtype="float32")
        _run(st.model, q, s, stream=st)
        ckpt = st.finish(AutoTokenizer.from_pretrained(str(src)))
    whole = load_model(str(ckpt))
    st = open_streaming(ckpt, None, dtype="float32")
    if name != "fp":
        methods.restore_quantized(whole.model, whole.spec, q, s, ckpt)
        methods.make_method(q, s, st.spec).restore_for_inference(st.model)
    seen = []
    count_materialized(st, seen)
    got = streamed_perplexity(st.model, windows, st, batch_size=2)
    assert len(seen) == 6 and max(seen) == materialized_parameters(st.model) + \
        sum(p.numel() for p in blocks_of(whole.model)[0].parameters())
    assert got == pytest.approx(perplexity(whole.model, windows, batch_size=2), rel=1e-6)
    # several sets (eval.datasets) share one pass: each block is materialized once for all
    other = torch.randint(0, 4000, (3, 48), generator=torch.Generator().manual_seed(4))
    seen.clear()
    both = streamed_perplexities(st.model, {"a": windows, "b": other}, st, batch_size=2)
    assert len(seen) == 6
    assert both["a"] == pytest.approx(got, rel=1e-6)
    assert both["b"] == pytest.approx(perplexity(whole.model, other, batch_size=2), rel=1e-6)


def test_the_notebook_api_runs_the_main_jobs_method(src):
    """`from spikellm import quantize, GPTQConfig, TernarySpiking` on an in-memory HF model: the
    README's example configs are the main job's (composed from conf/), so the same weights."""
    from pipelines.config import compose_config
    from pipelines.dag import method_configs
    from spikellm import GIFSpiking, GPTQConfig, OmniQuantConfig, TernarySpiking, perplexity
    from spikellm import quantize as api_quantize
    import dataclasses
    q, s = GPTQConfig(wbits=4, group_size=64), TernarySpiking(ratio=0.2, steps=3)
    # group_size None = the quantizer's (conf/ spells it ${quant.group_size}: 64)
    resolved = dataclasses.replace(s, group_size=s.threshold_group(q))
    assert (q.key(), resolved.key()) == tuple(c.key() for c in method_configs(compose_config([])))
    a, b = load_model(str(src)), load_model(str(src))
    report = api_quantize(a.model, _ids(), q, spiking=s, progress=False, log=lambda *_: None)
    _run(b.model, *method_configs(compose_config([])))
    _same(a.model.state_dict(), b.model.state_dict())
    assert report.cost["avg_steps"] == pytest.approx(1.4, abs=1e-3)
    assert perplexity(a.model, _ids()) > 0
    o = OmniQuantConfig(wbits=4, abits=4, epochs=1)
    assert (o.key(), GIFSpiking(ratio=0.1, addbit=1).key()) == tuple(
        c.key() for c in method_configs(compose_config(["quant=omniquant", "spiking=t2", "quant.epochs=1"])))
