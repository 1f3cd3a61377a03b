"""Shared fixtures: the real embedded model (SmolLM2-135M) and the real data directory.

The data directory is `$SPIKELLM_DATA_DIR` (CI sets it to ../shared/data) or ../shared/data
next to the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    d = os.environ.get("SPIKELLM_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    return Path(d)


@pytest.fixture(scope="session")
def data_root() -> Path:
    d = data_dir()
    if not (d / "wikitext-2-raw-v1" / "wiki.test.raw").exists():
        pytest.fail(f"real data not found in {d}: set SPIKELLM_DATA_DIR to ../shared/data")
    return d


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model, loaded once per session (converted on first use)."""
    from spikellm.models import load_model, resolve_source
    torch.manual_seed(0)
    return load_model(resolve_source("embedded", None))


@pytest.fixture()
def fresh_smollm(smollm):
    """The session model with its original weights restored after the test."""
    state = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    yield smollm
    smollm.model.load_state_dict(state)


@pytest.fixture(scope="session")
def src(tmp_path_factory):
    """The embedded model's first 6 decoder blocks (real weights) as a sharded safetensors
    checkpoint (transformers' save_pretrained, 2 shards) + tokenizer: the streaming and engine
    tests run on it to keep CI short; the code path is the same for 30 or 80 blocks."""
    from spikellm.embedded import embedded_checkpoint
    from spikellm.models import load_model
    lm = load_model(str(embedded_checkpoint()))
    lm.model.model.layers = lm.model.model.layers[:6]
    lm.model.config.num_hidden_layers = 6
    lm.model.config.layer_types = lm.model.config.layer_types[:6] \
        if getattr(lm.model.config, "layer_types", None) else None
    d = tmp_path_factory.mktemp("ckpt")
    lm.model.save_pretrained(d, max_shard_size="60MB")
    lm.tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").exists()
    return d


def count_materialized(stream, seen: list) -> None:
    """Make `stream.materialize` append the parameters materialized in memory after each block
    is loaded to `seen` (the streaming tests' one-block-at-a-time check)."""
    from spikellm.streaming import materialized_parameters
    real = stream.materialize

    def counting(i, block=None):
        block = real(i, block)
        seen.append(materialized_parameters(stream.model))
        return block
    stream.materialize = counting
