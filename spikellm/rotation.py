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
4. **Online Hadamards** (`OnlineHadamard`, a forward pre-hook x ← x H / √n on the linear):
   before down_proj (its input columns W ← W H, H of the intermediate size) and before o_proj
   (W ← W H over all heads: QuaRot's head-mixing "partial" Hadamard times the per-head one of
   step 3, here one Hadamard of size heads·d_h, e.g. 576 = 36·16 for SmolLM2's 9 heads, where
   QuaRot's H_heads ⊗ H_dh needs a Hadamard of order 9, which does not exist).
5. **Q/K after RoPE**: the attention module is marked `qk_hadamard`; the quantized attention
   (`omni_attention.spiking_attention`) multiplies Q and K by H_dh / √d_h before quantizing K
   (Q Kᵀ unchanged). Full-precision attention needs nothing.

`Rotated` is the engine plug-in: it rotates the embeddings and head before the first block and
each block as the engine hands it over (so a streamed 70B model is rotated one block at a
time), then runs the wrapped method on the rotated block. The online transforms are counted
in ACE (`allocation.transform_cost`: signed adds on FP16 activations).

Only RMSNorm families (LLaMA layout, Qwen2 with q/k/v biases) are supported; LayerNorm families
(StarCoder2) would first need their mean subtraction folded into the stream (SliceGPT), and get
a one-line error. Computed in float64, written back in each weight's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .allocation import LayerCost, transform_cost
from .blockwise import BlockMethod, BlockResult
from .hadamard import hadamard_transform, rotation_matrix, split_order
from .models import FamilySpec, blocks_of, family_of, get_module


class OnlineHadamard(nn.Module):
    """x [..., n] -> x @ (H_n / √n) (`hadamard.hadamard_transform`), run before a linear."""

    def __init__(self, n: int):
        super().__init__()
        if split_order(n) is None:
            raise ValueError(f"no Hadamard transform of size {n} for the online rotation")
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"n={self.n}"


def _hook(module: nn.Module, args, kwargs):
    return (module.online_hadamard(args[0]), *args[1:]), kwargs


def attach_online(linear: nn.Module, n: int | None = None) -> None:
    """Give `linear` an `OnlineHadamard` of its input size (a submodule `online_hadamard`, no
    tensors) applied by a forward pre-hook; idempotent. Forward hooks on the linear (Hessian,
    saliency collectors) see the rotated input."""
    if getattr(linear, "online_hadamard", None) is not None:
        return
    linear.online_hadamard = OnlineHadamard(n or linear.in_features)
    linear.register_forward_pre_hook(_hook, with_kwargs=True)


def carry_online(src: nn.Module, dst: nn.Module) -> None:
    """A module replacing `src` (e.g. a QuantLinear wrapping it) gets its online Hadamard."""
    had = getattr(src, "online_hadamard", None)
    if had is not None:
        attach_online(dst, had.n)


def _set(linear: nn.Linear, W: torch.Tensor, b: torch.Tensor | None = None) -> None:
    linear.weight.data = W.to(linear.weight.dtype)
    if b is not None:
        linear.bias.data = b.to(linear.bias.dtype)


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for lin in linears:
        _set(lin, lin.weight.data.double() * g[None, :].to(lin.weight.device))
    norm.weight.data.fill_(1.0)


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(hidden, query heads, kv heads, head_dim) from the model config."""
    cfg = model.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return d, heads, kv_heads, getattr(cfg, "head_dim", None) or d // heads


def check_rotatable(model: nn.Module, spec: FamilySpec) -> None:
    """ValueError (one line naming the fix) unless `model`'s blocks use RMSNorm."""
    blocks = blocks_of(model, spec)
    norm_cls = type(get_module(blocks[0], spec.input_norm)).__name__
    if "RMSNorm" not in norm_cls:
        raise ValueError(f"rotate=hadamard needs RMSNorm blocks; this model has {norm_cls} "
                         f"(LayerNorm families need their mean folded first): use rotate=none")


def untie_head(model: nn.Module, spec: FamilySpec) -> bool:
    """Give a tied head its own weight (the embeddings are rotated without the final norm) and
    set config.tie_word_embeddings=False; -> whether it was tied."""
    emb, head = model.get_input_embeddings(), get_module(model, spec.lm_head)
    tied = head.weight is emb.weight
    if tied:
        head.weight = nn.Parameter(emb.weight.data.clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False
    return tied


#: rows of the embeddings / head rotated at a time (float64 temporaries of rows x hidden)
_ROWS = 8192


@torch.no_grad()
def _rotate_rows(W: torch.Tensor, Q: torch.Tensor, g: torch.Tensor | None = None) -> None:
    """W [V, d] ← (W · diag(g)) Q in place, in float64, `_ROWS` rows at a time (a 128k-token
    vocabulary at d = 8192 never needs a whole float64 copy)."""
    Q = Q.to(W.device)
    for r0 in range(0, W.shape[0], _ROWS):
        rows = W[r0: r0 + _ROWS].double()
        if g is not None:
            rows = rows * g[None, :].to(W.device)
        W[r0: r0 + _ROWS] = (rows @ Q).to(W.dtype)


@torch.no_grad()
def rotate_outer(model: nn.Module, spec: FamilySpec, Q: torch.Tensor) -> None:
    """Steps 1-2 outside the blocks: untie the head, fold the final norm into it, E ← E Q,
    head W ← W Q. Q [d, d] float64."""
    untie_head(model, spec)
    emb, head = model.get_input_embeddings(), get_module(model, spec.lm_head)
    norm = get_module(model, spec.final_norm)
    _rotate_rows(head.weight.data, Q, norm.weight.data.double())
    norm.weight.data.fill_(1.0)
    _rotate_rows(emb.weight.data, Q)


def install_online(block: nn.Module, spec: FamilySpec) -> None:
    """The run-time structure of a rotated block (no weights change): the online Hadamards
    before down_proj and o_proj, and the attention's Q/K rotation flag (step 5)."""
    attach_online(get_module(block, spec.sequential[-1][0]))
    o = get_module(block, spec.o_proj)
    if split_order(o.in_features) is not None:
        attach_online(o)
    attn = get_module(block, spec.attention)
    if split_order(attn.head_dim) is not None:
        attn.qk_hadamard = True


@torch.no_grad()
def rotate_block(block: nn.Module, spec: FamilySpec, Q: torch.Tensor, heads: int, kv_heads: int,
                 dh: int) -> None:
    """Steps 1-4 on one decoder block in place, and its run-time structure (`install_online`)."""
    Q = Q.to(get_module(block, spec.qkv[0]).weight.device)
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
    if split_order(o.in_features) is not None:                      # online Hadamard before o_proj
        Wo = hadamard_transform(Wo)
    # o_proj then writes the rotated stream: W ← Qᵀ W, b ← Qᵀ b
    _set(o, Q.t() @ Wo, None if o.bias is None else Q.t() @ o.bias.data.double())
    down = get_module(block, spec.sequential[-1][0])
    Wd = hadamard_transform(down.weight.data.double())               # W H (columns)
    _set(down, Q.t() @ Wd, None if down.bias is None else Q.t() @ down.bias.data.double())
    install_online(block, spec)


def residual_rotation(model: nn.Module, seed: int) -> tuple[torch.Tensor, str]:
    """Q [d, d] float64 of the residual stream and its kind (`hadamard.rotation_matrix`)."""
    return rotation_matrix(model.config.hidden_size, seed)


def rotate_model(model: nn.Module, seed: int = 0, spec: FamilySpec | None = None) -> dict:
    """Rotate `model` in place (module docstring) -> {"residual": kind of Q ("hadamard" or
    "random_orthogonal"), "head_dim": d_h, "online": [the linears given an OnlineHadamard]}.
    The model computes the same function (up to rounding)."""
    spec = spec or family_of(model)
    check_rotatable(model, spec)
    _, heads, kv_heads, dh = _shape(model)
    Q, kind = residual_rotation(model, seed)
    rotate_outer(model, spec, Q)
    online = []
    for i, block in enumerate(blocks_of(model, spec)):
        rotate_block(block, spec, Q, heads, kv_heads, dh)
        online += [f"{spec.blocks}.{i}.{n}" for n, m in block.named_modules()
                   if getattr(m, "online_hadamard", None) is not None and isinstance(m, nn.Linear)]
    return {"residual": kind, "head_dim": dh, "online": online}


def hadamard_adds(n: int) -> float:
    """Signed additions per output of `hadamard_transform` over n values: log2(p) butterfly
    stages plus m for the [m, m] Paley product (n = m · p)."""
    m, p = split_order(n)
    return math.log2(p) + (m if m > 1 else 0)


def online_costs(block: nn.Module, spec: FamilySpec, prefix: str, heads: int, kv_heads: int,
                 qk: bool) -> list[LayerCost]:
    """Per token: the online Hadamards of one rotated block (`transform_cost` rows), the Q/K
    rotation only where K is quantized (`qk`)."""
    out = []
    for name in (spec.o_proj, spec.sequential[-1][0]):
        had = getattr(get_module(block, name), "online_hadamard", None)
        if had is not None:
            out.append(transform_cost(f"{prefix}{name}.online_hadamard", had.n, hadamard_adds(had.n)))
    attn = get_module(block, spec.attention)
    if qk and getattr(attn, "qk_hadamard", False):
        dh = attn.head_dim
        out.append(transform_cost(f"{prefix}{spec.attention}.qk_hadamard", (heads + kv_heads) * dh,
                                  hadamard_adds(dh)))
    return out


class Rotated(BlockMethod):
    """The rotation as an engine plug-in around another method (`inner`): before the first
    block the embeddings and head are rotated (`rotate_outer`), each block is rotated as the
    engine hands it over (`rotate_block`), then `inner` quantizes the rotated block. Resumed
    blocks get the rotated structure (`install_online`) before their state loads; a freshly
    loaded model gets it from `restore_for_inference` (untied head, online Hadamards), and its
    saved tensors (rotated weights, embeddings, head) then load."""

    def __init__(self, inner: BlockMethod, seed: int = 0, spec: FamilySpec | None = None, log=None):
        super().__init__()
        self.inner, self.seed, self.log = inner, seed, log
        self.desc = f"{inner.desc}+hadamard"
        self.streams = inner.streams
        self.needs_inputs = inner.needs_inputs
        self._notes: list[str] = []
        #: modules outside the blocks whose tensors the run changes (saved with the blocks)
        self.outside_modules: tuple[str, ...] = ()
        self.Q: torch.Tensor | None = None

    def __getattr__(self, name):           # the wrapped method's own attributes (q, s, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def notes(self) -> list[str]:
        return self._notes + list(getattr(self.inner, "notes", []))

    def prepare(self, model: nn.Module, spec: FamilySpec) -> None:
        check_rotatable(model, spec)
        self.spec = spec
        self.shape = _shape(model)
        self.Q, kind = residual_rotation(model, self.seed)
        if kind != "hadamard":
            self._notes.append(f"rotate: no Hadamard matrix of order {self.shape[0]}: the residual "
                              f"rotation is a seeded random orthogonal matrix")
        rotate_outer(model, spec, self.Q)
        self.outside_modules = (_embedding_name(model), spec.lm_head, spec.final_norm)
        self.inner.prepare(model, spec)

    def restore(self, block: nn.Module) -> None:
        install_online(block, self.spec)
        self.inner.restore(block)

    def process(self, i, block, inputs) -> BlockResult:
        self.inner.status = self.status
        _, heads, kv_heads, dh = self.shape
        rotate_block(block, self.spec, self.Q, heads, kv_heads, dh)
        res = self.inner.process(i, block, inputs)
        qk = getattr(getattr(self.inner, "q", None), "abits", 16) < 16
        res.costs.extend(online_costs(block, self.spec, f"{i}.", heads, kv_heads, qk))
        return res

    def finalize(self, model, spec) -> None:
        self.inner.finalize(model, spec)

    def baseline_ace(self, c: LayerCost) -> float:
        return c.ace if c.overhead else self.inner.baseline_ace(c)

    def restore_for_inference(self, model: nn.Module) -> None:
        spec = family_of(model)
        untie_head(model, spec)
        for block in blocks_of(model, spec):
            install_online(block, spec)
        self.inner.restore_for_inference(model)


def _embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)
