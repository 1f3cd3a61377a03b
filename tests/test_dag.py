"""Sweep planning: stage instances are shared exactly when their output-changing config agrees."""
import pytest

from pipelines.config import ConfigError, compose_config, compose_sweep, expand_sweep
from pipelines.dag import plan

SWEEP = ["spiking.ratio=0,0.05,0.1,0.2", "spiking.select=saliency,random"]


def _cfgs(overrides):
    return compose_sweep(expand_sweep(overrides))[0]


def test_eight_point_sweep_shares_calibration_and_scores():
    p = plan(_cfgs(SWEEP + ["spiking.saliency_from=fp"]))
    assert len(p.points) == 8
    assert p.count() == {"calibrate": 1, "evaluate_fp": 1, "score": 1, "quantize": 8, "evaluate": 8}


def test_ratio_sweep_recipe_plans_like_the_command_line_sweep():
    from pipelines.config import expand_points
    p = plan([compose_config(q) for q in expand_points(["experiment=ratio_sweep"])])
    assert p.count() == {"calibrate": 1, "evaluate_fp": 1, "score": 1, "quantize": 8, "evaluate": 8}


def test_sequential_saliency_needs_no_score_stage():
    p = plan(_cfgs(SWEEP))
    assert p.count() == {"calibrate": 1, "evaluate_fp": 1, "quantize": 8, "evaluate": 8}


def _keys(overrides):
    p = plan([compose_config(overrides)])
    return {p.nodes[i].stage: p.nodes[i].key for i in p.points[0].values()}


def test_keys_change_exactly_with_output_changing_keys():
    base = _keys(["spiking.saliency_from=fp"])
    same = _keys(["spiking.saliency_from=fp", "progress=false", "name=x", "logger=none"])
    assert same == base                                  # nothing output-changing
    # the calibration batch changes the Hessians' summation order (weights differ): keyed
    batch = _keys(["spiking.saliency_from=fp", "batch_size=3"])
    assert {s for s in base if base[s] != batch[s]} == {"score", "quantize", "evaluate"}
    ebatch = _keys(["spiking.saliency_from=fp", "eval.batch_size=1"])
    assert {s for s in base if base[s] != ebatch[s]} == {"evaluate", "evaluate_fp"}
    # save_model adds an export stage downstream of quantize; the quantized model is the same
    saved = _keys(["spiking.saliency_from=fp", "save_model=true"])
    assert {s for s in base if base[s] != saved[s]} == set() and set(saved) - set(base) == {"export"}
    ev = _keys(["spiking.saliency_from=fp", "eval.max_windows=7"])
    assert {s for s in base if base[s] != ev[s]} == {"evaluate", "evaluate_fp"}
    alloc = _keys(["spiking.saliency_from=fp", "spiking.ratio=0.3"])
    assert {s for s in base if base[s] != alloc[s]} == {"quantize", "evaluate"}
    damp = _keys(["spiking.saliency_from=fp", "quant.percdamp=0.1"])
    assert {s for s in base if base[s] != damp[s]} == {"score", "quantize", "evaluate"}
    calib = _keys(["spiking.saliency_from=fp", "calib.seed=5"])
    assert {s for s in base if base[s] != calib[s]} == {"calibrate", "score", "quantize", "evaluate"}
    model = _keys(["spiking.saliency_from=fp", "model=llama2_7b"])
    assert all(base[s] != model[s] for s in base)


def test_keys_of_another_method_are_rejected_or_collapsed_in_a_sweep():
    """A single run that sets a key its method lacks is an error; a sweep over methods runs the
    points that lack it without it (once) and says so."""
    with pytest.raises(ConfigError, match="spiking.select is not a key of spiking=none"):
        compose_config(["quant=rtn", "spiking=none", "spiking.select=random"])
    cfgs, points, notes = compose_sweep(expand_sweep(["quant=rtn", "spiking=none,ternary",
                                                      "spiking.select=saliency,random"]))
    assert len(cfgs) == 3 and points[0] == ["quant=rtn", "spiking=none"]
    assert notes and all("does not apply to spiking=none" in n for n in notes)
    with pytest.raises(ConfigError, match="quant.blocksize is not a key of quant=omniquant"):
        compose_sweep(expand_sweep(["quant=omniquant", "quant.blocksize=64,128"]))
    omni = _keys(["quant=omniquant", "spiking=t2"])
    assert _keys(["quant=omniquant", "spiking=t2", "quant.epochs=3"])["quantize"] != omni["quantize"]
    assert _keys(["quant=omniquant", "spiking=t2", "spiking.seed=4"]) == omni       # saliency: no draw
    rnd = _keys(["quant=omniquant", "spiking=t2", "spiking.select=random"])
    assert _keys(["quant=omniquant", "spiking=t2", "spiking.select=random", "spiking.seed=4"]) != rnd


def test_omniquant_sweep_shares_calibration_and_activation_statistics():
    p = plan(_cfgs(["quant=omniquant", "spiking=none,t2,t4", "spiking.select=saliency,random"]))
    # spiking=none ignores the selection: 5 distinct quantizations, one act-stats pass
    assert p.count() == {"calibrate": 1, "evaluate_fp": 1, "act_stats": 1, "quantize": 5, "evaluate": 5}
    assert plan(_cfgs(["quant=omniquant", "quant.let=false"])).count().get("act_stats") is None


def test_group_sweep_over_quant_methods():
    p = plan(_cfgs(["quant=rtn,gptq", "spiking=none", "quant.wbits=3,4"]))
    assert p.count() == {"calibrate": 1, "evaluate_fp": 1, "quantize": 4, "evaluate": 4}


def test_aug_loss_and_k_axis_key_omniquant_only():
    omni = _keys(["quant=omniquant", "spiking=t2"])
    for extra in ("quant.aug_loss=true", "quant.k_axis=channel", "quant.k_axis=channel_static"):
        assert _keys(["quant=omniquant", "spiking=t2", extra])["quantize"] != omni["quantize"]
    with pytest.raises(ConfigError, match="quant.aug_loss is not a key of quant=rtn"):
        compose_config(["quant=rtn", "spiking=none", "+quant.aug_loss=true"])
