"""Measured spiking (`spikellm.spikes`): on a tiny layer with hand-picked inputs the counted
spikes, SOPs and energy equal a hand count; the spike-train forward the counting follows equals
the fake-quant forward (on representable codes); a layer whose inputs are all zero fires
nothing and costs only its remaining multiplies; ternary weight spikes equal the explicit
bi-directional spike train's; eval.spikes is a keyed, checked pipeline option."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spikellm.allocation import EnergyModel, layer_cost
from spikellm.gif import ternary_codes, ternary_spike_train
from spikellm.omni_quantizers import GIFActQuantizer
from spikellm.omniquant import QuantLinear
from spikellm.spikes import SpikeAccounting, spike_metrics

E = EnergyModel()


def _tiny(bits=2, addbit=1, salient=(3,)):
    """A model whose one layer "layers.0.proj" is a 4 -> 3 QuantLinear with a 2-bit activation
    quantizer, channel 3 salient (2 GIF steps of 4 levels: a 3-bit code)."""
    torch.manual_seed(0)
    ql = QuantLinear(nn.Linear(4, 3, bias=False), GIFActQuantizer(bits, 4, addbit=addbit))
    m = torch.zeros(4, dtype=torch.bool)
    m[list(salient)] = True
    ql.act_quant.set_salient(m)
    block = nn.Module()
    block.proj = ql
    root = nn.Module()
    root.layers = nn.ModuleList([block])
    cost = layer_cost("0.proj", 3, 4, torch.where(m, 2.0, 1.0), 4, bits, storage_bits=4.0, scale_mults=2)
    return root, ql, cost


def test_hand_counted_spikes_sops_and_energy():
    """x = (0, 1, 2, 3), one token. Normal channels, 2 bits over [0, 3] (Δ 1, z 0): codes 0, 1, 2:
    two spikes (levels 1, 2), code 0 fires nothing. Salient channel 3, 3 bits (Δ 3/7): code 7,
    fired as 2 GIF steps of 4 levels: spikes 3, 3 (the top code clipped by one, method.md §2.3).
    Fired 4 of 3 + 2 = 5 slots; SOPs 4 x 3 outputs + 3 x (2 weight-scale + 2 x 2 activation-grid)
    multiplies = 12 + 18 = 30; energy 12 x (4·2 bit-ops x 0.003125 + 0.1) + 18 x 256 x 0.003125."""
    root, ql, cost = _tiny()
    with SpikeAccounting(root) as acc:
        ql(torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]))
    (s,) = acc.layers([cost], E)
    assert (s.kind, s.fired, s.slots, s.firing_rate) == ("act", 4.0, 5.0, pytest.approx(0.8))
    assert s.levels == [1.0, 1.0, 2.0]                 # fired spikes of level 1, 2, 3
    assert s.mults == 18 and s.sops == 30
    assert s.energy_pj == pytest.approx(12 * (8 * 0.003125 + 0.1) + 18 * 256 * 0.003125)
    m = spike_metrics([s], s.formula_pj)
    assert m["spike/firing_rate"] == pytest.approx(0.8) and m["spike/firing_rate/0.proj"] == pytest.approx(0.8)
    assert m["cost/energy_event_rel_formula"] == pytest.approx(s.energy_pj / s.formula_pj)


def test_zero_inputs_fire_nothing_and_cost_only_the_remaining_multiplies():
    root, ql, cost = _tiny()
    with SpikeAccounting(root) as acc:
        ql(torch.zeros(2, 5, 4))
    (s,) = acc.layers([cost], E)
    assert s.fired == 0 and s.firing_rate == 0 and s.sops == s.mults == 18
    assert s.energy_pj == pytest.approx(18 * 256 * E.int_mul_bitop)


@pytest.mark.parametrize("bits,addbit,clip", [(4, 1, 1.0), (4, 2, 0.9), (3, 1, 1.0)])
def test_the_counted_spike_train_computes_the_fake_quant_output(bits, addbit, clip):
    """`QuantLinear.spike_forward` accumulates exactly the spikes `SpikeAccounting` counts; on
    codes the spike train can represent (salient charges <= 2**a·(L-1)) it equals `forward`."""
    torch.manual_seed(1)
    ql = QuantLinear(nn.Linear(16, 8), GIFActQuantizer(bits, 16, addbit=addbit, clip=clip)).double()
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[2, 9]] = True
    ql.act_quant.set_salient(mask)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    codes = ql.act_quant.spike_codes(x)
    top = 2 ** addbit * (2 ** bits - 1)
    ok = (codes.hi[0] <= top) | ~codes.salient                      # representable positions
    rows = ok.all(-1)
    assert rows.any()
    torch.testing.assert_close(ql.spike_forward(x)[rows], ql(x)[rows])


def test_ternary_weight_spikes_are_the_spike_trains_nonzero_spikes():
    """A code c fires |c| spikes (the count `TernaryGIFQuantizer` records while solving)."""
    torch.manual_seed(2)
    w = torch.randn(6, 10, dtype=torch.float64)
    alpha = torch.full((6, 1), 0.4, dtype=torch.float64)
    codes = ternary_codes(w, alpha, 3)
    train = ternary_spike_train(w, alpha, 3)
    assert int(codes.abs().sum()) == int((train != 0).sum())


def test_gptq_ternary_layers_record_their_static_weight_spikes():
    from spikellm.config import GPTQConfig, TernarySpiking
    from spikellm.quantize import quantize_linear
    torch.manual_seed(3)
    lin = nn.Linear(64, 16, bias=False)
    X = torch.randn(256, 64)
    H = 2 * X.t() @ X / 256
    _, cost = quantize_linear("0.fc", lin, H, GPTQConfig(group_size=0), TernarySpiking(ratio=0.25, steps=3))
    assert cost.weight_slots == pytest.approx(16 * 64 * (0.75 + 0.25 * 3), abs=3)
    # every nonzero quantized weight fires at least once, at most 3 times
    nz = int((lin.weight != 0).sum())
    assert nz <= cost.weight_spikes <= 3 * nz


def test_eval_spikes_is_keyed_and_checked():
    from pipelines.config import ConfigError, compose_config
    from pipelines.dag import STAGE_INPUTS
    a = compose_config(["dry_run=true"])
    b = compose_config(["dry_run=true", "eval.spikes=true", "eval.spike_windows=2"])
    assert "eval.spikes" not in STAGE_INPUTS["evaluate"](a)
    assert STAGE_INPUTS["evaluate"](b)["eval.spike_windows"] == 2
    with pytest.raises(ConfigError, match="eval.spike_windows=0 is invalid"):
        compose_config(["eval.spike_windows=0"])
    with pytest.raises(ConfigError, match="eval.spikes=True is invalid"):
        compose_config(["model.stream=true", "eval.stream=true", "eval.spikes=true"])


def test_the_report_plots_firing_rates_per_layer_and_energy_per_method(tmp_path):
    """Rows as `pipelines.report.collect` returns them for an `eval.spikes` sweep: a firing-rate
    figure (blocks x roles) for the spiking point, an energy figure for every point; the
    per-layer rates stay out of the table."""
    from pipelines.report import table, write_spike_plots
    rates = {f"spike/firing_rate/{b}.{r}": 0.5 + 0.01 * b for b in range(3) for r in ("mlp.up_proj", "self_attn.k")}
    rows = [{"overrides": "spiking=none", "state": "done", "swept": {"spiking": "none"},
             "metrics": {"cost/energy_pj": 2e7, "cost/energy_event_pj": 1.9e7, "cost/energy_fp16_pj": 5e8}},
            {"overrides": "spiking=t2", "state": "done", "swept": {"spiking": "t2"},
             "metrics": {"cost/energy_pj": 2.2e7, "cost/energy_event_pj": 2.1e7, "cost/energy_fp16_pj": 5e8,
                         "spike/firing_rate": 0.51, **rates}}]
    plots = write_spike_plots(rows, tmp_path)
    assert [p.name for _, p in plots] == ["plot_firing_rate.png", "plot_energy.png"]
    assert all(p.stat().st_size > 1000 for _, p in plots)
    head, _ = table(rows)
    assert "spike/firing_rate" in head and not any(h.startswith("spike/firing_rate/0.") for h in head)
