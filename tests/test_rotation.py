"""QuaRot's rotation (`spikellm.rotation`): a rotated full-precision model computes the same
function, on a tiny random Qwen2 (q/k/v biases, norms moved off 1) and on the real embedded
SmolLM2-135M (tied head); the online Hadamard equals multiplication by its matrix; LayerNorm
families are refused in one line."""
from __future__ import annotations

import pytest
import torch

from spikellm.hadamard import hadamard
from spikellm.rotation import OnlineHadamard, rotate_model
from test_families import VOCAB, tiny


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _unrotate_structure(model):
    """Drop the online Hadamards and the Q/K flag (the session model is shared by other tests)."""
    for layer in model.model.layers:
        for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
            lin._forward_pre_hooks.clear()
            if hasattr(lin, "online_hadamard"):
                del lin.online_hadamard
        layer.self_attn.__dict__.pop("qk_hadamard", None)


@torch.no_grad()
def test_rotated_tiny_model_computes_the_same_function():
    model = tiny("qwen2")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    info = rotate_model(model, seed=1)
    # online Hadamards before o_proj (64 = 4 heads x 16) and down_proj (128) of every block
    assert info["residual"] == "hadamard" and len(info["online"]) == 2 * model.config.num_hidden_layers
    assert _rel(model(ids).logits, ref) < 1e-4
    # the quantized attention rotates Q and K by H_16 after RoPE (Q Kᵀ unchanged)
    from spikellm.omni_attention import use_spiking_attention
    assert all(layer.self_attn.qk_hadamard for layer in model.model.layers)
    use_spiking_attention(model)
    assert _rel(model(ids).logits, ref) < 1e-4
    # the residual stream is rotated: the embeddings changed, the function did not
    assert all(torch.allclose(n.weight, torch.ones_like(n.weight)) for n in model.model.layers[0].modules()
               if type(n).__name__.endswith("RMSNorm"))


@torch.no_grad()
def test_rotated_embedded_model_computes_the_same_function(fresh_smollm):
    model = fresh_smollm.model
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    info = rotate_model(model, seed=0)
    try:
        assert info["residual"] == "hadamard" and info["head_dim"] == 64     # 576 = 36 x 16
        assert _rel(model(ids).logits, ref) < 1e-4
        assert not tied or model.lm_head.weight is not model.get_input_embeddings().weight
    finally:                    # the fixture restores the weights; undo the untying and hooks
        _unrotate_structure(model)
        if tied:
            model.lm_head.weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = True


@pytest.mark.parametrize("n", [1536, 64, 576])
def test_online_hadamard_is_multiplication_by_its_matrix(n):
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(OnlineHadamard(n)(x), x @ hadamard(n) / n ** 0.5)


def test_layernorm_families_are_refused_in_one_line():
    with pytest.raises(ValueError, match="needs RMSNorm.*rotate=none"):
        rotate_model(tiny("starcoder2"))
