"""Perplexity under the GPTQ protocol (method.md §6)."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn


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
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
        total += float(loss.mean(1).sum()) * seqlen
    return math.exp(total / (n * seqlen))
