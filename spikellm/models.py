"""Model families as data, and loading a causal LM from a local path, a hub id or the embedded default.

A `FamilySpec` names where a family keeps its decoder blocks, which linears each block has
(grouped by shared input, in their sequential order), which of them play which part in
attention and LET, and which norms feed them. It is the only place that names a family's
modules: the algorithms read module paths from it, run the stock transformers modules and hook
their linears, and nothing re-implements a decoder layer. Two layouts are known: LLaMA (also
SmolLM2, Mistral and Qwen2, whose q/k/v carry biases) and StarCoder2 (biases everywhere,
LayerNorm with bias, an ungated two-linear MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its parts (dotted paths relative to the CausalLM)."""
    blocks: str
    #: linear groups inside one block; linears in a group share one input; groups run in order
    sequential: tuple[tuple[str, ...], ...]
    attention: str = "self_attn"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    #: which linear produces queries / keys / values (for quantized attention and KV saliency)
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    #: the attention output projection (its input is the attention output; LET's `out` scale)
    o_proj: str = "self_attn.o_proj"
    #: the linears that read the post-attention norm's output (LET's `fc1` scale); LET starts
    #: that scale from the last one (OmniQuant: up_proj)
    fc1: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    #: the norm whose output feeds q/k/v and the one whose output feeds `fc1` (RMSNorm or
    #: LayerNorm: LET folds its scales into their weight and, where there is one, bias)
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"

    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def let_roles(self) -> dict[str, str | None]:
        """linear name -> its LET role: "q", "k", "v", "o", "fc1", or None (no LET factor)."""
        roles: dict[str, str | None] = dict.fromkeys(self.linears())
        roles.update(zip(self.qkv, ("q", "k", "v")))
        roles[self.o_proj] = "o"
        roles.update(dict.fromkeys(self.fc1, "fc1"))
        return roles

    def let_norms(self) -> dict[str, str]:
        """LET scale name -> the norm its inverse is folded into."""
        return {"qkv": self.input_norm, "fc1": self.post_attention_norm}

    def let_init_inputs(self) -> dict[str, str]:
        """LET scale name -> the linear whose input maxima and weight start it (SmoothQuant)."""
        return {"qkv": self.qkv[0], "out": self.o_proj, "fc1": self.fc1[-1]}

    def __post_init__(self):
        names = set(self.linears())
        named = {*self.qkv, self.o_proj, *self.fc1}
        if not named <= names:
            raise ValueError(f"FamilySpec names linears outside `sequential`: {sorted(named - names)}")


_LLAMA = FamilySpec(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

_STARCODER2 = FamilySpec(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.c_fc",),
        ("mlp.c_proj",),
    ),
    fc1=("mlp.c_fc",),
)

#: `config.model_type` -> spec. LLaMA-1/2/3, SmolLM2, Mistral-style GQA and Qwen2 (q/k/v
#: biases) share one layout; StarCoder2 has its own.
FAMILIES: dict[str, FamilySpec] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
                                   "starcoder2": _STARCODER2}


def family_of(model: nn.Module) -> FamilySpec:
    """The spec of a loaded model, by its `config.model_type`."""
    return family_spec(getattr(model.config, "model_type", None))


def known_family(name: str) -> FamilySpec:
    """The spec a config's `model.family` names; one-line ValueError naming the fix otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is invalid: must be one of {', '.join(sorted(FAMILIES))} "
                         f"(or add a FamilySpec to spikellm.models.FAMILIES)")
    return FAMILIES[name]


def family_spec(model_type: str | None, expected: str | None = None) -> FamilySpec:
    """The spec of `model_type`; with `expected` (a config's `model.family`) also checks that the
    two name the same layout. One-line ValueError naming the fix otherwise."""
    if expected is not None:
        known_family(expected)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} has no family entry; known: {sorted(FAMILIES)} "
                         f"(add a FamilySpec to spikellm.models.FAMILIES)")
    spec = FAMILIES[model_type]
    if expected is not None and FAMILIES[expected] != spec:
        raise ValueError(f"model.family={expected} but the checkpoint is model_type {model_type!r}, "
                         f"another module layout: set model.family={model_type}")
    return spec


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def blocks_of(model: nn.Module, spec: FamilySpec | None = None) -> nn.ModuleList:
    return get_module(model, (spec or family_of(model)).blocks)


def block_linears(block: nn.Module, spec: FamilySpec) -> dict[str, nn.Linear]:
    """The quantizable linears of one block, in sequential order: name -> module."""
    return {name: get_module(block, name) for name in spec.linears()}


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    spec: FamilySpec = field(default=None)


def resolve_source(path: str | None, hub_id: str | None, name: str = "model") -> str:
    """A local checkpoint directory if it exists, else the hub id; the embedded model when
    `path == "embedded"`. Raises a one-line error naming the fix when neither is usable."""
    if path == "embedded":
        from .embedded import embedded_checkpoint
        return str(embedded_checkpoint())
    if path:
        p = Path(path).expanduser()
        if p.exists():
            return str(p)
        raise FileNotFoundError(f"{name}: checkpoint path {p} does not exist "
                                f"(set model.path or its environment variable to a local directory)")
    if hub_id:
        return hub_id
    raise FileNotFoundError(f"{name}: no checkpoint given; set model.path (or its environment "
                            f"variable) to a local directory, or model.hub_id")


def load_model(source: str, dtype: str = "float32", device: str = "cpu",
               device_map: str | None = None) -> LoadedModel:
    """Load a LLaMA-family causal LM and its tokenizer from a directory or hub id.

    The model is put in eval mode with `use_cache=False` (the block-wise engine replays
    captured layer inputs and must not append to a shared KV cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype],
                                                 attn_implementation="sdpa", device_map=device_map)
    model.config.use_cache = False
    model.eval()
    if device_map is None:           # with a device map (several GPUs) accelerate placed it
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, spec=family_of(model))
