"""The sequential block-wise engine both pipelines run on.

Capture the inputs of decoder block 0 for every calibration sample, then per block: run an
algorithm on it (which may quantize its linears), recompute the block's outputs with the
result, and hand them on as the next block's inputs. Per-module statistics (loss, time,
memory) are collected in `ModuleStats` rows.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .models import FamilySpec, blocks_of

#: layer kwargs that must not be replayed: a shared KV cache would grow with every sample
_DROP_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed was seen."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, [N, seqlen, hidden], plus the layer kwargs (rotary
    position embeddings, attention mask, positions) shared by all samples (batch dim 1)."""
    hidden: torch.Tensor
    kwargs: dict


@dataclass
class ModuleStats:
    block: int
    module: str
    loss: float
    recon_error: float
    seconds: float
    samples: int
    avg_steps: float
    damp: float
    peak_mem_gb: float

    def row(self) -> dict:
        return asdict(self)


def peak_memory_gb(device: torch.device | str = "cpu") -> float:
    """Peak GPU memory allocated on a CUDA device, else the process' peak RSS, in GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2 ** 20 if sys.platform != "darwin" else rss_kb / 2 ** 30


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: FamilySpec, ids: torch.Tensor,
                         device="cpu") -> BlockInputs:
    """Run the model's embedding stage on ids [N, seqlen] and stop at block 0."""
    block0 = blocks_of(model, spec)[0]
    hidden, kw = [], {}

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        hidden.append(h.detach())
        if not kw:
            kw.update({k: v for k, v in kwargs.items()
                       if k not in _DROP_KWARGS and k != "hidden_states"})
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(ids.shape[0]):
            try:
                model(input_ids=ids[i: i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=torch.cat(hidden), kwargs=kw)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8,
                  collect_only: bool = False) -> torch.Tensor | None:
    """Run `block` over all samples in mini-batches -> outputs [N, seqlen, hidden].

    With `collect_only` the pass exists for its hooks (an `InputCollector` may cut it short)
    and nothing is returned."""
    outs = []
    for b0 in range(0, inputs.hidden.shape[0], batch_size):
        x = inputs.hidden[b0: b0 + batch_size]
        try:
            y = _first(block(x, **inputs.kwargs))
        except _StopForward:
            if not collect_only:
                raise
            continue
        if not collect_only:
            outs.append(y)
    return None if collect_only else torch.cat(outs)


class InputCollector:
    """Forward hooks on some linears of a block, calling `on_input(name, x)` with each input
    x [B, seqlen, C_in]. With `stop_early`, the block's forward is cut as soon as every linear
    of the group has been seen (the rest of the block is not needed for its statistics)."""

    def __init__(self, modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None],
                 stop_early: bool = True):
        self.names = set(modules)
        self.seen: set[str] = set()
        self.stop_early = stop_early
        self.handles = [m.register_forward_hook(self._make(name, on_input))
                        for name, m in modules.items()]

    def _make(self, name, on_input):
        def hook(module, args, output):
            on_input(name, args[0])
            self.seen.add(name)
            if self.stop_early and self.seen >= self.names:
                self.seen.clear()
                raise _StopForward
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


BlockAlgorithm = Callable[[int, nn.Module, BlockInputs], list[ModuleStats]]


def run_blockwise(model: nn.Module, spec: FamilySpec, ids: torch.Tensor, algorithm: BlockAlgorithm,
                  device="cpu", batch_size: int = 8, progress: bool = True,
                  desc: str = "quantize") -> list[ModuleStats]:
    """Capture block-0 inputs for ids [N, seqlen], then per block: `algorithm(i, block, inputs)`
    (which changes the block in place and returns stats rows), recompute the outputs, move on.
    A progress bar per block shows the block's summed loss and elapsed time."""
    from tqdm.auto import tqdm

    inputs = capture_block_inputs(model, spec, ids, device)
    blocks = blocks_of(model, spec)
    stats: list[ModuleStats] = []
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t_start = time.time()
    for i in bar:
        block = blocks[i]
        rows = algorithm(i, block, inputs)
        stats.extend(rows)
        inputs = BlockInputs(hidden=forward_block(block, inputs, batch_size), kwargs=inputs.kwargs)
        bar.set_postfix(loss=f"{sum(r.loss for r in rows):.3g}",
                        elapsed=f"{time.time() - t_start:.0f}s")
    return stats
