"""The method registry: `quant.method` -> the engine plug-in (`blockwise.BlockMethod`) that runs it.

Adding a method is one module (a `BlockMethod` subclass), one `register` line here and one
`conf/quant/<method>.yaml`.
"""
from __future__ import annotations

from typing import Callable

from .blockwise import BlockMethod
from .config import MethodConfig, Rotation, SpikingMode
from .models import FamilySpec
from .omniquant import OmniQuant
from .quantize import GPTQFamily
from .rotation import Rotated

#: quant.method -> a factory (q, s, spec, **options) -> BlockMethod
METHODS: dict[str, Callable[..., BlockMethod]] = {}


def register(name: str, factory: Callable[..., BlockMethod]) -> None:
    """Make `quant.method=<name>` run `factory(q, s, spec, batch_size=, device=, log=, **options)`."""
    METHODS[name] = factory


for _name in ("rtn", "gptq", "pbllm"):
    register(_name, GPTQFamily)
register("omniquant", OmniQuant)


def make_method(q: MethodConfig, s: SpikingMode, spec: FamilySpec, rotate: Rotation | None = None,
                **options) -> BlockMethod:
    """The plug-in for `q.method`, built with `options` (batch_size, device, log, and the
    method's own, e.g. saliency_diags for the GPTQ family, act_absmax for OmniQuant); with an
    active `rotate`, wrapped in the rotation plug-in (`rotation.Rotated`), which rotates each
    block before the method sees it."""
    if q.method not in METHODS:
        raise ValueError(f"quant.method={q.method!r} is invalid: must be one of {', '.join(METHODS)}")
    method = METHODS[q.method](q, s, spec, **options)
    if rotate is not None and rotate.active:
        method = Rotated(method, rotate.seed, spec, log=options.get("log"))
    return method


def restore_quantized(model, spec: FamilySpec, q: MethodConfig, s: SpikingMode, directory,
                      rotate: Rotation | None = None) -> None:
    """Finish loading a streamed quantized checkpoint (`directory`, safetensors shards) that
    `from_pretrained` loaded as weights only: the method's runtime modules are rebuilt
    (`BlockMethod.restore_for_inference`) and the tensors they own (salient masks, K ranges)
    are read from the shards."""
    from .streaming import ShardReader
    before = set(model.state_dict())
    make_method(q, s, spec, rotate).restore_for_inference(model)
    added = set(model.state_dict()) - before
    if not added:
        return
    reader = ShardReader(directory)
    try:
        missing = sorted(k for k in added if k not in reader.where)
        if missing:
            raise RuntimeError(f"{directory} lacks the quantizer tensors {missing[:3]}: it was not "
                               f"written by quant={q.method} with these settings")
        state = {k: reader.get(k) for k in added}
    finally:
        reader.close()
    model.load_state_dict(state, strict=False)
