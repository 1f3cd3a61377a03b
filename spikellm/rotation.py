"""QuaRot's computational invariance (Ashkboos et al. 2024) on a loaded HF model: the same
function computed in a rotated basis, so that quantizers see activations without outliers.

`rotate_model(model, seed)` does, in place (row-vector convention, h [T, d]):

1. **Fold the RMSNorm scales** g into the linears that read them (W ← W · diag(g), g ← 1): the
   input norm into q/k/v, the post-attention norm into the MLP's input linears, the final norm
   into the head (a tied head is untied first: the embeddings are rotated without the norm).
2. **Rotate the residual stream** by an orthogonal Q [d, d] (`hadamard.rotation_matrix`: a
   seeded randomized Hadamard): embeddings E ← E Q; every linear reading the stream W ← W Q;
   every linear writing it (o_proj, down_proj) W ← Qᵀ W, b ← Qᵀ b; the head W ← W Q. RMSNorm
   with unit scale commutes with Q (‖hQ‖ = ‖h‖).
3. **Rotate V/O per head** by H_h / √d_h: v_proj's output rows per KV head W ← H_hᵀ W (and
   bias), o_proj's input columns per query head W ← W H_h, so V (the KV cache) is stored in the
   rotated basis.
4. **An online Hadamard before down_proj**: down_proj's input columns W ← W H (H the normalized
   Hadamard of the intermediate size) and a forward pre-hook `OnlineHadamard` applies x ← x H
   at run time.

Only RMSNorm families (LLaMA layout, Qwen2 with q/k/v biases) are supported; LayerNorm families
(StarCoder2) would first need their mean subtraction folded into the stream (SliceGPT), and get
a one-line error. Computed in float64, written back in each weight's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from .hadamard import hadamard_transform, rotation_matrix, split_order
from .models import FamilySpec, family_of, get_module


class OnlineHadamard(nn.Module):
    """x [..., n] -> x @ (H_n / √n) (`hadamard.hadamard_transform`), run before a linear."""

    def __init__(self, n: int):
        super().__init__()
        if split_order(n) is None:
            raise ValueError(f"no Hadamard transform of size {n} for the online rotation")
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)


def _hook(module: OnlineHadamard):
    def pre(_, args, kwargs):
        return (module(args[0]), *args[1:]), kwargs
    return pre


def _set(linear: nn.Linear, W: torch.Tensor, b: torch.Tensor | None = None) -> None:
    linear.weight.data = W.to(linear.weight.dtype)
    if b is not None:
        linear.bias.data = b.to(linear.bias.dtype)


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for lin in linears:
        _set(lin, lin.weight.data.double() * g[None, :])
    norm.weight.data.fill_(1.0)


def rotate_model(model: nn.Module, seed: int = 0, spec: FamilySpec | None = None) -> dict:
    """Rotate `model` in place (module docstring) -> {"residual": kind of Q ("hadamard" or
    "random_orthogonal"), "head_dim": d_h, "online": [the down_proj names given an
    OnlineHadamard pre-hook]}. The model computes the same function (up to rounding)."""
    spec = spec or family_of(model)
    cfg = model.config
    blocks = get_module(model, spec.blocks)
    norm_cls = type(get_module(blocks[0], spec.input_norm)).__name__
    if "RMSNorm" not in norm_cls:
        raise ValueError(f"rotate=hadamard needs RMSNorm blocks; this model has {norm_cls} "
                         f"(LayerNorm families need their mean folded first): use rotate=none")
    d = cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    dh = getattr(cfg, "head_dim", None) or d // heads
    Q, kind = rotation_matrix(d, seed)
    down_name = spec.sequential[-1][0]
    emb = model.get_input_embeddings()
    head = get_module(model, spec.lm_head)
    if head.weight is emb.weight:               # untie: the head gets the final norm, E does not
        head.weight = nn.Parameter(emb.weight.data.clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        _fold_norm(get_module(model, spec.final_norm), [head])
        emb.weight.data = (emb.weight.data.double() @ Q).to(emb.weight.dtype)
        _set(head, head.weight.data.double() @ Q)
        online = []
        for i, block in enumerate(blocks):
            readers_attn = [get_module(block, n) for n in spec.qkv]
            readers_mlp = [get_module(block, n) for n in spec.fc1]
            _fold_norm(get_module(block, spec.input_norm), readers_attn)
            _fold_norm(get_module(block, spec.post_attention_norm), readers_mlp)
            for lin in readers_attn + readers_mlp:
                _set(lin, lin.weight.data.double() @ Q)
            # V/O per head: v rows of KV head j (W ← Hᵀ W), o columns of query head i (W ← W H)
            v, o = get_module(block, spec.qkv[2]), get_module(block, spec.o_proj)
            Wv = v.weight.data.double().reshape(kv_heads, dh, -1)
            Wv = hadamard_transform(Wv.transpose(1, 2)).transpose(1, 2)       # Hᵀ W per head
            bv = None if v.bias is None else hadamard_transform(v.bias.data.double().reshape(kv_heads, dh))
            _set(v, Wv.reshape(kv_heads * dh, -1), None if bv is None else bv.reshape(-1))
            Wo = hadamard_transform(o.weight.data.double().reshape(-1, heads, dh)).reshape(o.weight.shape)
            # o_proj then writes the rotated stream: W ← Qᵀ W, b ← Qᵀ b
            _set(o, Q.t() @ Wo, None if o.bias is None else Q.t() @ o.bias.data.double())
            down = get_module(block, down_name)
            Wd = hadamard_transform(down.weight.data.double())               # W H (columns)
            _set(down, Q.t() @ Wd, None if down.bias is None else Q.t() @ down.bias.data.double())
            rot = OnlineHadamard(down.in_features)
            down.online_hadamard = rot                                      # a submodule: shown, moved
            down.register_forward_pre_hook(_hook(rot), with_kwargs=True)
            online.append(f"{spec.blocks}.{i}.{down_name}")
    return {"residual": kind, "head_dim": dh, "online": online}
