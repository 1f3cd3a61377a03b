import pytest

from pipelines.config import ConfigError, compose_config, expand_points, expand_sweep, group_options

CONTRACT_KEYS = ["quant.wbits", "quant.group_size", "spiking.ratio", "spiking.steps",
                 "spiking.select", "calib.nsamples", "calib.seqlen", "eval.seqlen",
                 "eval.max_windows", "paths.outputs", "paths.data_dir"]


@pytest.mark.parametrize("group", ["model", "quant", "spiking", "calib", "eval", "experiment",
                                   "logger", "launcher"])
def test_every_config_option_composes_and_validates(group):
    options = group_options(group)
    assert options
    for opt in options:
        extra = ["quant=omniquant"] if (group, opt) in (("spiking", "t2"), ("spiking", "t4")) else []
        cfg = compose_config([f"{group}={opt}", *extra])
        assert cfg._choices[group] == opt


def test_options_that_extend_another_keep_its_keys():
    """launcher/{slurm,auto,submitit_local} and eval/{full,zeroshot} extend launcher/local and
    eval/default through their defaults lists instead of copying them."""
    for group, base, opts in (("launcher", "local", ("slurm", "auto", "submitit_local")),
                              ("eval", "default", ("full", "zeroshot"))):
        ref = compose_config([f"{group}={base}"])[group]
        for opt in opts:
            got = compose_config([f"{group}={opt}"])[group]
            assert set(got) == set(ref)
    assert compose_config(["launcher=slurm"]).launcher.kind == "slurm"
    assert list(compose_config(["eval=full"]).eval.datasets) == ["wikitext2", "ptb", "c4"]


def test_required_models_exist_with_resources():
    have = set(group_options("model"))
    assert {"smollm2_135m", "llama7b", "llama13b", "llama2_7b", "llama2_13b", "llama2_70b",
            "llama3_8b", "llama70b"} <= have
    cfg = compose_config(["model=llama70b"])
    assert cfg.model.arch.layers == 80 and cfg.model.resources.gpus >= 1


def test_contract_keys_are_overridable():
    from omegaconf import OmegaConf
    values = ["3", "64", "0.1", "2", "random", "16", "256", "128", "5", "/tmp/o", "/tmp/d"]
    cfg = compose_config([f"{k}={v}" for k, v in zip(CONTRACT_KEYS, values)])
    for k, v in zip(CONTRACT_KEYS, values):
        assert str(OmegaConf.select(cfg, k)) == v


def test_model_path_comes_from_environment(monkeypatch):
    monkeypatch.setenv("SPIKELLM_LLAMA2_7B_PATH", "/models/llama-2-7b")
    assert compose_config(["model=llama2_7b"]).model.path == "/models/llama-2-7b"


@pytest.mark.parametrize("override,key", [
    ("quant.wbits=0", "quant.wbits"), ("spiking.ratio=1.5", "spiking.ratio"),
    ("model=nosuchmodel", "model"), ("spiking.select=best", "spiking.select"),
    ("quant.wbits=abc", "quant.wbits"), ("calib.nsamples=0", "calib.nsamples"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_sweep_expansion_uses_hydra_grammar():
    pts = expand_sweep(["spiking.ratio=0,0.1", "spiking.select=saliency,random", "quant.wbits=3"])
    assert len(pts) == 4 and all("quant.wbits=3" in p for p in pts)
    assert len(expand_sweep(["spiking.steps=range(1,4)"])) == 3


def test_glob_sweeps_config_group_options():
    assert expand_sweep(["model=glob(llama2_*)"]) == [
        ["model=llama2_13b"], ["model=llama2_70b"], ["model=llama2_7b"]]
    quants = expand_sweep(["quant=glob(*,exclude=[pbllm,omniquant])", "spiking=none"])
    assert [p[0] for p in quants] == ["quant=gptq", "quant=rtn"]
    with pytest.raises(ConfigError, match="spiking.ratio: glob"):
        expand_sweep(["spiking.ratio=glob(*)"])
    with pytest.raises(ConfigError, match="matches no option"):
        expand_sweep(["model=glob(gpt*)"])


def test_experiment_recipe_carries_settings_and_its_sweep():
    cfg = compose_config(["experiment=paper_gptq", "model=llama2_70b"])
    assert (cfg.model.name, cfg.calib.dataset, cfg.calib.nsamples, cfg.calib.seqlen) == \
        ("llama2_70b", "c4", 128, 2048)
    assert cfg._choices["experiment"] == "paper_gptq" and cfg.spiking.mode == "ternary"
    points = expand_points(["experiment=ratio_sweep"])
    assert len(points) == 8
    assert {compose_config(p).calib.nsamples for p in points} == {16}
    # the command line wins over the recipe's sweep for the same key
    points = expand_points(["experiment=ratio_sweep", "spiking.ratio=0.1"])
    assert len(points) == 2
    assert {compose_config(p).spiking.ratio for p in points} == {0.1}


def test_omniquant_keys_and_spiking_defaults():
    cfg = compose_config(["quant=omniquant"])
    assert cfg.spiking.mode == "none" and cfg.quant.abits == 4 and cfg.quant.epochs == 20
    cfg = compose_config(["quant=omniquant", "quant.wbits=4", "quant.abits=4", "spiking=t2",
                          "quant.epochs=2", "quant.lwc=false", "quant.let=true", "quant.k_axis=token"])
    assert (cfg.spiking.ratio, cfg.spiking.addbit, cfg.spiking.steps) == (0.1, 1, 2)
    assert (cfg.quant.epochs, cfg.quant.lwc, cfg.quant.k_axis) == (2, False, "token")
    cfg = compose_config(["quant=omniquant", "spiking=t4"])
    assert (cfg.spiking.ratio, cfg.spiking.addbit, cfg.spiking.steps) == (0.05, 2, 4)
    assert compose_config(["quant=omniquant", "spiking=t2", "spiking.addbit=2"]).spiking.steps == 4
    with pytest.raises(ConfigError, match="spiking"):
        compose_config(["spiking=t2"])                       # GIF spiking needs quant=omniquant
    with pytest.raises(ConfigError, match="quant.k_axis"):
        compose_config(["quant=omniquant", "quant.k_axis=rows"])


def test_k_axis_defaults_causal_and_recipes_say_which_they_use():
    cfg = compose_config(["quant=omniquant"])
    assert (cfg.quant.k_axis, cfg.quant.aug_loss) == ("token", False)
    assert compose_config(["quant=omniquant", "quant.k_axis=channel_static"]).quant.k_axis == "channel_static"
    assert compose_config(["experiment=paper_w4a4"]).quant.k_axis == "channel"   # the official code's
    for recipe in ("omni_cpu", "omni_w4a4", "omni_own_cpu", "omni_own_w4a4"):
        assert compose_config([f"experiment={recipe}"]).quant.k_axis == "token"


def test_omniquant_own_recipes_carry_its_published_settings():
    q = compose_config(["experiment=omni_own_w4a4"]).quant          # scripts/llama/llama-7b/w4a4.sh
    assert (q.wbits, q.abits, q.epochs, q.lwc, q.let, q.let_lr, q.alpha, q.aug_loss) == \
        (4, 4, 20, True, True, 0.005, 0.5, True)
    q = compose_config(["experiment=omni_own_w2a16"]).quant         # scripts/Llama-2/Llama-2-7b/w2a16.sh
    assert (q.wbits, q.abits, q.epochs, q.lwc, q.let, q.aug_loss, q.group_size) == \
        (2, 16, 40, True, False, True, 0)
    cpu = compose_config(["experiment=omni_own_cpu"])
    assert (cpu.quant.let_lr, cpu.quant.alpha, cpu.quant.aug_loss, cpu.calib.nsamples) == (0.005, 0.5, True, 8)


def test_every_recipe_and_its_sweep_composes_and_plans(tmp_path, capsys, monkeypatch):
    """`-m experiment=glob(*)`: every recipe (and the sweep it declares) composes, validates and
    is planned by the dry run (no weights read; data from the hub's layout, which has every
    split the recipes name). The points of a sweep over spiking modes that a swept key does not
    apply to run once, with a note."""
    import json

    from pipelines.run import main
    monkeypatch.delenv("SPIKELLM_DATA_DIR", raising=False)   # CI's local files lack wikitext2/train
    rc = main(["-m", "experiment=glob(*)", "dry_run=true", "paths.data_dir=null",
               f"paths.outputs={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert "spiking.select=random does not apply to spiking=none" in err
    plan = json.loads((tmp_path / "dry_run.json").read_text())
    assert not plan["errors"] and {r["model"] for r in plan["stages"]} >= {"smollm2_135m", "llama2_7b", "llama7b"}
