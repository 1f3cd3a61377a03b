"""Learnable equivalent transformation (LET, OmniQuant) for decoder blocks (method.md §4).

Per block four scale vectors, each an exact equivalence of the full-precision block (LLaMA
names below; the family's `FamilySpec` says which linears and norms play each part, and any
biases are scaled with their rows):

- `qkv` [hidden]: the input norm's output is divided by s, q/k/v weight columns multiplied by s;
- `out` [kv_heads * head_dim]: v_proj rows (and bias) divided by s, o_proj columns multiplied
  by s repeated over the query heads that share each kv head (GQA);
- `fc1` [hidden]: post-attention norm output divided by s, gate/up (the family's `fc1`)
  columns multiplied by s;
- `qkt` [kv_heads, head_dim/2]: q_proj rows divided, k_proj rows multiplied by s. OmniQuant
  trains one free scale per channel, which RoPE does not commute with; we tie each rotary pair
  (i, i + d/2) to one scale, so the transform stays exact under RoPE.

During calibration a `QuantLinear` applies its factors on the fly (`factors(role)`), so the
decoder layer is never re-implemented; `fold` writes them into the weights and norms at the end.
Scales are truncated to |s| >= 1e-2 with a straight-through gradient (OmniQuant's TruncateFunction).
"""
from __future__ import annotations

import torch
from torch import nn

# Which linear plays which role ("q", "k", "v", "o", "fc1", None) and which norms feed them is
# the family's: `FamilySpec.let_roles()` and `FamilySpec.let_norms()`.


def truncate(s: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """|s| >= floor, sign kept (0 -> +floor), straight-through gradient."""
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    t = torch.where(s.abs() < floor, sign * floor, s)
    return (t - s).detach() + s


def smooth_init(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant/OmniQuant start: s = act^α / w^(1-α), clamped to >= 1e-5. Both [C]."""
    return (act_absmax.float().clamp(min=1e-5) ** alpha
            / w_absmax.float().clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


class LETParams(nn.Module):
    """The four LET scale vectors of one block (see the module docstring)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 init: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        init = init or {}
        self.qkv = nn.Parameter(init.get("qkv", torch.ones(hidden)).float().clone())
        self.out = nn.Parameter(init.get("out", torch.ones(kv_heads * head_dim)).float().clone())
        self.fc1 = nn.Parameter(init.get("fc1", torch.ones(hidden)).float().clone())
        self.qkt = nn.Parameter(torch.ones(kv_heads, head_dim // 2))

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    def _qkt_kv(self) -> torch.Tensor:
        s = truncate(self.qkt)
        return torch.cat([s, s], dim=-1)              # [kv_heads, head_dim], rotary pairs tied

    def _per_query_head(self, s_kv: torch.Tensor) -> torch.Tensor:
        """[kv_heads * d] or [kv_heads, d] -> [heads * d] (each kv head's scale for its queries)."""
        return s_kv.reshape(self.kv_heads, self.head_dim).repeat_interleave(self.n_rep, 0).reshape(-1)

    def factors(self, role: str | None):
        """(input divisor, weight column multiplier, weight row multiplier) for a linear's
        role; None where the role has no such factor."""
        if role is None:
            return None, None, None
        if role in ("q", "k", "v"):
            s = truncate(self.qkv)
            if role == "q":
                return s, s, 1.0 / self._per_query_head(self._qkt_kv())
            if role == "k":
                return s, s, self._qkt_kv().reshape(-1)
            return s, s, 1.0 / truncate(self.out)
        if role == "o":
            return None, self._per_query_head(truncate(self.out)), None
        if role == "fc1":
            s = truncate(self.fc1)
            return s, s, None
        raise ValueError(f"unknown LET role {role!r}")


def transformed_weight(weight: torch.Tensor, bias: torch.Tensor | None, col=None, row=None):
    """W [C_out, C_in] -> W·diag(col) scaled per row by `row`; bias [C_out] scaled by `row`."""
    w = weight
    if col is not None:
        w = w * col.to(w.dtype)[None, :]
    if row is not None:
        w = w * row.to(w.dtype)[:, None]
        if bias is not None:
            bias = bias * row.to(bias.dtype)
    return w, bias


@torch.no_grad()
def fold_norms(block: nn.Module, let: LETParams, norms: dict[str, str]) -> None:
    """Divide the norms' weights (and a LayerNorm's bias) by their LET scales; `norms` is the
    family's `let_norms()`, scale name -> norm path. The linears fold their own factors."""
    for name, norm in norms.items():
        mod = block.get_submodule(norm)
        s = truncate(getattr(let, name)).to(mod.weight.dtype)
        mod.weight.div_(s)
        if getattr(mod, "bias", None) is not None:
            mod.bias.div_(s)
