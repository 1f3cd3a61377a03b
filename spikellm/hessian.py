"""One Hessian preparation per linear (method.md §4): the calibration Hessian H = 2/n Σ x xᵀ,
its dead channels, and U = chol(H⁻¹) upper with damping, computed once and shared by the
saliency scores and the GPTQ column solve.

Shapes: H [C_in, C_in] float32 for a linear of weight [C_out, C_in].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the tokens seen (GPTQ's add_batch); x [..., C_in]."""

    def __init__(self, columns: int, device="cpu", dtype=torch.float32):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.dtype)
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        self.H += x.t() @ x


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6,
                             on_retry=None) -> tuple[torch.Tensor, float]:
    """U = chol(H⁻¹) upper for H + λ·mean(diag H)·I, raising λ tenfold on failure.

    H [C, C] (float32/64, dead channels already handled). Returns (U, λ used). `on_retry(msg)`
    is told about each retry. If every damping fails, U = I / sqrt(mean diag H) (no error
    feedback: round-to-nearest for this layer) and λ = inf; the run never crashes here."""
    damp = percdamp
    mean_diag = torch.diag(H).abs().mean().clamp_min(1e-8)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        try:
            L = torch.linalg.cholesky(H + damp * mean_diag * eye)
            # the reference GPTQ's exact sequence of ops (bit-identical results)
            U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if torch.isfinite(U).all():
                return U, damp
        except torch.linalg.LinAlgError:
            pass
        damp = damp * 10 if damp > 0 else 1e-4
        if on_retry is not None:
            on_retry(f"Cholesky failed, retrying with damping {damp:g}")
    if on_retry is not None:
        on_retry("Cholesky failed at every damping: this layer falls back to round-to-nearest")
    return eye / mean_diag.sqrt(), float("inf")


@dataclass(frozen=True)
class PreparedHessian:
    """What every Hessian-based step of one linear needs, computed once."""
    H: torch.Tensor       #: [C_in, C_in] float32, the calibration H with dead channels' diagonal set to 1
    dead: torch.Tensor    #: [C_in] bool, channels no calibration input reached (diag H == 0)
    U: torch.Tensor       #: [C_in, C_in] upper, chol((H + λ·mean(diag H)·I)⁻¹)
    damp: float           #: λ actually used (inf: every damping failed, round-to-nearest)


def prepare_hessian(H: torch.Tensor | None, columns: int | None = None, device=None,
                    percdamp: float = 0.01, on_retry=None) -> PreparedHessian:
    """Dead channels and the damped inverse Cholesky of H [C_in, C_in]; H None means the
    identity of size `columns` on `device` (RTN without calibration). H is not modified.
    `on_retry(msg)` hears about raised damping (`inverse_hessian_cholesky`)."""
    H = torch.eye(columns, device=device) if H is None else H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U, damp = inverse_hessian_cholesky(H, percdamp, on_retry=on_retry)
    return PreparedHessian(H=H, dead=dead, U=U, damp=damp)
