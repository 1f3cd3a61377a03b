"""Model families as data, and loading a causal LM from a local path, a hub id or the embedded default.

A `FamilySpec` names where a family keeps its decoder blocks and which linears each block has,
grouped by shared input and listed in their sequential order. Nothing here re-implements a
decoder layer: the algorithms run the stock transformers modules and hook their linears.
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

    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_LLAMA = FamilySpec(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

#: `config.model_type` -> spec. LLaMA-1/2/3, SmolLM2 and Mistral-style GQA share one layout.
FAMILIES: dict[str, FamilySpec] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


def family_of(model: nn.Module) -> FamilySpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} has no family entry; known: {sorted(FAMILIES)} "
                         f"(add a FamilySpec to spikellm.models.FAMILIES)")
    return FAMILIES[model_type]


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
