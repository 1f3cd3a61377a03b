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
