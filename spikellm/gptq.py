"""One GPTQ solver: column-wise OBS updates with a pluggable per-column quantizer.

RTN (no error feedback), GPTQ, PB-LLM and SpikeLLM ternary spiking weights are all this loop
with different `ColumnQuantizer`s. Shapes: W [C_out, C_in] (a linear's weight), H [C_in, C_in]
= 2/n Σ x xᵀ over the calibration tokens.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .hessian import HessianAccumulator, PreparedHessian, inverse_hessian_cholesky, prepare_hessian
from .quantizers import ColumnQuantizer

__all__ = ["HessianAccumulator", "SolveResult", "gptq_solve", "reconstruction_error"]


@dataclass
class SolveResult:
    Q: torch.Tensor                 #: quantized weights [C_out, C_in], original column order
    loss: float                     #: GPTQ's Σ (w-q)²/(2 U_jj²), the OBS proxy it minimises
    recon_error: float              #: tr((W-Q) H (W-Q)ᵀ) with the undamped H = mean ‖(W-Q)x‖² * 2
    damp: float                     #: damping fraction actually used (raised on Cholesky failure)
    seconds: float
    perm: torch.Tensor | None = field(default=None, repr=False)


def reconstruction_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(Δ H Δᵀ), Δ = W - Q: twice the mean squared output error over the calibration tokens."""
    D = (W - Q).to(H.dtype)
    return float(((D @ H) * D).sum())


@contextlib.contextmanager
def _single_thread(enabled: bool):
    """The column loop is thousands of tiny ops: on CPU, OpenMP fork/join around each of them
    costs more than the op (and spin-waits badly when cores are shared), so run it on one thread."""
    if not enabled:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_solve(W: torch.Tensor, H: torch.Tensor | None, quantizer: ColumnQuantizer,
               blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False,
               error_feedback: bool = True, on_damp=None,
               prepared: PreparedHessian | None = None) -> SolveResult:
    """Quantize W column by column; with `error_feedback` each column's error is spread over
    the not-yet-quantized columns through U = chol(H⁻¹) (GPTQ), without it this is RTN.

    H None means identity (RTN without calibration). `quantizer` is fitted on the fly at the
    first column of each of its spans. A Cholesky failure retries with tenfold damping and
    reports it through `on_damp(new_percdamp)`; it never raises for a merely ill-conditioned H.
    `prepared`: `prepare_hessian(H, ...)` already done by the caller (e.g. for the saliency
    scores), reused instead of a second inversion; with `actorder` the permuted H is inverted.
    """
    t0 = time.time()
    W0 = W.detach().float()
    W = W0.clone()
    C_out, C_in = W.shape
    H_orig = torch.eye(C_in, device=W.device) if H is None else H.float()
    ph = prepared if prepared is not None else \
        prepare_hessian(H, C_in, W.device, percdamp, on_retry=None if actorder else on_damp)
    H, U, damp = ph.H, ph.U, ph.damp
    W[:, ph.dead] = 0

    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if hasattr(quantizer, "permute"):
            quantizer.permute(perm)
        U, damp = inverse_hessian_cholesky(H, percdamp, on_retry=on_damp)
    quantizer.prepare(W, U)

    Q = torch.zeros_like(W)
    losses = torch.zeros(C_out, device=W.device)
    span = quantizer.span
    for i1 in range(0, C_in, blocksize):
        i2 = min(i1 + blocksize, C_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _single_thread(W.device.type == "cpu"):
            _solve_block(quantizer, W, W1, Q1, Err1, U1, losses, i1, i2, span, C_in,
                         error_feedback)
        Q[:, i1:i2] = Q1
        if error_feedback:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return SolveResult(Q=Q, loss=float(losses.sum()), damp=damp,
                       recon_error=reconstruction_error(W0, Q, H_orig),
                       seconds=time.time() - t0, perm=perm)


def _solve_block(quantizer, W, W1, Q1, Err1, U1, losses, i1, i2, span, C_in, error_feedback):
    """Columns i1..i2-1: quantize each, spread its error over the rest of the block."""
    for i in range(i2 - i1):
        j = i1 + i
        if quantizer.needs_fit(j):
            end = C_in if span <= 0 else min(j + span, C_in)
            # current values: this block's updated columns, then the rest of W
            cols = W1[:, i:] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], 1)
            quantizer.fit(j, cols[:, : end - j])
        w = W1[:, i]
        d = U1[i, i]
        q = quantizer.quantize(j, w)
        Q1[:, i] = q
        err = (w - q) / d
        losses += err ** 2 / 2
        if error_feedback:
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
        Err1[:, i] = err
