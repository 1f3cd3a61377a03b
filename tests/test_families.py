"""Model families are data (`spikellm.models.FamilySpec`): every registered method runs on a
family whose module layout differs from LLaMA's, and its LET is exact there.

Tiny random-weight configs (no checkpoint of these families exists offline; the layouts, not the
weights, are what is under test): Qwen2 (LLaMA's module names, q/k/v biases) and StarCoder2
(biases on every linear, LayerNorm with bias, an ungated two-linear MLP `c_fc`/`c_proj`)."""
from __future__ import annotations

import pytest
import torch

from spikellm import methods
from spikellm.blockwise import capture_block_inputs, forward_block
from spikellm.config import OmniQuantConfig, SpikingConfig
from spikellm.let import LETParams
from spikellm.models import FAMILIES, blocks_of, family_of
from spikellm.quantize import quantize
from spikellm.streaming import open_streaming
from spikellm import omniquant as oq
from test_engine import CASES

LAYERS, VOCAB = 2, 256


def tiny(family: str, seed: int = 0):
    """A random-weight CausalLM of `family`: hidden 64, 4 query / 2 kv heads, MLP 128."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Starcoder2Config
    cls = {"qwen2": Qwen2Config, "starcoder2": Starcoder2Config}[family]
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=None, use_cache=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():            # HF's init leaves norms at 1 and biases at 0: move them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(n=4, seqlen=32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


FAMS = ["qwen2", "starcoder2"]


def test_the_families_differ_in_layout_from_llama():
    llama, sc2 = FAMILIES["llama"], FAMILIES["starcoder2"]
    assert sc2.linears() != llama.linears() and sc2.let_roles()["mlp.c_fc"] == "fc1"
    assert len(sc2.linears()) == 6 and "mlp.c_proj" in sc2.let_roles()
    m = tiny("starcoder2")
    block = blocks_of(m)[0]
    assert isinstance(block.get_submodule(sc2.input_norm), torch.nn.LayerNorm)
    assert all(block.get_submodule(n).bias is not None for n in sc2.linears())
    q = tiny("qwen2")
    assert family_of(q) is llama and blocks_of(q)[0].self_attn.q_proj.bias is not None


def assert_let_is_exact(m, ids) -> None:
    """Random LET scales on block 0 of `m`, quantizers off: applied on the fly and folded into the
    weights, biases and norms (a LayerNorm's bias included), the block computes what it did in
    full precision. Shared with tests/test_omniquant.py (LLaMA, the real embedded model)."""
    spec = family_of(m)
    inputs = capture_block_inputs(m, spec, ids)
    block = blocks_of(m)[0]
    ref = forward_block(block, inputs)
    linears = oq.wrap_block(block, spec, OmniQuantConfig(wbits=16, abits=16), SpikingConfig())
    heads, kv_heads, head_dim = oq._attn_shape(block, spec)
    let = LETParams(linears[spec.qkv[0]].in_features, heads, kv_heads, head_dim)
    with torch.no_grad():
        for p in let.parameters():
            p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    oq._attach_let(linears, let)
    on_the_fly = forward_block(block, inputs)
    oq._finalize(block, spec, linears, let)
    folded = forward_block(block, inputs)
    tol = 1e-5 * ref.abs().max()
    assert (on_the_fly - ref).abs().max() < tol and (folded - ref).abs().max() < tol


@pytest.mark.parametrize("family", FAMS)
def test_let_is_an_exact_equivalence_and_folds_on_the_family(family):
    assert_let_is_exact(tiny(family), _ids(2))


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_method_runs_on_the_family_and_reloads(family, name):
    """Each registered method quantizes every linear of every block, changes the model's output,
    and its saved state dict loads back into a fresh model of the family (the method's runtime
    modules rebuilt) that scores the same."""
    q, s = CASES[name]
    m = tiny(family)
    spec = family_of(m)
    ids = _ids()
    with torch.no_grad():
        fp = m(ids).logits
    report = quantize(m, ids, q, s, progress=False, log=lambda *_: None)
    assert len(report.costs) == LAYERS * len(spec.linears())
    assert report.cost["ace"] > 0 and report.cost["storage_bits"] < 16
    with torch.no_grad():
        out = m(ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, fp, atol=1e-4)
    fresh = tiny(family, seed=1)                   # other weights: everything must come from the state dict
    methods.make_method(q, s, spec).restore_for_inference(fresh)
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)


@pytest.mark.parametrize("name", ["gptq w3 g64", "omniquant w4a4 t2"])
def test_streamed_from_shards_equals_the_whole_run_on_starcoder2(name, tmp_path):
    q, s = CASES[name]
    src = tmp_path / "src"
    tiny("starcoder2").save_pretrained(src)
    whole = tiny("starcoder2")
    quantize(whole, _ids(), q, s, progress=False, log=lambda *_: None)
    stream = open_streaming(src, tmp_path / "q", dtype="float32")
    quantize(stream.model, _ids(), q, s, progress=False, log=lambda *_: None, stream=stream)
    out = stream.finish()
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    methods.restore_quantized(lm, family_of(lm), q, s, out)
    a, b = lm.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_model_family_is_checked_against_the_checkpoint_and_builds_the_dry_run(tmp_path):
    """`model.family` is read: preflight rejects a checkpoint of another layout in one line
    naming the fix, and the dry run builds `model.arch` as a model of that family."""
    from pipelines.config import compose_config
    from pipelines.dryrun import model_config
    from pipelines.schema import PreflightError, check_context
    ckpt = tmp_path / "sc2"
    tiny("starcoder2").save_pretrained(ckpt)
    cfg = compose_config([f"model.path={ckpt}", "calib.seqlen=64", "eval.seqlen=64"])
    with pytest.raises(PreflightError, match="set model.family=starcoder2"):
        check_context(cfg)
    check_context(compose_config([f"model.path={ckpt}", "model.family=starcoder2",
                                  "calib.seqlen=64", "eval.seqlen=64"]))
    with pytest.raises(PreflightError, match="model.family='gpt9' is invalid"):
        check_context(compose_config(["model.family=gpt9"]))
    arch = compose_config(["model=llama2_7b", "model.family=qwen2"])
    assert model_config(arch).model_type == "qwen2"
