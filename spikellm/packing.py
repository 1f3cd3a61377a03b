"""Packed weights: each quantized linear as integer codes at (nearly) their information content
plus its FP16 scales, so that the bytes on disk match `cost/storage_bits`.

A layer's weights fall into *classes* (one per kind of code: the plain grid; the salient weights'
wider grid; PB-LLM's binarized and 8-bit weights). Class k has `levels` L_k codes and a scheme
that turns a code c into a weight with per-(row, group) FP16 parameters:

- ``uniform``: w = s · (c − z)   (RTN / GPTQ grids; s, z per row and group; a symmetric grid's
  constant z is stored once, in `consts`)
- ``range``:   the same grid from its clipped range [lo, hi] (`gif.range_params`: s = (hi − lo)
  / (L − 1), z = round(−lo / s)), so grids of several widths over one range (LWC's salient
  columns at bits + addbit) store it once
- ``sym``:     w = α · (c − T), T = (L − 1)/2   (T-step ternary GIF: codes −T..T; α only)
- ``binary``:  w = m + a · (2c − 1)   (PB-LLM's binarization around the mean m)

Groups are `span` consecutive columns in the solver's column order (`perm`, when GPTQ's
act-order permuted them; stored as int32, the one overhead `storage_bits` does not count).

Encodings (all vectorized):
- codes of radix L: chunks of k codes (L^k < 2^62) as one integer of ceil(log2 L^k) bits, so a
  ternary code costs 1.59 bits (log2 3 = 1.585) and a 7-level one 2.82 (log2 7 = 2.807);
- which weights are salient, per element: the gaps between salient positions, Rice-coded with
  the best parameter (unary quotients and fixed-width remainders in two streams), within a few
  percent of log2 C(n, k); per column: the column classes as radix codes.

`pack_layer` -> a dict of tensors (uint8 streams, float16 parameters, a JSON `meta` as uint8);
`unpack_layer` inverts it. Unpacking gives the stored codes exactly; the weights equal the
quantized model's up to the FP16 rounding of the scales (the model is computed with FP32 scales,
as every fake-quantized PTQ method is), i.e. |Δw| <= |c − z| · |s − fp16(s)|.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEMES = {"uniform": ("s", "z"), "range": ("lo", "hi"), "sym": ("alpha",), "binary": ("m", "a")}
#: parameters a code is divided by: stored at least FP16's smallest normal magnitude (a scale
#: that underflows to 0 in FP16 would make its codes undefined)
DIVISORS = ("s", "alpha")
FP16_TINY = 6.104e-05


# --- radix codes ----------------------------------------------------------------------------

def _chunk(radix: int) -> tuple[int, int]:
    """(codes per chunk k, bits per chunk) with radix**k < 2**62."""
    k = max(1, int(62 / math.log2(radix))) if radix > 1 else 62
    while radix ** k >= 2 ** 62:
        k -= 1
    return k, max(1, (radix ** k - 1).bit_length())


#: chunks per slice of the radix (un)packing: bounds its temporaries (~64 B per chunk)
_SLICE = 1 << 20


def pack_radix(codes: torch.Tensor, radix: int) -> torch.Tensor:
    """codes: int tensor of values in [0, radix) (any shape, read flat) -> uint8 bit stream:
    k codes per chunk (radix**k < 2**62) as one `bits`-bit integer, chunks back to back."""
    c = codes.reshape(-1).cpu().numpy()
    if radix <= 1 or c.size == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if c.min() < 0 or c.max() >= radix:
        raise ValueError(f"codes outside [0, {radix})")
    k, bits = _chunk(radix)
    pad = (-c.size) % k
    c = np.concatenate([c, np.zeros(pad, c.dtype)]).reshape(-1, k)
    out = []
    for a in range(0, c.shape[0], _SLICE):
        part = c[a: a + _SLICE].astype(np.int64)
        v = np.zeros(part.shape[0], np.int64)
        for i in range(k - 1, -1, -1):           # Horner: v = Σ c_i radix^i
            v = v * radix + part[:, i]
        le = v.astype("<u8").view(np.uint8).reshape(-1, 8)         # little-endian bytes
        # a full slice is a whole number of bytes (8 | _SLICE): pack it on its own
        out.append(np.packbits(np.unpackbits(le, axis=1, bitorder="little")[:, :bits].reshape(-1),
                               bitorder="little"))
    return torch.from_numpy(out[0] if len(out) == 1 else np.concatenate(out))


def unpack_radix(buf: torch.Tensor, radix: int, n: int) -> torch.Tensor:
    """Inverse of `pack_radix`: the first `n` codes (int64)."""
    if radix <= 1 or n == 0:
        return torch.zeros(n, dtype=torch.int64)
    k, bits = _chunk(radix)
    chunks = -(-n // k)
    raw = buf.numpy()
    out = np.empty((chunks, k), np.int64)
    for a in range(0, chunks, _SLICE):           # slices start on byte boundaries: 8 | _SLICE
        m = min(_SLICE, chunks - a)
        b = np.unpackbits(raw[a * bits // 8: -(-(a + m) * bits // 8)], bitorder="little")[: m * bits]
        b = np.concatenate([b.reshape(m, bits), np.zeros((m, 64 - bits), np.uint8)], axis=1)
        v = np.packbits(b, axis=1, bitorder="little").view("<u8").reshape(-1).astype(np.int64)
        for i in range(k):
            v, out[a: a + m, i] = np.divmod(v, radix)
    return torch.from_numpy(out.reshape(-1)[:n].copy())


# --- salient positions: Rice-coded gaps -----------------------------------------------------

def rice_encode(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """mask (bool, read flat) -> (unary stream, remainder stream, Rice parameter r). Gap g >= 0
    between consecutive set positions: q = g >> r ones and a zero, then g's r low bits."""
    pos = np.flatnonzero(mask.reshape(-1).cpu().numpy())
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    if gaps.size == 0:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8), 0
    r = min(range(0, 31), key=lambda r: int((gaps >> r).sum()) + gaps.size * (1 + r))
    q = gaps >> r
    unary = np.zeros(int(q.sum()) + gaps.size, np.uint8)
    starts = np.cumsum(q + 1) - (q + 1)
    ones = np.repeat(starts, q) + (np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q))
    unary[ones] = 1
    rem = ((gaps[:, None] >> np.arange(r, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return (torch.from_numpy(np.packbits(unary, bitorder="little")),
            torch.from_numpy(np.packbits(rem, bitorder="little")), r)


def rice_decode(unary: torch.Tensor, rem: torch.Tensor, r: int, count: int, n: int) -> torch.Tensor:
    """Inverse of `rice_encode`: a flat bool mask of length n with `count` set positions."""
    out = torch.zeros(n, dtype=torch.bool)
    if count == 0:
        return out
    u = np.unpackbits(unary.numpy(), bitorder="little")
    ends = np.flatnonzero(u == 0)[:count]               # each gap's terminating zero
    q = np.diff(np.concatenate([[-1], ends])) - 1
    bits = np.unpackbits(rem.numpy(), bitorder="little")[: count * r].reshape(count, r).astype(np.int64)
    low = (bits << np.arange(r, dtype=np.int64)).sum(1) if r else np.zeros(count, np.int64)
    gaps = (q << r) + low
    out[torch.from_numpy(np.cumsum(gaps + 1) - 1)] = True
    return out


# --- layers -----------------------------------------------------------------------------------

@dataclass
class CodeClass:
    """One kind of code in a layer: `levels` codes, `scheme` (SCHEMES), its parameters, each
    [C_out, G] (G groups per row, in solver column order), or `shares` the parameters of an
    earlier class (stored once: e.g. ternary salient weights on the normal threshold)."""
    levels: int
    scheme: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    shares: int | None = None
    consts: dict[str, float] = field(default_factory=dict)


def _expand(p: torch.Tensor, span: int, c_in: int, perm: torch.Tensor | None) -> torch.Tensor:
    """[C_out, G] per-group parameter -> [C_out, C_in] per weight, in original column order."""
    g = torch.arange(c_in) // span if span > 0 else torch.zeros(c_in, dtype=torch.long)
    full = p.float()[:, g]
    if perm is not None:
        out = torch.empty_like(full)
        out[:, perm] = full
        return out
    return full


def _grid(c: CodeClass, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A class's per-weight parameters with its constants and derived grid filled in."""
    p = {**{k: torch.tensor(v) for k, v in c.consts.items()}, **p}
    if c.scheme == "range":
        from .gif import range_params
        p["s"], p["z"] = range_params(p["lo"], p["hi"], int(math.log2(c.levels)))
    return p


def _codes(w: torch.Tensor, c: CodeClass, p: dict[str, torch.Tensor]) -> torch.Tensor:
    top = c.levels - 1
    p = _grid(c, p)
    if c.scheme in ("uniform", "range"):
        x = torch.round(w / p["s"] + p["z"])
    elif c.scheme == "sym":
        x = torch.round(w / p["alpha"]) + top // 2
    else:
        x = (w >= p["m"]).to(torch.float32)
    return x.clamp(0, top).to(torch.int64)


def _weights(codes: torch.Tensor, c: CodeClass, p: dict[str, torch.Tensor]) -> torch.Tensor:
    x = codes.to(torch.float32)
    p = _grid(c, p)
    if c.scheme in ("uniform", "range"):
        return p["s"] * (x - p["z"])
    if c.scheme == "sym":
        return p["alpha"] * (x - (c.levels - 1) // 2)
    return p["m"] + p["a"] * (2 * x - 1)


def _fp16(name: str, v: torch.Tensor) -> torch.Tensor:
    """A parameter as stored: FP16, divisors kept at FP16's smallest normal magnitude or more."""
    h = v.detach().to(torch.float16).cpu()
    if name in DIVISORS:
        h = torch.where(h.abs() < FP16_TINY, torch.where(h < 0, -FP16_TINY, FP16_TINY).to(h.dtype), h)
    return h.contiguous()


#: weights per row block of `pack_layer` / `unpack_layer`: bounds the per-weight temporaries
#: (expanded FP32 parameters, codes) to a block, whatever the layer's size
_BLOCK = 1 << 22


def _row_blocks(c_out: int, c_in: int):
    step = max(1, _BLOCK // max(c_in, 1))
    return [slice(r, min(r + step, c_out)) for r in range(0, c_out, step)]


def _code_dtype(levels: int):
    return torch.uint8 if levels <= 256 else torch.int64


def pack_layer(W: torch.Tensor, classes: list[CodeClass], cls: torch.Tensor | None = None,
               span: int = 0, perm: torch.Tensor | None = None, per_column: bool = False
               ) -> dict[str, torch.Tensor]:
    """W [C_out, C_in]: the quantized (dequantized, FP32) weights, original column order.
    classes: the layer's code classes; cls: class index per weight [C_out, C_in] or, with
    `per_column`, per column [C_in] (None: every weight is class 0). -> tensors to store.
    Works in row blocks of about `_BLOCK` weights (a 70B layer's temporaries stay ~100 MB)."""
    c_out, c_in = W.shape
    W = W.detach().cpu()
    if cls is not None:
        cls = cls.cpu().to(torch.uint8)
    out: dict[str, torch.Tensor] = {}
    meta = {"shape": [c_out, c_in], "span": int(span), "classes": [], "per_column": bool(per_column)}
    if len(classes) > 1:
        if per_column:
            out["cls"] = pack_radix(cls, len(classes))
        elif len(classes) == 2:
            out["mask_unary"], out["mask_rem"], meta["rice"] = rice_encode(cls == 1)
            meta["salient"] = int((cls == 1).sum())
        else:
            raise ValueError("per-element classes pack as a salient mask: at most 2 classes")
    if perm is not None:
        out["perm"] = perm.to(torch.int32).cpu()
    stored = [{n: _fp16(n, v) for n, v in (classes[c.shares] if c.shares is not None else c).params.items()}
              for c in classes]
    codes: list[list[torch.Tensor]] = [[] for _ in classes]
    for rows in _row_blocks(c_out, c_in):
        w = W[rows].float()
        blk_cls = None if cls is None else (cls.expand(c_out, c_in) if per_column else cls)[rows]
        for k, c in enumerate(classes):
            p = {n: _expand(v[rows], span, c_in, perm) for n, v in stored[k].items()}
            if blk_cls is None:
                x = _codes(w.reshape(-1), c, {n: v.reshape(-1) for n, v in p.items()})
            else:
                sel = blk_cls == k
                x = _codes(w[sel], c, {n: v[sel] for n, v in p.items()})
            codes[k].append(x.to(_code_dtype(c.levels)))
    for k, c in enumerate(classes):
        flat = torch.cat(codes[k]) if codes[k] else torch.zeros(0, dtype=torch.uint8)
        codes[k] = []
        out[f"codes{k}"] = pack_radix(flat, c.levels)
        if c.shares is None:
            out.update({f"{n}{k}": v for n, v in stored[k].items()})
        meta["classes"].append({"levels": c.levels, "scheme": c.scheme, "count": int(flat.numel()),
                                "shares": c.shares, "consts": c.consts})
    out["meta"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def layer_meta(t: dict[str, torch.Tensor]) -> dict:
    return json.loads(bytes(t["meta"].tolist()).decode())


def unpack_layer(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tensors of `pack_layer` -> the weights [C_out, C_in] (FP32, from the FP16 parameters),
    decoded in row blocks."""
    meta = layer_meta(t)
    c_out, c_in = meta["shape"]
    perm = t["perm"].long() if "perm" in t else None
    n = len(meta["classes"])
    if n == 1:
        cls = None
    elif meta["per_column"]:
        cls = unpack_radix(t["cls"], n, c_in).to(torch.uint8).expand(c_out, c_in)
    else:
        cls = rice_decode(t["mask_unary"], t["mask_rem"], meta["rice"], meta["salient"],
                          c_out * c_in).reshape(c_out, c_in).to(torch.uint8)
    classes = [CodeClass(i["levels"], i["scheme"], consts=i.get("consts") or {}) for i in meta["classes"]]
    codes = [unpack_radix(t[f"codes{k}"], c.levels, i["count"]).to(_code_dtype(c.levels))
             for k, (c, i) in enumerate(zip(classes, meta["classes"]))]
    params = [{name: t[f"{name}{k if i.get('shares') is None else i['shares']}"]
               for name in SCHEMES[c.scheme] if name not in c.consts}
              for k, (c, i) in enumerate(zip(classes, meta["classes"]))]
    used = [0] * n
    W = torch.empty(c_out, c_in)
    for rows in _row_blocks(c_out, c_in):
        blk = W[rows]
        for k, c in enumerate(classes):
            p = {name: _expand(v[rows], meta["span"], c_in, perm) for name, v in params[k].items()}
            if cls is None:
                m = blk.numel()
                blk.copy_(_weights(codes[k][used[k]: used[k] + m], c,
                                   {q: v.reshape(-1) for q, v in p.items()}).reshape(blk.shape))
            else:
                sel = cls[rows] == k
                m = int(sel.sum())
                blk[sel] = _weights(codes[k][used[k]: used[k] + m], c, {q: v[sel] for q, v in p.items()})
            used[k] += m
    return W


def packed_bytes(t: dict[str, torch.Tensor]) -> int:
    """Bytes of a packed layer's tensors, `meta` excluded."""
    return sum(v.numel() * v.element_size() for k, v in t.items() if k != "meta")


def split_layers(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"<module path>.<tensor>": t} (as saved) -> {module path: {tensor: t}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        mod, _, name = k.rpartition(".")
        out.setdefault(mod, {})[name] = v
    return out
