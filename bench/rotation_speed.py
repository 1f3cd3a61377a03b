"""Cost of QuaRot's rotation at real LLaMA block shapes with random weights (issue 14): the
fusion of one decoder block (`rotation.rotate_block`: norm folding, residual rotation, V/O per
head, o_proj/down_proj Hadamards, computed in float64), and the online Hadamards per forward
(before o_proj and down_proj, Q/K after RoPE) against the block's own linear layers on the same
tokens. CPU here (no GPU was lent); pass --device cuda on a GPU.

    python bench/rotation_speed.py [--shape llama2_7b|llama2_70b|smollm2] [--tokens 2048] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"smollm2": (576, 1536, 9, 3), "llama2_7b": (4096, 11008, 32, 32), "llama2_70b": (8192, 28672, 64, 8)}


def _timed(fn, device, reps=3):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from spikellm.hadamard import hadamard_transform, rotation_matrix, split_order
    from spikellm.models import FAMILIES
    from spikellm.rotation import hadamard_adds, rotate_block

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2_7b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    d, inter, heads, kv = SHAPES[a.shape]
    dh = d // heads
    cfg = LlamaConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0).to(a.device)
    Q, kind = rotation_matrix(d, 0)
    t0 = time.perf_counter()
    rotate_block(block, FAMILIES["llama"], Q, heads, kv, dh)
    if a.device == "cuda":
        torch.cuda.synchronize()
    fuse = time.perf_counter() - t0
    dt = torch.float16 if a.device == "cuda" else torch.float32
    x_d = torch.randn(a.tokens, d, device=a.device, dtype=dt)
    x_i = torch.randn(a.tokens, inter, device=a.device, dtype=dt)
    qk = torch.randn(a.tokens, heads + kv, dh, device=a.device, dtype=dt)
    W_o = torch.randn(d, d, device=a.device, dtype=dt)
    W_down = torch.randn(d, inter, device=a.device, dtype=dt)
    rows = {
        "online Hadamard before o_proj": _timed(lambda: hadamard_transform(x_d), a.device),
        "online Hadamard before down_proj": _timed(lambda: hadamard_transform(x_i), a.device),
        "Q/K Hadamard after RoPE": _timed(lambda: hadamard_transform(qk), a.device),
        "o_proj matmul (same tokens)": _timed(lambda: x_d @ W_o.t(), a.device),
        "down_proj matmul (same tokens)": _timed(lambda: x_i @ W_down.t(), a.device),
    }
    print(f"{a.shape}: hidden {d} = {split_order(d)}, intermediate {inter} = {split_order(inter)}, "
          f"head {dh}; residual rotation: {kind}; device {a.device}, {torch.get_num_threads()} threads")
    print(f"fusing one block (float64): {fuse:.2f} s")
    print(f"per forward of {a.tokens} tokens ({dt}):")
    for k, v in rows.items():
        print(f"  {k:34s} {1e3 * v:9.2f} ms")
    adds = d * hadamard_adds(d) + inter * hadamard_adds(inter) + (heads + kv) * dh * hadamard_adds(dh)
    macs = 2 * d * d + 2 * d * kv * dh + 3 * d * inter
    print(f"online transforms: {adds:.3g} adds per token vs {macs:.3g} MACs of the block's linears "
          f"({adds / macs:.2%})")


if __name__ == "__main__":
    main()
