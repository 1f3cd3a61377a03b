"""One typed config per method and spiking mode (spikellm.config), the YAML groups built on them
through Hydra's ConfigStore, and the quantize stage's cache key derived from them: changing any
field of the chosen configs changes the key; another method's fields cannot even be set; keys
outside the method leave it alone."""
from __future__ import annotations

from dataclasses import fields
from enum import Enum

import pytest

from pipelines.config import ConfigError, compose_config, group_options
from pipelines.dag import method_configs, plan
from spikellm.config import (QUANT_CONFIGS, SPIKING_CONFIGS, GIFSpiking, GPTQConfig, KAxis,
                             OmniQuantConfig, TernarySpiking, field_docs)

#: (quant option, spiking option) pairs that run together, one per config class
PAIRS = [("rtn", "ternary"), ("gptq", "ternary"), ("gptq", "none"), ("pbllm", "none"),
         ("omniquant", "t2"), ("omniquant", "none"), ("gptq", "t2")]
#: base overrides a pair needs to run (GIF spiking in the GPTQ pipeline spikes quantized activations)
NEEDS = {("gptq", "t2"): ["quant.abits=4"]}


def _quantize_key(overrides: list[str]) -> str:
    cfg = compose_config(["dry_run=true", *overrides])
    (node,) = [n for n in plan([cfg]).nodes.values() if n.stage == "quantize"]
    return node.key


def _other_value(cls, name: str, value):
    """A different valid value for field `name` of `cls` (None: the field has only one)."""
    if name in ("method", "mode") or (cls.__name__ == "PBLLMConfig" and name == "wbits"):
        return None
    if cls is GIFSpiking and name == "steps":
        return None                       # = 2**addbit: covered by addbit
    if name == "abits" and value == 16:
        return 8
    if name == "kv_bits" and value is None:
        return 8
    if isinstance(value, bool):
        return not value
    if isinstance(value, Enum):
        return next(m for m in type(value).__members__ if m != value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value / 2, 6) if value > 0 else 0.125
    if value is None:
        return 32
    raise AssertionError(f"no alternative for {cls.__name__}.{name}={value!r}")


@pytest.mark.parametrize("quant,spiking", PAIRS)
def test_every_field_of_the_chosen_configs_changes_the_quantize_key(quant, spiking):
    base_ov = [f"quant={quant}", f"spiking={spiking}", *NEEDS.get((quant, spiking), [])]
    if spiking != "none":
        base_ov.append("spiking.select=random")     # the seed only counts for a random selection
    base = _quantize_key(base_ov)
    q, s = method_configs(compose_config(base_ov))
    changed = 0
    for group, obj in (("quant", q), ("spiking", s)):
        for f in fields(obj):
            alt = _other_value(type(obj), f.name, getattr(obj, f.name))
            # fields the config calls moot in this state (e.g. clip ratios of unquantized
            # activations) are left out of the key by design; ternary weights run at A16 only
            if alt is None or f.name in obj._moot() or (f.name == "abits" and spiking == "ternary"):
                continue
            alt = str(alt).lower() if isinstance(alt, bool) else alt
            key = _quantize_key([*base_ov, f"{group}.{f.name}={alt}"])
            assert key != base, f"{group}.{f.name}={alt} did not change the quantize key"
            changed += 1
    assert changed >= 5


def test_a_seed_that_draws_nothing_is_not_in_the_key():
    a = _quantize_key(["spiking=ternary", "spiking.seed=0"])
    assert _quantize_key(["spiking=ternary", "spiking.seed=5"]) == a        # saliency: no draw
    r = _quantize_key(["spiking=ternary", "spiking.select=random", "spiking.seed=0"])
    assert _quantize_key(["spiking=ternary", "spiking.select=random", "spiking.seed=5"]) != r


@pytest.mark.parametrize("quant,spiking", PAIRS)
def test_another_methods_fields_are_rejected_in_one_line(quant, spiking):
    need = NEEDS.get((quant, spiking), [])
    cfg = compose_config([f"quant={quant}", f"spiking={spiking}", *need])
    q, s = method_configs(cfg)
    for table, obj, group in ((QUANT_CONFIGS, q, "quant"), (SPIKING_CONFIGS, s, "spiking")):
        own = {f.name for f in fields(obj)}
        foreign = sorted({f.name for c in table.values() for f in fields(c)} - own)
        assert foreign
        for name in foreign:
            with pytest.raises(ConfigError, match=rf"{group}\.{name} is not a key of {group}=") as e:
                compose_config([f"quant={quant}", f"spiking={spiking}", *need, f"{group}.{name}=1"])
            assert "\n" not in str(e.value) and "it belongs to" in str(e.value)


def test_keys_outside_the_method_do_not_change_the_quantize_key():
    base = _quantize_key(["quant=gptq"])
    for ov in ("eval.seqlen=256", "eval.max_windows=3", "logger=none", "progress=false",
               "launcher=local", "name=x", "energy.source=other"):
        assert _quantize_key(["quant=gptq", ov]) == base, ov


def test_every_yaml_option_is_typed_by_its_dataclass():
    for opt in group_options("quant"):
        cfg = compose_config([f"quant={opt}"])
        assert cfg.quant._metadata.object_type is QUANT_CONFIGS[str(cfg.quant.method)]
    for opt in group_options("spiking"):
        extra = ["quant=omniquant"] if opt in ("t2", "t4") else []
        cfg = compose_config([f"spiking={opt}", *extra])
        assert cfg.spiking._metadata.object_type is SPIKING_CONFIGS[str(cfg.spiking.mode)]


def test_every_field_is_documented():
    from spikellm.config import Rotation
    for cls in (*QUANT_CONFIGS.values(), *SPIKING_CONFIGS.values(), Rotation):
        undocumented = [k for k, v in field_docs(cls).items() if not v]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_configs_check_their_own_ranges_once_built():
    with pytest.raises(ValueError, match=r"quant.wbits=0 is invalid"):
        GPTQConfig(wbits=0)
    with pytest.raises(ValueError, match=r"spiking.steps=3 is invalid: must be 2\*\*spiking.addbit"):
        GIFSpiking(addbit=1, steps=3)
    with pytest.raises(ValueError, match=r"quant.k_axis='tokens' is invalid: must be one of token"):
        OmniQuantConfig(k_axis="tokens")
    assert OmniQuantConfig(k_axis="channel").k_axis is KAxis.channel
    assert GIFSpiking(addbit=2).steps == 4
    assert TernarySpiking().threshold_group(GPTQConfig(group_size=64)) == 64
    assert TernarySpiking(group_size=0).threshold_group(GPTQConfig(group_size=64)) == 0
    with pytest.raises(TypeError):
        GPTQConfig(4)                    # keyword-only: no positional mix-ups


def test_an_invalid_enum_value_names_the_options():
    with pytest.raises(ConfigError, match="quant.k_axis=tokens.*token, channel, channel_static"):
        compose_config(["quant=omniquant", "quant.k_axis=tokens"])
