"""Packing speed and host memory of one LLaMA-7B-shaped MLP layer (4096 x 11008, W4 g128 on
random weights): `python bench/pack_speed.py` prints pack / unpack seconds, bits per weight on
disk and the peak RSS (ru_maxrss) before and after."""
import time, resource, torch, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from spikellm.packing import CodeClass, pack_layer, unpack_layer, packed_bytes
r, c = 4096, 11008
W = torch.randn(r, c)
g = 128
Wg = W.reshape(r, c // g, g)
lo, hi = Wg.amin(-1), Wg.amax(-1)
s = (hi - lo) / 15; z = torch.round(-lo / s)
Q = (torch.clamp(torch.round(Wg / s[..., None] + z[..., None]), 0, 15) - z[..., None]) * s[..., None]
Q = Q.reshape(r, c); del Wg
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
t0 = time.time(); t = pack_layer(Q, [CodeClass(16, "uniform", {"s": s, "z": z})], None, g); t1 = time.time()
U = unpack_layer(t); t2 = time.time()
print(f"4096x11008 W4 g128: pack {t1-t0:.1f}s unpack {t2-t1:.1f}s, bits/weight {8*packed_bytes(t)/Q.numel():.4f}, "
      f"max |dU| {float((U-Q).abs().max()):.2e}, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.2f} GB (before {base:.2f})")
