"""QuaRot in the one engine (issue "Rotations"): the rotation is a plug-in (`rotation.Rotated`)
around any method, the GPTQ pipeline quantizes activations and the KV cache (`quant.abits`,
`quant.kv_bits`, clip ratios) and spikes them with GIF steps (spiking=t2/t4), and a rotated
quantized model resumes, streams, exports and reloads to the same model.

The engine cases run on the real embedded model cut to 6 blocks (`src`, as test_engine)."""
from __future__ import annotations

import pytest
import torch

from spikellm import methods
from spikellm.blockwise import BlockMethod, BlockResult, run_blockwise
from spikellm.config import (GIFSpiking, GPTQConfig, NoSpiking, OmniQuantConfig, RTNConfig, Rotation,
                             validate)
from spikellm.gif import gif_fake_quant
from spikellm.models import blocks_of, family_of, load_model
from spikellm.quantize import quantize
from spikellm.rotation import Rotated
from spikellm.streaming import open_streaming
from test_engine import _same, dies_in_block

HAD = Rotation(mode="hadamard", seed=0)
CASES = {
    "quarot gptq w4a4kv4": (GPTQConfig(wbits=4, abits=4, group_size=0, sym=True, a_clip=0.9, kv_clip=0.95),
                            NoSpiking(), HAD),
    "quarot rtn w4a4 t2": (RTNConfig(wbits=4, abits=4, group_size=0), GIFSpiking(ratio=0.1, addbit=1), HAD),
    "rtn w4a4 t4 (no rotation)": (RTNConfig(wbits=4, abits=4, group_size=0),
                                  GIFSpiking(ratio=0.05, addbit=2), None),
    "rotation + lwc w4a4": (OmniQuantConfig(wbits=4, abits=4, epochs=1, let=False), NoSpiking(), HAD),
}


def _ids():
    return torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))


def _run(model, q, s, r, **kw):
    return quantize(model, _ids(), q, s, rotate=r, progress=False, log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def whole(src):
    out = {}
    for name, (q, s, r) in CASES.items():
        lm = load_model(str(src))
        report = _run(lm.model, q, s, r)
        out[name] = ({k: v.clone() for k, v in lm.model.state_dict().items()}, report,
                     lm.model(_ids(), use_cache=False).logits)
    return out


# ------------------------------------------------------------------------------ quantizers

def test_activation_clip_ratio_by_hand():
    """Per-token asymmetric 2 bits, clip 0.5: range [-1, 1.5], scale 2.5/3, zero round(1.2) = 1;
    codes of (-2, 0, 1, 3): clamp(-2 + 1) = 0, 1, 2, clamp(4 + 1) = 3."""
    x = torch.tensor([[-2.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    s = 2.5 / 3
    want = torch.tensor([[-1.0, 0.0, 1.0, 2.0]], dtype=torch.float64) * s
    torch.testing.assert_close(gif_fake_quant(x, 2, clip=0.5), want)
    torch.testing.assert_close(gif_fake_quant(x, 2, clip=1.0), gif_fake_quant(x, 2))


@pytest.mark.parametrize("name", list(CASES))
def test_costs_count_activation_steps_and_the_online_transforms(name, whole):
    q, s, r = CASES[name]
    _, report, _ = whole[name]
    linear = [c for c in report.costs if not c.overhead]
    overhead = [c for c in report.costs if c.overhead]
    assert len(linear) == 6 * 7 and all(c.act_bits == 4 for c in linear)
    steps = 1 + s.ratio * (2 ** s.addbit - 1) if s.mode == "gif" else 1.0
    assert report.cost["avg_steps"] == pytest.approx(steps, abs=0.01)
    assert report.cost["ace_rel_baseline"] >= 1.0 - 1e-9
    if r is None:
        assert not overhead and "overhead_ace" not in report.cost
    else:   # per block: online Hadamards before o_proj (576 = 36 x 16) and down_proj (1536 = 12 x 128),
        # Q/K (9 + 3 heads x 64) after RoPE: ±1 adds on FP16 activations
        per_block = 576 * (4 + 36) + 1536 * (7 + 12) + (9 + 3) * 64 * 6
        assert report.cost["overhead_ace"] == pytest.approx(6 * per_block * 16)
        assert len(overhead) == 6 * 3


def test_the_gptq_pipeline_quantizes_k_and_v_not_q(whole):
    from spikellm.omni_attention import KVQuantizer
    q, s, r = CASES["quarot gptq w4a4kv4"]
    lm_state = whole["quarot gptq w4a4kv4"][0]
    assert any(k.endswith("kv_quant.k.salient") for k in lm_state)
    kvq = KVQuantizer(q.kv, 3, 64, "token", q_bits=16, clip=q.kv_clip)
    assert not kvq.q.active and kvq.k.active and kvq.v.clip == 0.95


# ------------------------------------------------------------------------------ engine contract

@pytest.mark.parametrize("name", list(CASES))
def test_rotated_run_killed_mid_block_then_resumed_equals_the_uninterrupted_run(name, whole, src, tmp_path,
                                                                                  monkeypatch):
    q, s, r = CASES[name]
    real = methods.METHODS[q.method]
    ckpt = tmp_path / "ckpt"
    monkeypatch.setitem(methods.METHODS, q.method, dies_in_block(real, 3))
    with pytest.raises(KeyboardInterrupt):
        _run(load_model(str(src)).model, q, s, r, checkpoint_dir=ckpt)
    monkeypatch.setitem(methods.METHODS, q.method, real)
    resumed = load_model(str(src))
    report = _run(resumed.model, q, s, r, checkpoint_dir=ckpt)
    _same(resumed.model.state_dict(), whole[name][0])
    assert report.cost == whole[name][1].cost
    assert torch.equal(resumed.model(_ids(), use_cache=False).logits, whole[name][2])


@pytest.mark.parametrize("name", ["quarot gptq w4a4kv4", "quarot rtn w4a4 t2"])
def test_rotated_streamed_run_equals_the_whole_model_run_and_reloads(name, whole, src, tmp_path):
    """Streamed from the shards (one block in memory), rotated block by block: the written
    checkpoint (untied rotated head, rotated embeddings) restored for inference computes the
    whole-model run's logits."""
    from transformers import AutoTokenizer
    q, s, r = CASES[name]
    stream = open_streaming(src, tmp_path / "q", dtype="float32")
    report = _run(stream.model, q, s, r, stream=stream)
    out = stream.finish(AutoTokenizer.from_pretrained(str(src)))
    lm = load_model(str(out))
    methods.restore_quantized(lm.model, lm.spec, q, s, out, r)
    _same(lm.model.state_dict(), whole[name][0])
    assert report.cost == whole[name][1].cost
    assert torch.equal(lm.model(_ids(), use_cache=False).logits, whole[name][2])


@pytest.mark.parametrize("name", ["quarot gptq w4a4kv4", "rotation + lwc w4a4"])
def test_rotated_export_reloads_to_the_same_model_and_a_plain_load_fails(name, src, tmp_path):
    from transformers import AutoModelForCausalLM
    from spikellm.export import load_quantized, save_quantized
    q, s, r = CASES[name]
    lm = load_model(str(src))
    _run(lm.model, q, s, r)
    want = lm.model(_ids(), use_cache=False).logits
    qc = save_quantized(lm.model, lm.tokenizer, q, s, tmp_path / "m", rotate=r)
    assert qc["rotate"] == {"mode": "hadamard", "seed": 0}
    back = load_quantized(tmp_path / "m")
    assert torch.equal(back.model(_ids(), use_cache=False).logits, want)
    with pytest.raises(ValueError, match="spikellm"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_rotation_at_w16a16_leaves_perplexity_unchanged(data_root):
    """The engine's rotation plug-in around a method that quantizes nothing (W16A16) on the real
    embedded model: WikiText-2 perplexity (4 x 512 test windows) equal to 4 significant digits."""
    from spikellm.data import evaluation_set
    from spikellm.evaluate import perplexity
    from spikellm.models import resolve_source

    class W16A16(BlockMethod):
        desc, needs_inputs = "w16a16", False

        def process(self, i, block, inputs):
            return BlockResult()

    lm = load_model(resolve_source("embedded", None))
    windows = evaluation_set(lm.tokenizer, "wikitext2", 512, 4, data_dir=str(data_root))
    before = perplexity(lm.model, windows, batch_size=2)
    run_blockwise(lm.model, lm.spec, windows[:1], Rotated(W16A16(), seed=0), progress=False)
    assert lm.model.lm_head.weight is not lm.model.get_input_embeddings().weight
    after = perplexity(lm.model, windows, batch_size=2)
    assert f"{after:.4g}" == f"{before:.4g}", (before, after)


# ------------------------------------------------------------------------------ configuration

def test_invalid_combinations_are_one_line_errors():
    with pytest.raises(ValueError, match="set quant.abits < 16"):
        validate(GPTQConfig(), GIFSpiking())
    with pytest.raises(ValueError, match="quant.let=false"):
        validate(OmniQuantConfig(), NoSpiking(), HAD)
    with pytest.raises(ValueError, match="kv_bits"):
        GPTQConfig(kv_bits=4)
    with pytest.raises(ValueError, match="rotate.mode='quarot' is invalid"):
        Rotation(mode="quarot")


def test_the_cli_composes_quarot_and_keys_the_rotation():
    from pipelines.config import ConfigError, compose_config
    from pipelines.dag import STAGE_INPUTS, rotation_config
    cfg = compose_config(["quant=gptq", "quant.abits=4", "spiking=none", "rotate=hadamard", "rotate.seed=3"])
    assert rotation_config(cfg) == Rotation(mode="hadamard", seed=3)
    plain = compose_config(["quant=gptq", "quant.abits=4", "spiking=none"])
    assert not rotation_config(plain).active
    keys = STAGE_INPUTS["quantize"]
    cfg.dry_run = plain.dry_run = True           # no checkpoint hashing in a unit test
    assert keys(cfg)["rotate"] == {"mode": "hadamard", "seed": 3} and "rotate" not in keys(plain)
    with pytest.raises(ConfigError, match="rotate=quarot is not a known option"):
        compose_config(["rotate=quarot"])
    with pytest.raises(ConfigError, match="set quant.abits < 16"):
        compose_config(["quant=gptq", "spiking=t2"])
