"""Block streaming for models larger than host or GPU memory (LLaMA-2-70B: 138 GB in fp16).

`open_streaming(source)` builds the model on the meta device from its config.json, loads only
the non-block tensors (embeddings, final norm, lm_head) from the checkpoint's safetensors shards
(memory-mapped by safetensors), and returns a `BlockStream`. During quantization
`stream.materialize(i)` fills decoder block i from the shards just before it is processed and
`stream.release(i)` writes the finished block to the output checkpoint and returns it to the
meta device, so memory holds one block (plus the calibration activations) at a time.

The output directory is a standard sharded safetensors checkpoint (one shard per block, one for
the rest, `model.safetensors.index.json`, config.json) that `AutoModelForCausalLM.from_pretrained`
loads. Shards are written atomically, so a killed run leaves only complete blocks behind and a
resumed run (see `blockwise.run_blockwise`'s checkpoint) continues after them.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .models import _DTYPES, FamilySpec, blocks_of, family_of

INDEX = "model.safetensors.index.json"


class ShardReader:
    """Tensor name -> tensor from a directory of safetensors shards (single file or indexed)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir} has no model.safetensors or {INDEX}: streaming needs a "
                                    f"safetensors checkpoint (convert .bin weights with save_pretrained)")
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    def names(self, prefix: str = "") -> list[str]:
        return [k for k in self.where if k.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        if shard not in self._open:
            self._open[shard] = self._stack.enter_context(
                safe_open(self.dir / shard, framework="pt", device="cpu"))
        return self._open[shard].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def materialized_parameters(module: nn.Module) -> int:
    """Number of parameter elements that hold real storage (not on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


class BlockStream:
    """Decoder blocks in and out of memory one at a time; see the module docstring."""

    def __init__(self, model: nn.Module, reader: ShardReader, spec: FamilySpec,
                 out_dir: Path | None, device: str | torch.device, dtype: torch.dtype):
        """`out_dir=None`: read-only streaming (statistics passes); blocks are only freed."""
        self.model, self.reader, self.spec = model, reader, spec
        self.out = Path(out_dir) if out_dir is not None else None
        self.device, self.dtype = torch.device(device), dtype
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)

    def _prefix(self, i: int) -> str:
        return f"{self.spec.blocks}.{i}."

    def shard_name(self, i: int) -> str:
        return f"block-{i:05d}.safetensors"

    def done(self, i: int) -> bool:
        return (self.out / self.shard_name(i)).exists()

    def materialize(self, i: int, block: nn.Module | None = None) -> nn.Module:
        """Load block i's tensors from the source shards onto the device (strictly: all of them)."""
        block = block if block is not None else blocks_of(self.model, self.spec)[i]
        p = self._prefix(i)
        state = {k[len(p):]: self._cast(self.reader.get(k)) for k in self.reader.names(p)}
        block.to_empty(device=self.device)
        block.load_state_dict(state, strict=True)
        return block

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        """Floating tensors in the stream's dtype; masks and other integer buffers as they are."""
        return t.to(self.dtype) if t.is_floating_point() else t

    def release(self, i: int, block: nn.Module | None = None) -> None:
        """Write the finished block i to the output checkpoint, then free it (back to meta)."""
        block = block if block is not None else blocks_of(self.model, self.spec)[i]
        if self.out is None:
            block.to("meta")
            return
        p = self._prefix(i)
        tensors = {p + k: self._cast(v.detach().cpu()).contiguous() for k, v in block.state_dict().items()}
        tmp = self.out / f".{self.shard_name(i)}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out / self.shard_name(i))
        block.to("meta")

    def finish(self, tokenizer=None) -> Path:
        """Write the non-block tensors, the index and config.json: a from_pretrained-able checkpoint."""
        n_blocks = len(blocks_of(self.model, self.spec))
        missing = [i for i in range(n_blocks) if not self.done(i)]
        if missing:
            raise RuntimeError(f"streamed checkpoint in {self.out} lacks blocks {missing[:5]}...")
        rest = {k: v.detach().to("cpu", self.dtype).contiguous()
                for k, v in self.model.state_dict().items() if not k.startswith(self.spec.blocks + ".")}
        if getattr(self.model.config, "tie_word_embeddings", False):
            rest = {k: v for k, v in rest.items() if not k.startswith(self.spec.lm_head + ".")}
        save_file(rest, str(self.out / "rest.safetensors"), metadata={"format": "pt"})
        weight_map = {k: "rest.safetensors" for k in rest}
        for i in range(n_blocks):
            with safe_open(self.out / self.shard_name(i), framework="pt") as f:
                weight_map.update({k: self.shard_name(i) for k in f.keys()})
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        self.model.config.save_pretrained(self.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
        self.close()
        return self.out

    def close(self) -> None:
        """Close the source shards (after `finish`, or after a read-only statistics pass)."""
        self.reader.close()


def open_streaming(source: str | os.PathLike, out_dir: str | os.PathLike | None, dtype: str = "float16",
                   device: str = "cpu") -> BlockStream:
    """The model of a local safetensors checkpoint with every decoder block on the meta device
    and the rest (embeddings, final norm, lm_head, rotary tables) loaded on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype], attn_implementation="sdpa")
    model.config.use_cache = False
    model.eval()
    spec = family_of(model)
    reader = ShardReader(source)
    blocks_prefix = spec.blocks + "."
    rest = {k: reader.get(k).to(device=device, dtype=_DTYPES[dtype])
            for k in reader.names() if not k.startswith(blocks_prefix)}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary inverse frequencies) are not in the checkpoint: rebuild them
    for name, mod in model.named_modules():
        if name.startswith(spec.blocks):
            continue
        if any(b.device.type == "meta" for b in mod.buffers(recurse=False)):
            parent, _, leaf = name.rpartition(".")
            with torch.device(device):
                fresh = type(mod)(config=config)
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
    left = [k for k, v in model.state_dict().items()
            if v.device.type == "meta" and not k.startswith(blocks_prefix)]
    if left:
        raise RuntimeError(f"checkpoint {source} lacks non-block tensors {left[:3]}")
    return BlockStream(model, reader, spec, out_dir, device, _DTYPES[dtype])
