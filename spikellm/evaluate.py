"""Perplexity under the GPTQ protocol (method.md §6)."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ over windows of (mean next-token NLL of the window) x seqlen; logits [B, L, V], ids [B, L]."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
    return float(loss.mean(1).sum()) * ids.shape[1]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device="cpu",
               progress: bool = False, desc: str = "ppl") -> float:
    """windows [n, seqlen] token ids -> exp(mean next-token NLL over all n*(seqlen-1) predictions).

    GPTQ's `nll = loss * seqlen`, `exp(Σ nll / (n * seqlen))` equals this up to the seqlen/(seqlen-1)
    normalisation; we follow GPTQ exactly: per-window mean loss, times seqlen, over n*seqlen."""
    from tqdm.auto import tqdm

    n, seqlen = windows.shape
    total = 0.0
    it = range(0, n, batch_size)
    for b0 in tqdm(it, desc=desc, disable=not progress, file=sys.stderr, unit="batch",
                   dynamic_ncols=True):
        ids = windows[b0: b0 + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += _nll_sum(logits, ids)
    return math.exp(total / (n * seqlen))


@torch.no_grad()
def streamed_perplexity(model: nn.Module, windows: torch.Tensor, stream, batch_size: int = 4,
                        device="cpu", progress: bool = False, desc: str = "ppl") -> float:
    """`perplexity` computed block by block (the GPTQ reference's layer-wise evaluation): the
    engine runs every window [n, seqlen] through one decoder block at a time, materialized from
    `stream` (a read-only `streaming.BlockStream`), then the final norm and the head score them.
    Memory: the non-block weights, one block and the hidden states of all windows
    [n, seqlen, hidden]; equal to `perplexity` up to floating-point summation order."""
    return streamed_perplexities(model, {desc: windows}, stream, batch_size, device, progress, desc)[desc]


@torch.no_grad()
def streamed_perplexities(model: nn.Module, windows: dict[str, torch.Tensor], stream,
                          batch_size: int = 4, device="cpu", progress: bool = False,
                          desc: str = "ppl") -> dict[str, float]:
    """`streamed_perplexity` of several window sets ({name: [n_name, seqlen]}, one seqlen) in
    ONE block-by-block pass: each block is read from the shards once for all the sets (a 70B
    model evaluated on three corpora reads its 138 GB once, not three times). Memory: the hidden
    states of all the sets' windows. -> {name: perplexity}."""
    from .blockwise import BlockMethod, BlockResult, run_blockwise
    from .models import family_of, get_module

    lengths = {w.shape[1] for w in windows.values()}
    if len(lengths) != 1:
        raise ValueError(f"streamed evaluation needs one window length for every set, got {sorted(lengths)}")

    class _Forward(BlockMethod):
        """A pass-through: the engine propagates the windows through each block unchanged."""
        def process(self, i, block, inputs):
            return BlockResult()

    spec = family_of(model)
    forward = _Forward()
    forward.desc = desc
    joined = torch.cat(list(windows.values()))
    res = run_blockwise(model, spec, joined.to(device), forward, device=device,
                        batch_size=batch_size, progress=progress, stream=stream)
    hidden = res.outputs["hidden"]
    norm, head = get_module(model, spec.final_norm), get_module(model, spec.lm_head)
    out, start = {}, 0
    for name, w in windows.items():
        total = 0.0
        for b0 in range(0, w.shape[0], batch_size):
            ids = w[b0: b0 + batch_size].to(device)
            h = hidden[start + b0: start + min(b0 + batch_size, w.shape[0])]
            total += _nll_sum(head(norm(h)).float(), ids)
        out[name] = math.exp(total / w.numel())
        start += w.shape[0]
    return out
