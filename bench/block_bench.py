"""One decoder block at real LLaMA shapes with random weights: per-phase time and peak memory of
our GPTQ (plain W4 and SpikeLLM ternary) and OmniQuant/SpikeLLM W4A4, as JSON lines.

    python bench/block_bench.py --shape llama7b,llama2_70b --nsamples 128 --seqlen 2048 \
        --methods gptq_w4,gptq_ternary,omni_w4a4_t2 --device cuda --out block_bench.jsonl

Phases (GPTQ): `capture` (embedding pass to the block's inputs), `forward_hessian` (the
calibration forwards through the block with Hessian accumulation, plus the output forward),
`saliency` (inverse-Hessian Cholesky and the saliency / step allocation of each linear),
`solve` (the GPTQ column solve). Each phase is timed with CUDA synchronisation around the
library functions that implement it, so the numbers are those of `spikellm.quantize` as the
pipeline runs it. OmniQuant: the block's total and its time per training epoch.
Reference (environment.md, reference GPTQ on an H200, 128 x 2048 tokens): 12.2 s per LLaMA-7B
block (3.6 s forwards with Hessians, 8.6 s solve), 36.4 s per LLaMA-2-70B block (16.6 / 19.8 s).
`--shape tiny` runs in seconds on a CPU (the test uses it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spikellm.config import QuantConfig, SpikingConfig  # noqa: E402

SHAPES = {
    "llama7b": dict(layers=1, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "llama2_70b": dict(layers=1, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
    "tiny": dict(layers=1, hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512),
}
METHODS = {
    "gptq_w4": (dict(method="gptq", wbits=4), dict(mode="none")),
    "gptq_ternary": (dict(method="gptq", wbits=4), dict(mode="ternary", ratio=0.0, steps=1, granularity="column")),
    "omni_w4a4_t2": (dict(method="omniquant", wbits=4, abits=4, epochs=2),
                     dict(mode="gif", ratio=0.1, addbit=1, steps=2)),
}


class PhaseTimer:
    """Wraps module-level functions so every call adds its synchronised wall time to a phase."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds: dict[str, float] = {}
        self._undo = []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, module, name: str, phase: str):
        real = getattr(module, name)

        def timed(*a, **k):
            self._sync()
            t0 = time.perf_counter()
            out = real(*a, **k)
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            return out
        setattr(module, name, timed)
        self._undo.append((module, name, real))

    def restore(self):
        for module, name, real in reversed(self._undo):
            setattr(module, name, real)


def one_block_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    a = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                      num_key_value_heads=a["kv_heads"], vocab_size=a["vocab"],
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model.eval()


def bench(shape: str, method: str, args) -> dict:
    import importlib
    from spikellm import blockwise
    qmod = importlib.import_module("spikellm.quantize")   # the module (spikellm.quantize is the function)
    from spikellm.blockwise import peak_memory_gb
    dtype = getattr(torch, args.dtype)
    model = one_block_model(shape, dtype, args.device)
    ids = torch.randint(0, SHAPES[shape]["vocab"], (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    qo, so = METHODS[method]
    q = QuantConfig(**{**qo, "amp": args.device.startswith("cuda")} if qo["method"] == "omniquant" else qo)
    s = SpikingConfig(**so)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer(args.device)
    t0 = time.perf_counter()
    try:
        if q.method == "omniquant":
            from spikellm.omniquant import omniquant
            stats, _ = omniquant(model, ids, q, s, device=args.device, batch_size=args.batch_size,
                                 progress=False, log=lambda *_: None)
        else:
            timer.wrap(blockwise, "capture_block_inputs", "capture")
            timer.wrap(qmod, "gptq_solve", "solve")
            timer.wrap(qmod, "_make_quantizer", "saliency")
            timer.wrap(qmod, "prepare_hessian", "saliency")
            qmod.quantize(model, ids, q, s, batch_size=args.batch_size, device=args.device,
                          progress=False, log=lambda *_: None)
    finally:
        timer.restore()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    phases = dict(timer.seconds)
    if q.method == "omniquant":
        phases["epoch"] = total / q.epochs
    else:
        phases["forward_hessian"] = total - sum(phases.values())
    return {"shape": shape, "method": method, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "dtype": args.dtype, "total_s": total, "phases_s": phases,
            "peak_gb": peak_memory_gb(args.device),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama7b,llama2_70b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="append JSON lines here (and print them)")
    args = ap.parse_args(argv)
    for shape in args.shape.split(","):
        for method in args.methods.split(","):
            row = bench(shape, method, args)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
