"""Smoke test of the OmniQuant path on a GPU with a tiny random LLaMA (no checkpoint needed):
the spiking attention equals the stock one without quantizers, and a W4A4 t2 run trains,
quantizes and reloads with its masks. Prints versions and timings.

    python bench/device_smoke.py
"""
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikellm.config import QuantConfig, SpikingConfig  # noqa: E402
from spikellm.omni_attention import use_spiking_attention  # noqa: E402
from spikellm.omniquant import omniquant, wrap_for_inference  # noqa: E402


def tiny(device):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("torch", torch.__version__, "transformers", transformers.__version__, device,
          torch.cuda.get_device_name() if device == "cuda" else "")
    m = tiny(device)
    ids = torch.randint(0, 512, (4, 64), device=device)
    with torch.no_grad():
        ref = m(ids).logits
        use_spiking_attention(m)
        out = m(ids).logits
    print("spiking attention vs stock, max |diff|:", (out - ref).abs().max().item())
    q = QuantConfig(method="omniquant", wbits=4, abits=4, epochs=2, amp=False)
    s = SpikingConfig(mode="gif", ratio=0.1, addbit=1, steps=2)
    t0 = time.time()
    stats, params = omniquant(m, ids, q, s, device=device, progress=False)
    print(f"omniquant 2 blocks x 2 epochs: {time.time() - t0:.2f}s, epoch losses block 0:",
          params["0.epoch_loss"].tolist())
    fresh = tiny(device)
    wrap_for_inference(fresh, q, s)
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        same = torch.equal(fresh(ids).logits, m(ids).logits)
    print("reloaded with masks, identical logits:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
