"""Faithful export: a quantized model as a checkpoint directory that loads back to the model
whose perplexity was reported.

Layout (transformers' own): `config.json`, `model*.safetensors` (every tensor of the quantized
model: the quantized weights, dense in the model dtype, and the method's runtime tensors such as
activation-quantizer ranges, K/V ranges and salient masks), the tokenizer files, and in
`config.json` a `quantization_config`::

    {"quant_method": "spikellm", "format": 1, "quant": {...}, "spiking": {...},
     "runtime_tensors": 420, "base_model_type": "llama"}

`quant` and `spiking` hold every field of the typed configs (`spikellm.config`), so
`load_quantized` rebuilds the very method that produced the tensors.

What a plain `AutoModelForCausalLM.from_pretrained(path)` does:
- weight-only methods (RTN, GPTQ, PB-LLM, ternary spiking weights: the quantized weights are dense
  tensors the base architecture reads, `runtime_tensors` 0) keep the base `model_type`; a plain
  load gives the same model (transformers notes that it does not know quant_method "spikellm").
- `save_format=packed` (`pack_checkpoint`): the linear weights are in packed.safetensors as
  codes + FP16 scales (`spikellm.packing`), not in the shards; model_type `spikellm`, so a plain
  load fails loudly and `load_quantized` unpacks them.
- methods with runtime modules (OmniQuant/SpikeLLM: activation, weight and K/V quantizers) would
  load as weights only and compute another model without saying so, so their `model_type` is
  `spikellm`: a plain load fails with transformers' unknown-model-type error, and
  `load_quantized` loads them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from enum import Enum
from pathlib import Path

from torch import nn

QUANT_METHOD = "spikellm"
#: config.json's model_type of an export whose model needs runtime modules (loads only here)
MODEL_TYPE = "spikellm"
FORMAT = 1


def _fields(cfg) -> dict:
    """Every field of a typed method/spiking config, enums as their values (JSON-ready)."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(cfg).items()}


def _tensor_names(directory: Path) -> set[str]:
    from .streaming import ShardReader
    reader = ShardReader(directory)
    try:
        return set(reader.where)
    finally:
        reader.close()


def _tensor_names_of(config, q=None, s=None, rotate=None) -> set[str]:
    """The tensor names of the plain architecture of `config` (built on meta, no memory), or,
    with `q`/`s`, of that architecture with the method's runtime modules restored."""
    from .footprint import meta_model
    from .methods import make_method
    from .models import family_of
    model = meta_model(config)
    if q is not None:
        make_method(q, s, family_of(model), rotate).restore_for_inference(model)
    return set(model.state_dict())


def mark_quantized(directory: str | os.PathLike, q, s, rotate=None) -> dict:
    """Write the `quantization_config` of method `q` / spiking mode `s` (and `rotate`, a
    `config.Rotation`) into the config.json of a saved checkpoint `directory` (its shards as
    written from the quantized model); with runtime tensors (tensors the plain architecture
    lacks) or a rotation (online Hadamards, which transformers alone would not apply) its
    model_type becomes `spikellm`. Returns the quantization_config."""
    from transformers import AutoConfig
    directory = Path(directory)
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    if raw.get("model_type") == MODEL_TYPE:
        raise ValueError(f"{directory} is already a spikellm export")
    config = AutoConfig.from_pretrained(directory)
    base = _tensor_names_of(config)
    saved = _tensor_names(directory)
    runtime = sorted(saved - base)
    expected = _tensor_names_of(config, q, s, rotate) - base
    if set(runtime) != expected:
        odd = sorted(set(runtime) ^ expected)
        raise ValueError(f"the tensors in {directory} are not those of quant={q.method} spiking={s.mode} "
                         f"(e.g. {odd[0]}): pass the configs the model was quantized with")
    rotated = rotate is not None and rotate.active
    qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "quant": _fields(q), "spiking": _fields(s),
          "runtime_tensors": len(runtime), "base_model_type": raw["model_type"]}
    if rotated:
        qc["rotate"] = _fields(rotate)
    raw["quantization_config"] = qc
    if runtime or rotated:
        raw["model_type"] = MODEL_TYPE
        raw["_load_with"] = "import spikellm; spikellm.load_quantized(path)  (transformers alone " \
                            "would drop the " + ("online Hadamard rotations" if rotated and not runtime
                                                 else "activation/KV quantizers") + ")"
    tmp = path.with_name(path.name + ".tmp")      # a new file: never writes through a hard link
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return qc


def save_quantized(model: nn.Module, tokenizer, q, s, directory: str | os.PathLike,
                   max_shard_size: str = "5GB", rotate=None) -> dict:
    """Save a model quantized by `spikellm.quantize(model, ..., q, s, rotate=...)` (or restored
    for inference from such a run) as a faithful checkpoint in `directory`. Returns its
    quantization_config."""
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return mark_quantized(directory, q, s, rotate)


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Every file of checkpoint directory `src` into a new directory `dst`: the tensor files
    (*.safetensors) as hard links where the filesystem allows (no second copy of the weights),
    else copies; the small files (config, tokenizer) always as copies."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            try:
                os.link(f, dst / f.name)
                continue
            except OSError:
                pass
        shutil.copy2(f, dst / f.name)


def quantization_config(directory: str | os.PathLike) -> dict | None:
    """The spikellm quantization_config of an exported checkpoint, or None for any other."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a checkpoint directory")
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == QUANT_METHOD else None


def load_quantized(directory: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """Load an exported checkpoint (`save_quantized`, or `save_model=true` of the pipeline) with
    its method's runtime modules and their tensors restored -> `models.LoadedModel` that computes
    what the quantized model computed (tokenizer None where none was saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .config import QuantConfig, Rotation, SpikingConfig
    from .methods import restore_quantized
    from .models import _DTYPES, LoadedModel, family_of

    directory = Path(directory)
    qc = quantization_config(directory)
    if qc is None:
        raise ValueError(f"{directory} is not a spikellm export (no quantization_config with "
                         f"quant_method {QUANT_METHOD!r}): load it with spikellm.load_model")
    if qc.get("format") != FORMAT:
        raise ValueError(f"{directory} is spikellm export format {qc.get('format')}; this version "
                         f"reads format {FORMAT}: re-export it with save_model=true")
    quant, spiking = dict(qc["quant"]), dict(qc["spiking"])
    q = QuantConfig(quant.pop("method"), **quant)
    s = SpikingConfig(spiking.pop("mode"), **spiking)
    r = Rotation(**qc["rotate"]) if qc.get("rotate") else None
    raw = json.loads((directory / "config.json").read_text())
    raw.pop("quantization_config")
    raw.pop("_load_with", None)
    raw["model_type"] = qc["base_model_type"]
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()    # its load report lists the runtime tensors as unexpected:
    try:                                # they are, until restore_quantized loads them below;
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=_DTYPES[dtype],
                                                     attn_implementation="sdpa")
        # (the tokenizer's own read of config.json would warn about model_type spikellm)
        tokenizer = AutoTokenizer.from_pretrained(directory) \
            if (directory / "tokenizer_config.json").exists() else None
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    if qc.get("packed"):
        unpack_into(model, directory / qc["packed"]["file"], qc["packed"].get("weight_dtype"))
    spec = family_of(model)
    restore_quantized(model, spec, q, s, directory, r)
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(directory), spec=spec)


PACKED_FILE = "packed.safetensors"


def pack_checkpoint(directory: str | os.PathLike, packed_file: str | os.PathLike) -> dict:
    """Make the dense export in `directory` a packed one: the linear weights that `packed_file`
    holds (`packing.pack_layer` tensors, "<module path>.<tensor>") leave the shards, the packed
    file joins them as packed.safetensors, and config.json records it (model_type `spikellm`:
    a plain transformers load would lack those weights, so it fails with the unknown-type error).
    Shards are rewritten as new files (never through a hard link).
    -> {"layers", "bytes" (of packed.safetensors), "params" (weights packed), "bits_per_weight"}."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .packing import layer_meta, split_layers
    directory = Path(directory)
    layers = split_layers(load_file(str(packed_file)))
    drop = {f"{name}.weight" for name in layers}
    index = directory / "model.safetensors.index.json"
    shards = sorted(p for p in directory.glob("*.safetensors") if p.name != PACKED_FILE)
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    keys, dtypes = {}, set()
    for shard in shards:                         # check everything before changing anything
        with safe_open(str(shard), "pt") as f:
            keys[shard] = set(f.keys()) & drop
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in keys[shard]}
    found = set().union(*keys.values()) if keys else set()
    if found != drop:
        raise ValueError(f"{packed_file} packs layers the checkpoint lacks (e.g. {sorted(drop - found)[0]})")
    for shard in shards:
        if keys[shard]:
            tensors = load_file(str(shard))
            tmp = shard.with_name(shard.name + ".tmp")
            save_file({k: v for k, v in tensors.items() if k not in drop}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, shard)               # a new file: a hard-linked original stays intact
    if weight_map is not None:
        weight_map = {k: v for k, v in weight_map.items() if k not in drop}
        raw = json.loads(index.read_text())
        raw["weight_map"] = weight_map
        tmp = index.with_name(index.name + ".tmp")
        tmp.write_text(json.dumps(raw, indent=2))
        os.replace(tmp, index)
    target = directory / PACKED_FILE
    tmp = target.with_name(target.name + ".tmp")
    try:
        os.link(packed_file, tmp)
    except OSError:
        shutil.copy2(packed_file, tmp)
    os.replace(tmp, target)
    params = sum(layer_meta(t)["shape"][0] * layer_meta(t)["shape"][1] for t in layers.values())
    nbytes = target.stat().st_size
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    # the dtype the dense weights had (the model's): unpacking rounds to it, as the run did
    weight_dtype = dtypes.pop() if len(dtypes) == 1 else None
    raw["quantization_config"]["packed"] = {"file": PACKED_FILE, "layers": len(layers), "params": params,
                                            "weight_dtype": weight_dtype}
    raw["model_type"] = MODEL_TYPE
    raw["_load_with"] = "import spikellm; spikellm.load_quantized(path)  (the linear weights are packed)"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return {"layers": len(layers), "bytes": nbytes, "params": params, "bits_per_weight": 8 * nbytes / params}


#: safetensors' dtype names -> torch dtypes (the packed weights' original dtype)
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def unpack_into(model: nn.Module, packed_file: str | os.PathLike, weight_dtype: str | None = None) -> int:
    """Set every packed linear's weight of `model` from `packed_file`, rounded first to
    `weight_dtype` (the dtype the quantized model computed in, a safetensors name such as F16),
    so that loading in another dtype gives what a dense export would; returns the layer count."""
    import torch
    from safetensors.torch import load_file

    from .packing import split_layers, unpack_layer
    layers = split_layers(load_file(str(packed_file)))
    via = getattr(torch, _ST_DTYPES[weight_dtype]) if weight_dtype in _ST_DTYPES else None
    with torch.no_grad():
        for name, t in layers.items():
            w = model.get_submodule(name).weight
            u = unpack_layer(t)
            w.data = (u if via is None else u.to(via)).to(w.dtype)
    return len(layers)


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's tensor files (*.safetensors)."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


