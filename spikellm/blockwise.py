"""The one sequential block-wise engine every method runs on (method.md §4, §5).

Capture the inputs of decoder block 0 for every calibration sample, then per block: onload it
(from memory, or streamed from the checkpoint's shards), hand it to a method plug-in (a
`BlockMethod`: RTN, GPTQ, PB-LLM, ternary spiking, OmniQuant/SpikeLLM, or a statistics pass)
which changes it in place, propagate the named activation streams (e.g. "hidden", or "fp" and
"q" for OmniQuant's full-precision and quantized-prefix inputs) to the next block, commit the
block to the checkpoint, write it back and offload it. Progress, resume after a kill and the
per-module statistics (loss, time, memory: `ModuleStats`) and per-layer costs live here, once.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .allocation import LayerCost
from .embedded import sha256_file
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
    c_out: int = 0
    c_in: int = 0
    ace: float = 0.0               #: bit-operations per token (see allocation.layer_cost)
    fp16_ace: float = 0.0
    additive_fraction: float = 0.0
    storage_bits: float = 16.0     #: bits per weight as stored (allocation.storage_bits_per_weight)
    scale_mults: float = 0.0       #: FP16 scale multiplies per output and token

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


@dataclass
class BlockResult:
    """What a method did to one block."""
    #: per-module statistics rows (module_stats.json)
    rows: list[ModuleStats] = field(default_factory=list)
    #: per linear layer and token: steps, ACE, storage bits (layer_costs.json)
    costs: list[LayerCost] = field(default_factory=list)
    #: the next block's inputs per stream name, each [N, seqlen, hidden]; None: the engine runs
    #: every stream through the processed block
    streams: dict[str, torch.Tensor] | None = None
    #: tensors checkpointed with the block and returned by the engine (e.g. learned LET scales)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class BlockMethod:
    """The plug-in protocol of the engine: prepare -> process every block -> finalize.

    A method subclasses this, sets the class attributes and overrides `process` (and, where it
    needs them, the other hooks). The engine never looks inside a method."""
    #: progress-bar label
    desc: str = "quantize"
    #: names of the activation streams; every stream starts as block 0's inputs
    streams: tuple[str, ...] = ("hidden",)
    #: False: the method reads no activations (plain RTN); no calibration forward is run
    needs_inputs: bool = True

    def __init__(self):
        #: set by the engine: a short status (e.g. the epoch loss) for the progress bar
        self.status: Callable[[str], None] = lambda msg: None

    def prepare(self, model: nn.Module, spec: FamilySpec) -> None:
        """Before the first block (also on resume): e.g. seed, swap attention implementations."""

    def restore(self, block: nn.Module) -> None:
        """Before a checkpointed block's state loads into `block` (e.g. wrap its linears so the
        saved quantizer buffers fit)."""

    def process(self, i: int, block: nn.Module, inputs: dict[str, BlockInputs]) -> BlockResult:
        """Quantize (or measure) block i in place; `inputs` maps stream name -> its BlockInputs."""
        raise NotImplementedError

    def finalize(self, model: nn.Module, spec: FamilySpec) -> None:
        """After the last block (e.g. switch the KV cache off)."""

    def baseline_ace(self, c: LayerCost) -> float:
        """ACE of layer `c` as the method's one-step baseline (for cost/ace_rel_baseline)."""
        return c.ace

    def restore_for_inference(self, model: nn.Module) -> None:
        """Give a freshly loaded model the runtime modules this method's quantized model has
        (e.g. activation quantizers), so that its saved tensors, buffers included, load back."""


@dataclass
class EngineResult:
    """Every block's rows, costs and extras, in block order (restored blocks included)."""
    stats: list[ModuleStats]
    costs: list[LayerCost]
    extras: list[dict]
    seconds: float
    #: the streams after the last block (stream name -> [N, seqlen, hidden]); empty without inputs
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


#: written by the caller into a checkpoint directory (e.g. {"key": stage key, "code": digest}):
#: every block file records it, and blocks written under another tag are never resumed from
CHECKPOINT_TAG = "tag.json"


def _ckpt_tag(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / CHECKPOINT_TAG).read_text())
    except (OSError, ValueError):
        return {}


def _write_synced(path: Path, data) -> str:
    """torch.save `data` to a temporary file, fsync, rename to `path`; -> SHA-256 of the bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename into it survives a crash (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_block_checkpoint(ckpt: Path, i: int, block: nn.Module, streams: dict[str, torch.Tensor],
                          stats: list[ModuleStats], extra: dict | None = None,
                          costs: list[LayerCost] | None = None) -> None:
    """Commit block i: `block-i.pt` (its state; streamed blocks on meta are already on disk and
    are left out; the stats and layer costs so far; `extra`, e.g. learned parameters), `streams-i.pt` (the
    activation `streams` the next block starts from, e.g. {"hidden": [N, L, h]}), then the header
    `block-i.json` (block index, both SHA-256s, the directory's tag), which is the commit mark.
    Each file is fsynced and renamed into place. Only the two newest blocks keep their streams
    file (older ones are deleted, never rewritten), so a bad newest block is recomputed from the
    one before it."""
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in block.state_dict().items() if v.device.type != "meta"}
    header = {"block": i, "tag": _ckpt_tag(ckpt),
              "sha256": _write_synced(ckpt / f"block-{i:05d}.pt",
                                      {"block": i, "state": state, "stats": [r.row() for r in stats],
                                       "costs": [c.row() for c in costs or []], "extra": extra or {}}),
              "streams_sha256": _write_synced(ckpt / f"streams-{i:05d}.pt",
                                              {k: v.cpu() for k, v in streams.items()})}
    tmp = ckpt / f".block-{i:05d}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(header, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / f"block-{i:05d}.json")
    fsync_dir(ckpt)
    (ckpt / f"streams-{i - 2:05d}.pt").unlink(missing_ok=True)


def _header(ckpt: Path, i: int) -> dict:
    return json.loads((ckpt / f"block-{i:05d}.json").read_text())


def _check_block(ckpt: Path, i: int, tag: dict) -> str | None:
    """Why block i's checkpoint cannot be used, or None if it is intact and ours."""
    try:
        header = _header(ckpt, i)
    except FileNotFoundError:
        return "no header (never committed)"
    except (OSError, ValueError):
        return "unreadable header"
    if header.get("block") != i:
        return f"header names block {header.get('block')}"
    if header.get("tag") != tag:
        return "written under another config or code version"
    try:
        if sha256_file(ckpt / f"block-{i:05d}.pt") != header.get("sha256"):
            return "checksum mismatch (truncated or overwritten)"
    except FileNotFoundError:
        return "payload missing"
    return None


def _streams_ok(ckpt: Path, i: int) -> bool:
    try:
        return sha256_file(ckpt / f"streams-{i:05d}.pt") == _header(ckpt, i).get("streams_sha256")
    except (OSError, ValueError):
        return False


def load_block_checkpoint(ckpt: Path | None, blocks: nn.ModuleList,
                          prepare: Callable[[nn.Module], None] | None = None, log=None
                          ) -> tuple[int, dict[str, torch.Tensor], list[ModuleStats], list[dict],
                                     list[LayerCost]]:
    """Restore the committed blocks 0..k (after `prepare(block)`, e.g. wrapping its linears so the
    saved buffers fit) -> (k+1, the streams block k+1 starts from, stats, every block's extra,
    layer costs).

    Blocks are checked in order (header, checksum, tag); the first bad one and every block after
    it are discarded with one line, and the run resumes from the newest good block whose streams
    file is intact (or from the start)."""
    if ckpt is None or not ckpt.exists():
        return 0, {}, [], [], []
    tag = _ckpt_tag(ckpt)
    found = sorted({int(p.stem.split("-")[1]) for p in ckpt.glob("block-*.pt")} |
                   {int(p.stem.split("-")[1]) for p in ckpt.glob("block-*.json")})
    good, why = 0, None
    while good in found and (why := _check_block(ckpt, good, tag)) is None:
        good += 1
    resume = good - 1
    while resume >= 0 and not _streams_ok(ckpt, resume):
        resume -= 1
    bad = [i for i in found if i > resume]
    if bad:
        if good in found:
            reason = f"block {good} is unusable ({why})"
        else:
            reason = f"the activations after block {good - 1} are unusable"
        msg = (f"checkpoint {ckpt}: {reason}; discarding blocks {bad[0]}..{bad[-1]} and "
               f"recomputing " + (f"after block {resume}" if resume >= 0 else "from the start"))
        (log or (lambda m: print(f"[spikellm] {m}", file=sys.stderr, flush=True)))(msg)
        for i in bad:
            for name in (f"block-{i:05d}.pt", f"block-{i:05d}.json", f"streams-{i:05d}.pt"):
                (ckpt / name).unlink(missing_ok=True)
    if resume < 0:
        return 0, {}, [], [], []
    extras = []
    for i in range(resume + 1):
        data = torch.load(ckpt / f"block-{i:05d}.pt", weights_only=True)
        if data["state"]:                         # empty for streamed blocks (already on disk)
            if prepare is not None:
                prepare(blocks[data["block"]])
            blocks[data["block"]].load_state_dict(data["state"])
        extras.append(data.get("extra", {}))
    streams = torch.load(ckpt / f"streams-{resume:05d}.pt", weights_only=True)
    return (resume + 1, streams, [ModuleStats(**r) for r in data["stats"]], extras,
            [LayerCost(**r) for r in data["costs"]])


def run_blockwise(model: nn.Module, spec: FamilySpec, ids: torch.Tensor, method: BlockMethod,
                  device="cpu", batch_size: int = 8, progress: bool = True,
                  checkpoint_dir: str | os.PathLike | None = None, log=None, stream=None,
                  on_block=None) -> EngineResult:
    """Run `method` over every block of `model` on calibration ids [N, seqlen].

    Captures block-0 inputs (unless the method needs none), then per block: onload (with
    `stream`, a `streaming.BlockStream`, the block is materialized from the checkpoint shards;
    otherwise it is in memory), `method.process`, propagate its streams (the method's own, or
    every stream through the processed block), write back and offload (`stream.release`), commit
    to `checkpoint_dir`. A progress bar per block shows the block's summed loss and elapsed time.

    With `checkpoint_dir`, every finished block is committed there (its weights, the next
    block's streams, the stats, costs and extras so far), and a later call with the same directory
    resumes after the last committed block with the same result as an uninterrupted run.

    `on_block(row)` is called after each finished block with {"index", "loss" (the block's summed
    reconstruction/training loss), "seconds" (this block), "elapsed_s", "peak_mem_gb" (GiB: GPU
    peak on CUDA, else the process's peak RSS)}: live logging of long runs."""
    from tqdm.auto import tqdm

    t_start = time.time()
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    blocks = blocks_of(model, spec)
    method.prepare(model, spec)
    start, saved, stats, extras, costs = load_block_checkpoint(ckpt, blocks, prepare=method.restore, log=log)
    streams: dict[str, BlockInputs] = {}
    if method.needs_inputs:
        inputs = capture_block_inputs(model, spec, ids if start == 0 else ids[:1], device)
        for k, name in enumerate(method.streams):
            hidden = (inputs.hidden if k == 0 else inputs.hidden.clone()) if start == 0 \
                else saved[name].to(device)
            streams[name] = BlockInputs(hidden=hidden, kwargs=inputs.kwargs)
    if start and log is not None:
        log(f"resuming after block {start - 1} from {ckpt}")
    bar = tqdm(range(start, len(blocks)), desc=method.desc, unit="block", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, initial=start, total=len(blocks))
    method.status = lambda msg: bar.set_postfix_str(f"{msg}, elapsed {time.time() - t_start:.0f}s")
    for i in bar:
        t_block = time.time()
        block = blocks[i] if stream is None else stream.materialize(i, blocks[i])
        res = method.process(i, block, streams)
        stats.extend(res.rows)
        costs.extend(res.costs)
        extras.append(res.extra)
        if method.needs_inputs:
            nxt = res.streams if res.streams is not None else \
                {n: forward_block(block, x, batch_size) for n, x in streams.items()}
            streams = {n: BlockInputs(hidden=nxt[n], kwargs=x.kwargs) for n, x in streams.items()}
        if stream is not None:
            stream.release(i, block)          # written before the checkpoint names block i done
        if ckpt is not None:
            save_block_checkpoint(ckpt, i, block, {n: x.hidden for n, x in streams.items()}, stats,
                                  res.extra, costs)
        bar.set_postfix(loss=f"{sum(r.loss for r in res.rows):.3g}",
                        elapsed=f"{time.time() - t_start:.0f}s")
        if on_block is not None:
            on_block({"index": i, "loss": float(sum(r.loss for r in res.rows)),
                      "seconds": time.time() - t_block, "elapsed_s": time.time() - t_start,
                      "peak_mem_gb": peak_memory_gb(device)})
    method.finalize(model, spec)
    return EngineResult(stats=stats, costs=costs, extras=extras, seconds=time.time() - t_start,
                        outputs={n: x.hidden for n, x in streams.items()})
