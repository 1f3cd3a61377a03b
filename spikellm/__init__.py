"""spikellm: post-training conversion of LLaMA-family models into spiking LLMs (SpikeLLM).

The notebook API::

    from spikellm import quantize, GPTQConfig, OmniQuantConfig, TernarySpiking, GIFSpiking, perplexity
    report = quantize(model, calib_ids, GPTQConfig(wbits=4), spiking=TernarySpiking(ratio=0.2, steps=3))
    print(report.cost, perplexity(model, windows))

`spikellm.quantize` is the function; its module is `importlib.import_module("spikellm.quantize")`
(`from spikellm.quantize import X` works as usual).
"""
from __future__ import annotations

from spikellm.config import (GIFSpiking, GPTQConfig, NoSpiking, OmniQuantConfig, PBLLMConfig,
                             QuantConfig, RTNConfig, SpikingConfig, TernarySpiking)
from spikellm.data import CalibSpec, calibration_set, evaluation_set
from spikellm.embedded import embedded_checkpoint
from spikellm.evaluate import perplexity, streamed_perplexities, streamed_perplexity
from spikellm.export import load_quantized, save_quantized
from spikellm.models import load_model
from spikellm.quantize import QuantReport, fp_saliency_diagonals, quantize  # noqa: F811 (the function wins)

__all__ = sorted([
    "quantize", "QuantReport", "fp_saliency_diagonals", "perplexity", "streamed_perplexity", "streamed_perplexities",
    "GPTQConfig", "RTNConfig", "PBLLMConfig", "OmniQuantConfig", "NoSpiking", "TernarySpiking",
    "GIFSpiking", "QuantConfig", "SpikingConfig", "load_model", "embedded_checkpoint",
    "CalibSpec", "calibration_set", "evaluation_set", "save_quantized", "load_quantized",
])
