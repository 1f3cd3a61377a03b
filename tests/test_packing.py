"""Packed weights (`spikellm.packing`): codes in bits plus FP16 scales, sized like
`cost/storage_bits`, unpacking to exactly the weights the quantized model computes with.

Random layers (the packing does not depend on what the weights mean); each GPTQ-family method
through `quantize_linear(pack=True)`, OmniQuant's LWC through its `code_classes`. Export and
reload of a packed model: tests/test_export.py (tiny models) and tests/test_pipeline.py (the
embedded model through the CLI)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spikellm.config import QuantConfig, SpikingConfig
from spikellm.packing import (pack_layer, pack_radix, packed_bytes, rice_decode, rice_encode,
                              unpack_layer, unpack_radix)
from spikellm.quantize import quantize_linear


@pytest.mark.parametrize("radix", [2, 3, 5, 7, 16, 256])
def test_radix_codes_round_trip_at_their_information_content(radix):
    n = 10_000
    codes = torch.randint(0, radix, (n,), generator=torch.Generator().manual_seed(radix))
    buf = pack_radix(codes, radix)
    assert torch.equal(unpack_radix(buf, radix, n), codes)
    # within 1% of log2(radix) bits per code (plus the last chunk's padding)
    assert 8 * buf.numel() <= n * math.log2(radix) * 1.01 + 64
    with pytest.raises(ValueError, match="outside"):
        pack_radix(torch.tensor([radix]), radix)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.2, 1.0])
def test_salient_masks_round_trip_near_the_combinatorial_bound(density):
    n = 20_000
    mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) < density
    unary, rem, r = rice_encode(mask)
    k = int(mask.sum())
    assert torch.equal(rice_decode(unary, rem, r, k, n), mask)
    bits = 8 * (unary.numel() + rem.numel())
    bound = math.log2(math.comb(n, k))
    if 0 < density < 0.5:                      # Rice codes are within a few % of log2 C(n, k)
        assert bound <= bits <= 1.06 * bound + 16, (bits, bound)


def _layer(c_out=96, c_in=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c_in, c_out, bias=False)
    lin.weight.data = torch.randn(c_out, c_in, generator=g)
    X = torch.randn(n, c_in, generator=g) * torch.linspace(0.2, 3, c_in)
    return lin, 2 * X.t() @ X / n


METHODS = {
    "rtn w3 g64": (QuantConfig("rtn", wbits=3, group_size=64), SpikingConfig("none")),
    "gptq w2 row": (QuantConfig("gptq", wbits=2), SpikingConfig("none")),
    "gptq w2 sym g64": (QuantConfig("gptq", wbits=2, sym=True, group_size=64), SpikingConfig("none")),
    "gptq w4 g64 actorder": (QuantConfig("gptq", wbits=4, group_size=64, actorder=True), SpikingConfig("none")),
    "pbllm row": (QuantConfig("pbllm"), SpikingConfig("none")),
    "pbllm g64": (QuantConfig("pbllm", group_size=64), SpikingConfig("none")),
    "ternary element g64": (QuantConfig("gptq", group_size=64), SpikingConfig("ternary", group_size=64)),
    "ternary element row": (QuantConfig("gptq"), SpikingConfig("ternary", group_size=0)),
    "ternary column g64": (QuantConfig("gptq", group_size=64),
                           SpikingConfig("ternary", group_size=64, granularity="column")),
    "ternary random g64 shared": (QuantConfig("gptq", group_size=64),
                                  SpikingConfig("ternary", group_size=64, select="random", salient_scale="shared")),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_packed_layer_unpacks_to_the_weights_the_model_computes_with(name):
    q, s = METHODS[name]
    lin, H = _layer()
    dense, _ = _layer()
    info_dense, _ = quantize_linear("x", dense, None if q.method == "rtn" else H, q, s, log=lambda *_: None)
    info, cost = quantize_linear("x", lin, None if q.method == "rtn" else H, q, s, log=lambda *_: None,
                                 pack=True)
    t = info["packed"]
    # the layer computes with exactly the stored weights ...
    assert torch.equal(unpack_layer(t), lin.weight.data)
    # ... which differ from the FP32-scale solve only by the FP16 rounding of its scales
    rel = (lin.weight.data - dense.weight.data).abs().max() / dense.weight.data.abs().max()
    assert 0 <= float(rel) < 2e-3, float(rel)
    # and the bytes (without act-order's column permutation) match storage_bits within 2%
    bits = 8 * (packed_bytes(t) - t.get("perm", torch.zeros(0, dtype=torch.int32)).numel() * 4) / lin.weight.numel()
    assert bits == pytest.approx(cost.storage_bits, rel=0.02), (bits, cost.storage_bits)


def test_packed_size_of_a_small_layer_matches_a_hand_count():
    # RTN W3 g64 on 64 x 128: 8192 codes of radix 8 in chunks of 20 codes (8^20 < 2^62) of 60
    # bits -> 410 chunks, 24600 bits = 3075 bytes; scale and zero in FP16 per row and group
    lin, _ = _layer(c_out=64, c_in=128)
    info, cost = quantize_linear("x", lin, None, QuantConfig("rtn", wbits=3, group_size=64),
                                 SpikingConfig("none"), log=lambda *_: None, pack=True)
    t = info["packed"]
    assert t["codes0"].numel() == 3075 and t["s0"].shape == t["z0"].shape == (64, 2)
    assert packed_bytes(t) == 3075 + 2 * 64 * 2 * 2
    assert cost.storage_bits == (8192 * 3 + 64 * 2 * 2 * 16) / 8192


def test_large_layers_pack_in_blocks_and_tiny_scales_stay_defined(monkeypatch):
    import spikellm.packing as packing
    from spikellm.packing import CodeClass
    monkeypatch.setattr(packing, "_BLOCK", 300)        # many row blocks, as a 70B layer has
    monkeypatch.setattr(packing, "_SLICE", 8)          # many radix slices
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(5))
    s = (W.reshape(40, 3, 32).abs().amax(-1) / 7).clone()
    s[0, 0] = 1e-9                                     # underflows to 0 in FP16
    cls = torch.rand(40, 96, generator=torch.Generator().manual_seed(6)) < 0.1
    classes = [CodeClass(16, "uniform", {"s": s}, consts={"z": 8.0}),
               CodeClass(256, "uniform", {"s": s / 16}, consts={"z": 128.0})]
    t = pack_layer(W, classes, cls.long(), 32)
    U = unpack_layer(t)
    assert torch.isfinite(U).all() and U.shape == W.shape
    # the packed codes are the nearest on the stored grid: re-packing the unpacked weights
    # gives the same streams
    t2 = pack_layer(U, classes, cls.long(), 32)
    assert all(torch.equal(t[k], t2[k]) for k in t)


def test_lwc_weights_pack_with_their_salient_columns():
    from spikellm.omni_quantizers import LWCWeightQuantizer
    from spikellm.packing import CodeClass
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    for group in (0, 64):
        wq = LWCWeightQuantizer(2, tuple(w.shape), group_size=group, addbit=1)
        wq.salient_cols[:13] = True
        classes, cls, per_column = wq.code_classes(w)
        assert [c.levels for c in classes] == [4, 8] and per_column
        assert all(isinstance(c, CodeClass) for c in classes)
        q = wq(w)
        t = pack_layer(q, classes, cls, group, None, per_column)
        assert torch.allclose(unpack_layer(t), q, rtol=0, atol=2e-3 * float(q.detach().abs().max()))
        # one clipped range per row and group serves both grids: stored once, as storage_bits
        # counts it (codes at 2 and 3 bits, 2 FP16 values per range, the column classes)
        groups = 32 * (128 // group if group else 1)
        hand = 32 * (115 * 2 + 13 * 3) + groups * 2 * 16 + math.log2(math.comb(128, 13))
        assert 8 * packed_bytes(t) == pytest.approx(hand, rel=0.05)


def test_packing_refuses_more_than_one_salient_step_count():
    from spikellm.quantizers import TernaryGIFQuantizer
    steps = torch.ones(4, 64, dtype=torch.long)
    steps[0, 0], steps[1, 1] = 3, 5
    t = TernaryGIFQuantizer(steps, 0)
    with pytest.raises(ValueError, match="one salient step count"):
        t.code_classes()
