"""OmniQuant / SpikeLLM on the embedded model: the issue-4 comparison over several seeds.

Runs each (setting, seed) from a fresh copy of SmolLM2-135M: calibration windows from WikiText-2
validation (seeded by `seed`, which also orders the training), OmniQuant block-wise training,
perplexity on WikiText-2 test, and the ACE cost; one JSON line per run.

    python bench/omni_recipe.py --data-dir ../shared/data --out results.jsonl \
        --settings rtn_w4a4,omni_w4a4,t2_w4a4,t4_w4a4,t2r_w4a4 --seeds 1,2,3 \
        --nsamples 32 --seqlen 512 --epochs 2 --device cuda

`--summarize results*.jsonl` prints mean ± std per setting and K axis.

The `omni*`/`t*` settings use SpikeLLM's hyperparameters (let_lr 1e-3, alpha 0.75, no aug_loss);
`omniown_*` (and `t2own_w4a4`) use OmniQuant's own published ones (OpenGVLab/OmniQuant
scripts/llama/llama-7b/w4a4.sh: let_lr 5e-3, alpha 0.5 (main.py defaults), --aug_loss;
scripts/Llama-2/Llama-2-7b/w2a16.sh: LWC only, --aug_loss), at this script's reduced size
(--nsamples/--seqlen/--epochs). K is quantized per token (`--k-axis token`, causal, the
project default) unless `--k-axis channel` (SpikeLLM's code, non-causal; the axis of the
README's numbers, measured before token became the default) or `channel_static`.
`--aug-loss/--no-aug-loss`, `--let-lr`, `--alpha`, `--lwc/--no-lwc`, `--let/--no-let` override
what the settings say.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spikellm.config import QuantConfig, SpikingConfig  # noqa: E402

T2 = dict(mode="gif", ratio=0.1, addbit=1, steps=2)
T4 = dict(mode="gif", ratio=0.05, addbit=2, steps=4)
#: name -> (quant overrides, spiking overrides); W4A4 uses LET+LWC, W2A16 LWC only (OmniQuant's W2 recipe)
SETTINGS = {
    "rtn_w4a4": (dict(wbits=4, abits=4, epochs=0, lwc=False, let=False), dict(mode="none")),
    "omni_w4a4": (dict(wbits=4, abits=4), dict(mode="none")),
    "t2_w4a4": (dict(wbits=4, abits=4), T2),
    "t4_w4a4": (dict(wbits=4, abits=4), T4),
    "t2r_w4a4": (dict(wbits=4, abits=4), dict(T2, select="random")),
    "rtn_w2a16": (dict(wbits=2, abits=16, epochs=0, lwc=False, let=False), dict(mode="none")),
    "omni_w2a16": (dict(wbits=2, abits=16, let=False), dict(mode="none")),
    "t2_w2a16": (dict(wbits=2, abits=16, let=False), T2),
    # OmniQuant's own recipes (see the module docstring)
    "omniown_w4a4": (dict(wbits=4, abits=4, let_lr=5e-3, alpha=0.5, aug_loss=True), dict(mode="none")),
    "t2own_w4a4": (dict(wbits=4, abits=4, let_lr=5e-3, alpha=0.5, aug_loss=True), T2),
    "omniown_w2a16": (dict(wbits=2, abits=16, let=False, aug_loss=True), dict(mode="none")),
}
#: command-line flag (argparse dest) -> QuantConfig key it overrides when given
OVERRIDES = {"aug_loss": "aug_loss", "let_lr": "let_lr", "alpha": "alpha", "lwc": "lwc", "let": "let"}


def quant_config(name: str, seed: int, args) -> QuantConfig:
    """The QuantConfig of one (setting, seed): the command line's size and K axis, the
    setting's recipe, then the recipe flags given on the command line (OVERRIDES)."""
    qo = SETTINGS[name][0]
    qo = dict(qo, group_size=args.group_size_w2) if qo["wbits"] <= 2 else qo
    given = {key: getattr(args, dest) for dest, key in OVERRIDES.items() if getattr(args, dest) is not None}
    return QuantConfig(method="omniquant", **{"epochs": args.epochs, "seed": seed, "amp": args.amp,
                                              "k_axis": args.k_axis, **qo, **given})


def run_one(name: str, seed: int, args) -> dict:
    from spikellm.blockwise import peak_memory_gb
    from spikellm.data import CalibSpec, calibration_set, evaluation_set
    from spikellm.evaluate import perplexity
    from spikellm.models import load_model, resolve_source
    from spikellm.omni_cost import omniquant_cost
    from spikellm.omniquant import omniquant

    q = quant_config(name, seed, args)
    so = SETTINGS[name][1]
    s = SpikingConfig(**(so if so["mode"] == "none" else {"seed": seed, **so}))
    lm = load_model(resolve_source("embedded", None), device=args.device)
    calib = calibration_set(lm.tokenizer, CalibSpec("wikitext2", "validation", args.nsamples,
                                                     args.seqlen, seed), args.data_dir)
    windows = evaluation_set(lm.tokenizer, "wikitext2", args.eval_seqlen, args.eval_windows or None,
                             data_dir=args.data_dir)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    stats, _ = omniquant(lm.model, calib.to(args.device), q, s, device=args.device,
                         batch_size=args.batch_size, progress=False)
    seconds = time.time() - t0
    peak = peak_memory_gb(args.device)
    ppl = perplexity(lm.model, windows, args.eval_batch, args.device, progress=False)
    cost = omniquant_cost(lm.model, q, s)
    return {"setting": name, "seed": seed, "ppl": ppl, "quantize_s": seconds,
            "block_epoch_s": seconds / len(stats) / max(1, q.epochs), "peak_gb": peak,
            "eval_windows": list(windows.shape), "calib": [args.nsamples, args.seqlen],
            "epochs": q.epochs, "group_size": q.group_size, "k_axis": q.k_axis, "aug_loss": q.aug_loss,
            "let_lr": q.let_lr, "alpha": q.alpha, "lwc": q.lwc, "let": q.let,
            **{f"cost/{k}": v for k, v in cost.items()},
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}


def fp_ppl(args) -> float:
    from spikellm.data import evaluation_set
    from spikellm.evaluate import perplexity
    from spikellm.models import load_model, resolve_source
    lm = load_model(resolve_source("embedded", None), device=args.device)
    windows = evaluation_set(lm.tokenizer, "wikitext2", args.eval_seqlen, args.eval_windows or None,
                             data_dir=args.data_dir)
    return perplexity(lm.model, windows, args.eval_batch, args.device, progress=False)


def summarize(files: list[str]) -> None:
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    fp = [r["ppl"] for r in rows if r["setting"] == "fp"]
    if fp:
        print(f"fp: {fp[0]:.3f}")
    for r in rows:                          # rows written before --k-axis existed used channel
        r.setdefault("k_axis", "channel")
    groups = [(name, axis) for name in SETTINGS for axis in ("token", "channel", "channel_static")]
    for name, axis in groups:
        sel = [r for r in rows if r["setting"] == name and r["k_axis"] == axis]
        if not sel:
            continue
        vals = [r["ppl"] for r in sel]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        one = sel[0]
        print(f"{name:13s} K={axis:14s} n={len(vals)} ppl {statistics.mean(vals):9.3f} ± {sd:7.3f}  "
              f"avg_steps {one['cost/avg_steps']:.3f}  ace/baseline {one['cost/ace_rel_baseline']:.3f}  "
              f"block-epoch {statistics.mean(r['block_epoch_s'] for r in sel):.2f}s  "
              f"peak {max(r['peak_gb'] for r in sel):.2f} GB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="omni_results.jsonl")
    ap.add_argument("--settings", default="rtn_w4a4,omni_w4a4,t2_w4a4,t4_w4a4,t2r_w4a4")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40, help="0 = the whole test split")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp", action="store_true", help="also record the full-precision perplexity")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for training (CUDA)")
    ap.add_argument("--worker", default="0/1", help="k/W: run every W-th job starting at k")
    ap.add_argument("--group-size-w2", type=int, default=64, help="weight group size of the W2 settings")
    ap.add_argument("--k-axis", default="token", choices=("token", "channel", "channel_static"),
                    help="K quantization: token (causal, OmniQuant), channel (non-causal, SpikeLLM "
                         "code), channel_static (causal fitted ranges)")
    ap.add_argument("--aug-loss", dest="aug_loss", action=argparse.BooleanOptionalAction, default=None,
                    help="OmniQuant's --aug_loss (default: as the setting says)")
    ap.add_argument("--let-lr", dest="let_lr", type=float, default=None, help="default: the setting's")
    ap.add_argument("--alpha", type=float, default=None, help="LET init exponent; default: the setting's")
    ap.add_argument("--lwc", action=argparse.BooleanOptionalAction, default=None, help="default: the setting's")
    ap.add_argument("--let", action=argparse.BooleanOptionalAction, default=None, help="default: the setting's")
    ap.add_argument("--summarize", nargs="*")
    args = ap.parse_args()
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown and not args.summarize:
        ap.error(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTINGS)}")
    if args.summarize:
        summarize(args.summarize)
        return 0
    out = Path(args.out)
    if args.fp:
        with out.open("a") as f:
            f.write(json.dumps({"setting": "fp", "seed": 0, "ppl": fp_ppl(args)}) + "\n")
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [(name, seed) for seed in seeds for name in args.settings.split(",")
            if not (name.startswith("rtn") and seed != seeds[0])]   # RTN has no seed-dependent part
    k, w = (int(x) for x in args.worker.split("/"))
    for name, seed in jobs[k::w]:
        row = run_one(name, seed, args)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
