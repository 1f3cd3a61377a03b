"""Shapes and sizes of a model without its weights: the model is built on the meta device from its
config (a checkpoint's config.json, an inline dict, or the few numbers of a LLaMA architecture),
so a 70B model is planned on a laptop. Everything here counts elements; callers choose bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import block_linears, blocks_of, family_of


def arch_config(arch: dict, model_type: str = "llama", **extra):
    """A transformers config of `model_type` (any family transformers knows; default LLaMA) from
    {layers, hidden, intermediate, heads, kv_heads, vocab}."""
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
                                num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                                num_key_value_heads=arch["kv_heads"], vocab_size=arch["vocab"], **extra)


#: the name it had when every planned model was a LLaMA (kept: bench scripts and notebooks use it)
llama_config = arch_config


def meta_model(config) -> nn.Module:
    """The causal LM of `config` (a transformers PretrainedConfig) with every tensor on meta."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass
class Footprint:
    """Element counts of one model. linears: (name, C_out, C_in) of one decoder block."""
    n_blocks: int
    block_params: int
    rest_params: int            # embeddings, final norm, untied lm_head
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    linears: list[tuple[str, int, int]]
    #: C_in of each group of linears sharing one input (one Hessian per group)
    hessian_dims: list[int]

    @property
    def params(self) -> int:
        return self.n_blocks * self.block_params + self.rest_params

    def gptq_solve_work(self) -> float:
        """Σ C_out·C_in² over one block's linears (the order of GPTQ's solve arithmetic)."""
        return float(sum(o * i * i for _, o, i in self.linears))


def footprint(model: nn.Module) -> Footprint:
    spec = family_of(model)
    blocks = blocks_of(model, spec)
    block_params = sum(p.numel() for p in blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())       # tied weights counted once
    lin = block_linears(blocks[0], spec)
    cfg = model.config
    return Footprint(
        n_blocks=len(blocks), block_params=block_params, rest_params=total - len(blocks) * block_params,
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        vocab=cfg.vocab_size, linears=[(n, m.out_features, m.in_features) for n, m in lin.items()],
        hessian_dims=[lin[g[0]].in_features for g in spec.sequential])
