"""Optimal Brain Spiking saliency scores (method.md §3).

- activations, first order: per input channel j of a linear W [C_out, C_in], the signed token
  mean of x_j * (x WᵀW)_j over the calibration set (`ActivationSaliency`);
- KV cache: the same metric with the other operand of the bilinear product as the "weight";
- weights, second order: per input column j, Σ_i W_ij² / U_jj², U = chol(H⁻¹) upper, the OBS
  cost of removing column j (`hessian_column_saliency`);
- a seeded random baseline.
"""
from __future__ import annotations

import torch


class ActivationSaliency:
    """Accumulates the first-order activation saliency of one linear layer.

    `add_batch(x)` with x [..., C_in] (the layer's input) and the layer weight W [C_out, C_in];
    `scores()` -> [C_in] signed mean over all tokens and samples of x ⊙ (x WᵀW).
    """

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        self.gram = w.t() @ w            # WᵀW [C_in, C_in]
        self.total = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
        self.tokens = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.total += ((x @ self.gram) * x).sum(0).double()
        self.tokens += x.shape[0]

    def scores(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()


def activation_saliency(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One-shot form of `ActivationSaliency`: x [..., C_in], W [C_out, C_in] -> [C_in]."""
    acc = ActivationSaliency(weight)
    acc.add_batch(x)
    return acc.scores()


def kv_saliency(x1: torch.Tensor, x2: torch.Tensor, operand: str) -> torch.Tensor:
    """Saliency of the spiked operand of a bilinear product (method.md §3.2).

    operand="k": x1 = Q [b,h,l,d], x2 = Kᵀ [b,h,d,l] -> [h, d] (per head, head-dim channel);
    operand="v": x1 = P [b,h,l,l], x2 = V [b,h,l,d] -> [h, d].
    """
    x1, x2 = x1.double(), x2.double()
    s = ((x1.transpose(-1, -2) @ x1) @ x2) * x2
    if operand == "k":
        return s.mean(dim=-1).mean(0).float()   # over tokens (last axis of Kᵀ), then batch
    if operand == "v":
        return s.mean(dim=-2).mean(0).float()
    raise ValueError("operand must be 'k' or 'v'")


def _diag(U: torch.Tensor) -> torch.Tensor:
    return (torch.diag(U) if U.dim() == 2 else U).float().to(U.device)


def hessian_column_saliency(W: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Σ_i W_ij² / U_jj²: W [C_out, C_in], U = chol(H⁻¹) upper [C_in, C_in] (or its diagonal
    [C_in]) -> [C_in]."""
    return (W.float() ** 2).sum(0) / _diag(U).to(W.device) ** 2


def hessian_element_saliency(W: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """PB-LLM's per-element metric W_ij² / U_jj² -> [C_out, C_in] (U or its diagonal)."""
    return W.float() ** 2 / _diag(U).to(W.device).unsqueeze(0) ** 2


def random_saliency(n: int, seed: int) -> torch.Tensor:
    """Seeded uniform scores [n]: the random-selection baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g)
