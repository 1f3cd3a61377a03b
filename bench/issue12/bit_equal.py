"""Issue 12: quantized weights bit-equal before and after a refactor. Prints a SHA-256 of the
whole quantized state dict per method (2 x 64 WikiText-2 calibration tokens, embedded model);
run it on two checkouts (e.g. `git worktree add ../before <commit>`) on one machine and diff:

    PYTHONPATH=<checkout> OMP_NUM_THREADS=1 .venv/bin/python bench/issue12/bit_equal.py
"""
import os
import hashlib, sys, torch
from spikellm.models import load_model, resolve_source
from spikellm.data import CalibSpec, calibration_set
from spikellm.config import QuantConfig, SpikingConfig
from spikellm.quantize import quantize
from spikellm.omniquant import omniquant
torch.set_num_threads(1)
D = os.environ.get("SPIKELLM_DATA_DIR", "../shared/data")
out = []
for name, q, s in [
    ("gptq w3 g64", QuantConfig(method="gptq", wbits=3, group_size=64), SpikingConfig()),
    ("gptq w4 actorder", QuantConfig(method="gptq", wbits=4, actorder=True), SpikingConfig()),
    ("ternary element g64", QuantConfig(method="gptq", group_size=64), SpikingConfig(mode="ternary", ratio=0.2, steps=3, granularity="element", group_size=64)),
    ("rtn w3", QuantConfig(method="rtn", wbits=3), SpikingConfig()),
    ("omni w2a16 gif weights", QuantConfig(method="omniquant", wbits=2, abits=16, epochs=1, group_size=64), SpikingConfig(mode="gif", ratio=0.1, target="weight")),
    ("omni w4a4 t2 token aug", QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, aug_loss=True), SpikingConfig(mode="gif", ratio=0.1, steps=2)),
    ("omni w4a4 channel_static", QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1, k_axis="channel_static"), SpikingConfig()),
]:
    lm = load_model(resolve_source("embedded", None))
    ids = calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", 2, 64, 0), D)
    if q.method == "omniquant":
        omniquant(lm.model, ids, q, s, progress=False, log=lambda *a: None)
    else:
        quantize(lm.model, ids, q, s, progress=False, log=lambda *a: None)
    h = hashlib.sha256()
    for k, v in sorted(lm.model.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().float().contiguous().numpy().tobytes())
    out.append(f"{name}: {h.hexdigest()[:16]}")
    print(out[-1], flush=True)
