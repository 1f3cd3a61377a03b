"""Host peak RSS of quantizing the embedded model loaded whole vs streamed block by block.

    python bench/stream_memory.py --data-dir ../shared/data      # runs both modes, one process each
    python bench/stream_memory.py --data-dir ../shared/data --method omni_w4a4

Each mode runs in a fresh process (peak RSS is per process) on WikiText-2 calibration windows,
CPU, float32 (the embedded model's dtype). `--method gptq_ternary` (default): GPTQ + SpikeLLM
ternary (the main job's method); `omni_w4a4`: OmniQuant W4A4 with SpikeLLM t2 activations,
1 epoch (the engine's OmniQuant plug-in; LET starts from the block's own activation maxima).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _methods():
    from spikellm.config import QuantConfig, SpikingConfig
    return {"gptq_ternary": (QuantConfig(method="gptq", wbits=4), SpikingConfig(mode="ternary", ratio=0.0, steps=1, granularity="column")),
            "omni_w4a4": (QuantConfig(method="omniquant", wbits=4, abits=4, epochs=1),
                          SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2))}


def run(mode: str, args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from spikellm.data import CalibSpec, calibration_set
    from spikellm.embedded import embedded_checkpoint
    from spikellm.models import load_model
    from spikellm.quantize import quantize
    from spikellm.streaming import open_streaming
    METHODS = _methods()
    src = embedded_checkpoint()
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = calibration_set(tok, CalibSpec("wikitext2", "validation", args.nsamples, args.seqlen, 0), args.data_dir)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t0 = time.time()
    q, s = METHODS[args.method]
    with tempfile.TemporaryDirectory() as out:
        if mode == "stream":
            st = open_streaming(src, Path(out) / "q", "float32")
            quantize(st.model, ids, q, s, progress=False, log=lambda *_: None, stream=st)
            st.finish(tok)
        else:
            lm = load_model(str(src))
            quantize(lm.model, ids, q, s, progress=False, log=lambda *_: None)
            lm.model.save_pretrained(Path(out) / "q")
    return {"mode": mode, "method": args.method, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rss_before_model_gb": rss0, "seconds": time.time() - t0,
            "calib": [args.nsamples, args.seqlen], "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--method", default="gptq_ternary", choices=("gptq_ternary", "omni_w4a4"))
    ap.add_argument("--mode", default=None, help="whole | stream (internal: one mode in this process)")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args)), flush=True)
        return 0
    for mode in ("whole", "stream"):
        cmd = [sys.executable, __file__, "--mode", mode, "--method", args.method, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen)] + (["--data-dir", args.data_dir] if args.data_dir else [])
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
