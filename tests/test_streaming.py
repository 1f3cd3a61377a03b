"""Block streaming from safetensors shards of the real embedded checkpoint (SmolLM2-135M).

To keep CI short the checkpoint is cut to its first 6 decoder blocks (real weights, saved with
transformers' save_pretrained as 2 shards); the streaming code path is the same for 30 or 80."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from conftest import count_materialized
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.models import blocks_of, load_model
from spikellm.quantize import quantize
from spikellm.streaming import materialized_parameters, open_streaming

Q, S = QuantConfig(method="gptq", wbits=3), SpikingConfig(mode="none")


N_BLOCKS = 6          # the `src` fixture (conftest.py): the embedded model cut to its first 6 blocks


def _ids():
    return torch.randint(0, 4000, (2, 64), generator=torch.Generator().manual_seed(0))


def test_streamed_gptq_holds_one_block_and_equals_the_whole_model_run(tmp_path, src):
    from transformers import AutoTokenizer
    stream = open_streaming(src, tmp_path / "q", dtype="float32")
    blocks = blocks_of(stream.model)
    one_block = sum(p.numel() for p in blocks[0].parameters())
    rest = materialized_parameters(stream.model)
    assert rest == sum(p.numel() for n, p in stream.model.named_parameters()
                       if not n.startswith("model.layers."))                 # no block loaded yet
    seen = []
    count_materialized(stream, seen)
    quantize(stream.model, _ids(), Q, S, progress=False, log=lambda *_: None, stream=stream)
    assert len(seen) == len(blocks) and max(seen) == rest + one_block       # never two blocks
    assert materialized_parameters(stream.model) == rest                    # all released
    out = stream.finish(AutoTokenizer.from_pretrained(str(src)))
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) >= N_BLOCKS * 9
    streamed = load_model(str(out))                # loads with transformers from_pretrained
    whole = load_model(str(src))
    quantize(whole.model, _ids(), Q, S, progress=False, log=lambda *_: None)
    a, b = streamed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_run_resumes_after_a_crash_without_redoing_written_blocks(tmp_path, src):
    qmod = importlib.import_module("spikellm.quantize")   # the module (spikellm.quantize is the function)
    real = qmod.gptq_solve
    calls = {"n": 0}

    def crash_in_block_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3 * 7 + 1:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    qmod.gptq_solve = crash_in_block_3
    try:
        s = open_streaming(src, tmp_path / "q", "float32")
        with pytest.raises(KeyboardInterrupt):
            quantize(s.model, _ids(), Q, S, progress=False, log=lambda *_: None, checkpoint_dir=tmp_path / "ckpt", stream=s)
    finally:
        qmod.gptq_solve = real
    assert sorted(p.name for p in (tmp_path / "q").glob("block-*")) == \
        [f"block-0000{i}.safetensors" for i in range(3)]
    s2 = open_streaming(src, tmp_path / "q", "float32")
    seen = []
    count_materialized(s2, seen)
    quantize(s2.model, _ids(), Q, S, progress=False, log=lambda *_: None,
             checkpoint_dir=tmp_path / "ckpt", stream=s2)
    assert len(seen) == N_BLOCKS - 3                     # blocks 0-2 were not loaded again
    from transformers import AutoTokenizer
    resumed = load_model(str(s2.finish(AutoTokenizer.from_pretrained(str(src)))))
    whole = load_model(str(src))
    quantize(whole.model, _ids(), Q, S, progress=False, log=lambda *_: None)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
