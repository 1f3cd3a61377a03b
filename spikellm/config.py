"""Typed configuration of the weight-quantization verb: one dataclass per method and per spiking
mode (plain dataclasses, no Hydra; `pipelines.config` registers them with Hydra's ConfigStore as
the schemas of `conf/quant/*.yaml` and `conf/spiking/*.yaml`, so a YAML group cannot drift from
its class).

A config holds only the keys its method reads, and checks them once, when it is built
(`__post_init__` → `check()`); `validate(q, s)` adds the one cross-check (which spiking mode runs
in which pipeline). `key()` is what a cache key hashes: every field, minus those the config itself
says have no effect in its current state (`_moot`: e.g. the selection seed under saliency).

    GPTQConfig(wbits=3, group_size=64)               # RTNConfig, PBLLMConfig alike
    OmniQuantConfig(wbits=4, abits=4, epochs=20)
    TernarySpiking(ratio=0.2, steps=3)               # GPTQ pipeline (rtn/gptq)
    GIFSpiking(ratio=0.1, addbit=1)                  # OmniQuant pipeline (t2), or rtn/gptq with abits < 16
    GPTQConfig(wbits=4, abits=4, group_size=0)       # W4A4KV4 (with Rotation("hadamard"): QuaRot-GPTQ)
    Rotation(mode="hadamard", seed=0)                # QuaRot's rotation before any method
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any, ClassVar, Optional


class Method(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    pbllm = "pbllm"
    omniquant = "omniquant"


class Select(StrEnum):
    saliency = "saliency"
    random = "random"


class KAxis(StrEnum):
    """K quantization axis (spikellm/omni_attention.py): `token` per token over head_dim
    (OmniQuant; causal); `channel` per (kv head, channel) over the window's tokens (SpikeLLM's
    code; NON-CAUSAL); `channel_static` per (kv head, channel) against ranges fitted on the
    calibration set (causal)."""
    token = "token"
    channel = "channel"
    channel_static = "channel_static"


class NanPolicy(StrEnum):
    fail = "fail"
    fp32 = "fp32"


class SalientScale(StrEnum):
    own = "own"
    shared = "shared"


class Granularity(StrEnum):
    column = "column"
    element = "element"


class SaliencyFrom(StrEnum):
    sequential = "sequential"
    fp = "fp"


class Target(StrEnum):
    auto = "auto"
    act = "act"
    weight = "weight"
    both = "both"


def doc(default: Any, text: str, **kw):
    """A dataclass field with its documentation (`fields(cls)[i].metadata["doc"]`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def field_docs(cls) -> dict[str, str]:
    """{field name: its documentation} of a config class."""
    return {f.name: f.metadata.get("doc", "") for f in fields(cls)}


class _Checked:
    """Shared behaviour: range checks at construction, the cache-key view."""
    #: the config group and option name this class is the schema of (set by subclasses)
    group: ClassVar[str] = ""

    def __post_init__(self):
        for f in fields(self):          # plain-Python callers may pass strings for enum fields
            t = _ENUMS.get(f.name)
            v = getattr(self, f.name)
            if t is not None and isinstance(v, str) and not isinstance(v, t):
                if v not in t.__members__:
                    raise ValueError(f"{self.group}.{f.name}={v!r} is invalid: must be one of "
                                     f"{', '.join(t.__members__)}")
                setattr(self, f.name, t(v))
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad key, its value and what is allowed."""

    def _moot(self) -> tuple[str, ...]:
        """Fields that have no effect in this state (left out of the cache key)."""
        return ()

    def needs(self) -> tuple[str, ...]:
        """Inputs this config needs computed before the method runs, by `quantize()`'s keyword:
        "saliency_diags" (`fp_saliency_diagonals`), "act_absmax" (`activation_absmax`)."""
        return ()

    def describe(self) -> str:
        """A short human-readable summary (progress lines, logs)."""
        return ""

    def key(self) -> dict:
        """Every field that changes what is computed, enums as their values (JSON-ready)."""
        moot = self._moot()
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()
                if k not in moot}

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{self.group}.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def _require(self, checks) -> None:
        for ok, name, allowed in checks:
            if not ok:
                self._fail(name, allowed)


class RotateMode(StrEnum):
    none = "none"
    hadamard = "hadamard"


_ENUMS = {"method": Method, "select": Select, "k_axis": KAxis, "nan_policy": NanPolicy,
          "salient_scale": SalientScale, "granularity": Granularity,
          "saliency_from": SaliencyFrom, "target": Target}


# ------------------------------------------------------------------------------ methods

@dataclass(kw_only=True)
class _GPTQFamily(_Checked):
    """What every method of the GPTQ pipeline reads (the column-wise solve, `gptq.gptq_solve`)."""
    group: ClassVar[str] = "quant"
    group_size: int = doc(0, "columns per quantization group (grid, scale); 0 = one per output row")
    actorder: bool = doc(False, "quantize columns in order of decreasing Hessian diagonal")
    blocksize: int = doc(128, "columns per lazy-batch block of the solve")
    percdamp: float = doc(0.01, "Hessian damping, as a fraction of its mean diagonal")
    true_sequential: bool = doc(True, "quantize q/k/v, o, gate/up, down in order, each on inputs "
                                      "from the already-quantized ones")

    def _family_checks(self):
        return [(self.group_size >= 0 or self.group_size == -1, "group_size",
                 "0 (per output row) or a positive column count"),
                (self.blocksize >= 1, "blocksize", ">= 1"),
                (0 <= self.percdamp < 1, "percdamp", "in [0, 1)")]


@dataclass(kw_only=True)
class _UniformGrid(_GPTQFamily):
    wbits: int = doc(4, "bits of the uniform weight grid (moot with spiking=ternary: the spikes set the grid)")
    sym: bool = doc(False, "symmetric grid (zero point at the middle code)")
    mse: bool = doc(False, "search the clipping range that minimises the grid's squared error "
                           "(QuaRot's --w_clip)")
    abits: int = doc(16, "bits of every block linear's input, per token, asymmetric (16 = unquantized); "
                         "< 16 also quantizes the KV cache (kv_bits)")
    a_clip: float = doc(1.0, "activation clip ratio: per-token range [a_clip·min, a_clip·max] (QuaRot: 0.9)")
    kv_bits: Optional[int] = doc(None, "bits of K and V per token and head (None = abits; Q stays unquantized)")
    kv_clip: float = doc(1.0, "K/V clip ratio (QuaRot: 0.95)")

    def check(self) -> None:
        self._require([(1 <= self.wbits <= 16, "wbits", "an integer in 1..16"),
                       (2 <= self.abits <= 16, "abits", "an integer in 2..16 (16 = activations unquantized)"),
                       (0 < self.a_clip <= 1, "a_clip", "in (0, 1]"),
                       (0 < self.kv_clip <= 1, "kv_clip", "in (0, 1]"),
                       (self.kv_bits is None or 2 <= self.kv_bits <= 16, "kv_bits",
                        "null (= abits) or an integer in 2..16"),
                       (self.kv_bits is None or self.kv_bits == 16 or self.abits < 16, "kv_bits",
                        "null or 16 while quant.abits=16 (the KV cache is quantized with the activations: "
                        "set quant.abits too)"),
                       *self._family_checks()])

    @property
    def act_quant(self) -> bool:
        """True when activations (and the KV cache) are quantized (abits < 16)."""
        return self.abits < 16

    @property
    def kv(self) -> int:
        """Bits of K and V (kv_bits, or abits)."""
        return self.abits if self.kv_bits is None else self.kv_bits

    def _moot(self):
        # unquantized activations: their clip ratios and the KV bits change nothing
        return ("a_clip", "kv_bits", "kv_clip") if not self.act_quant else ()

    def describe(self) -> str:
        acts = f"A{self.abits}KV{self.kv}" if self.act_quant else ""
        return f"{self.method} W{self.wbits}{acts} " + (f"g{self.group_size}" if self.group_size else "per row")


@dataclass(kw_only=True)
class RTNConfig(_UniformGrid):
    """Round-to-nearest on GPTQ's grid, no error feedback (the Hessian is still collected when
    spiking needs a saliency)."""
    method: Method = doc(Method.rtn, "rtn")

    def check(self) -> None:
        if self.method != Method.rtn:
            self._fail("method", "rtn for RTNConfig")
        super().check()


@dataclass(kw_only=True)
class GPTQConfig(_UniformGrid):
    """GPTQ (Frantar et al. 2022): column-wise OBS updates on a uniform W-bit grid. With
    `TernarySpiking` this is SpikeLLM's GPTQ pipeline."""
    method: Method = doc(Method.gptq, "gptq")

    def check(self) -> None:
        if self.method != Method.gptq:
            self._fail("method", "gptq for GPTQConfig")
        super().check()


@dataclass(kw_only=True)
class PBLLMConfig(_GPTQFamily):
    """PB-LLM (Shang et al. 2023), GPTQ variant: `salient_frac` of the weights (Hessian metric,
    per element) at `high_bits`, the rest binarized around the mean (per row, or per group)."""
    method: Method = doc(Method.pbllm, "pbllm")
    wbits: int = doc(1, "bits of the non-salient weights: always 1 (binarized)")
    salient_frac: float = doc(0.05, "fraction of weights kept at high_bits (1 - low_frac)")
    high_bits: int = doc(8, "bits of the salient weights")

    def check(self) -> None:
        self._require([(self.method == Method.pbllm, "method", "pbllm for PBLLMConfig"),
                       (self.wbits == 1, "wbits", "1 (PB-LLM binarizes the non-salient weights; "
                        "set quant.salient_frac / quant.high_bits)"),
                       (0 <= self.salient_frac <= 1, "salient_frac", "in [0, 1]"),
                       (2 <= self.high_bits <= 16, "high_bits", "in 2..16"),
                       *self._family_checks()])

    def describe(self) -> str:
        return (f"pbllm {self.salient_frac:g} at {self.high_bits} bits, rest binary "
                + (f"g{self.group_size}" if self.group_size else "per row"))


@dataclass(kw_only=True)
class OmniQuantConfig(_Checked):
    """OmniQuant (Shao et al. 2024) as SpikeLLM runs it (method.md §4): learnable weight clipping
    (LWC) + learnable equivalent transformation (LET), block-wise AdamW against the
    full-precision block outputs. With `GIFSpiking` the salient channels spike."""
    group: ClassVar[str] = "quant"
    method: Method = doc(Method.omniquant, "omniquant")
    wbits: int = doc(4, "weight bits (LWC grid, asymmetric)")
    abits: int = doc(16, "activation bits of every linear input and of Q/K/V (16 = unquantized)")
    group_size: int = doc(0, "weight columns per LWC range; 0 = one per output channel")
    epochs: int = doc(0, "block-wise training epochs over the calibration set (0 = initialisation only)")
    lwc: bool = doc(True, "learnable weight clipping")
    let: bool = doc(True, "learnable equivalent transformation (with quantized activations)")
    k_axis: KAxis = doc(KAxis.token, "K quantization axis: token (causal), channel (SpikeLLM's code, "
                                     "NON-CAUSAL) or channel_static (fitted ranges, causal)")
    let_lr: float = doc(1e-3, "AdamW learning rate of the LET parameters")
    lwc_lr: float = doc(1e-2, "AdamW learning rate of the LWC parameters")
    wd: float = doc(0.0, "AdamW weight decay")
    alpha: float = doc(0.75, "SmoothQuant exponent of the LET initialisation")
    aug_loss: bool = doc(False, "OmniQuant's --aug_loss: add MSE(block_fp(q_in), block_q(q_in))")
    train_batch: int = doc(1, "calibration samples per training step")
    nan_policy: NanPolicy = doc(NanPolicy.fail, "a NaN/inf loss: fail the stage, or fp32: retrain "
                                                "the block without autocast")
    amp: bool = doc(True, "bf16 autocast for the block training on CUDA (CPU trains in float32)")
    seed: int = doc(2, "seed of the training order and initialisation")
    percdamp: float = doc(0.01, "damping of the Hessians behind weight spiking (W2A8/W2A16)")

    def check(self) -> None:
        self._require([
            (self.method == Method.omniquant, "method", "omniquant for OmniQuantConfig"),
            (1 <= self.wbits <= 16, "wbits", "an integer in 1..16"),
            (1 <= self.abits <= 16, "abits", "an integer in 1..16"),
            (self.group_size >= 0, "group_size", "0 (per output channel) or a positive column count"),
            (self.epochs >= 0, "epochs", ">= 0"),
            (self.train_batch >= 1, "train_batch", ">= 1"),
            (0 <= self.alpha <= 1, "alpha", "in [0, 1]"),
            (0 <= self.percdamp < 1, "percdamp", "in [0, 1)"),
            (min(self.let_lr, self.lwc_lr, self.wd) >= 0, "let_lr", "non-negative (lwc_lr, wd too)"),
        ])

    def needs(self) -> tuple[str, ...]:
        return ("act_absmax",) if self.let and self.abits < 16 else ()   # LET starts from them

    def describe(self) -> str:
        return f"omniquant W{self.wbits}A{self.abits} K per {self.k_axis}, {self.epochs} epoch(s)"


#: quant.method -> its config class
QUANT_CONFIGS: dict[str, type] = {"rtn": RTNConfig, "gptq": GPTQConfig, "pbllm": PBLLMConfig,
                                  "omniquant": OmniQuantConfig}
METHODS = tuple(QUANT_CONFIGS)


# ------------------------------------------------------------------------------ spiking

@dataclass(kw_only=True)
class NoSpiking(_Checked):
    """No spiking: the method's plain quantization."""
    group: ClassVar[str] = "spiking"
    #: methods this mode runs with
    methods: ClassVar[tuple[str, ...]] = METHODS
    mode: str = doc("none", "none")

    def check(self) -> None:
        self._require([(self.mode == "none", "mode", "none for NoSpiking")])


@dataclass(kw_only=True)
class TernarySpiking(_Checked):
    """SpikeLLM ternary spiking weights (GPTQ pipeline): every weight is a T-step bi-directional
    GIF (symmetric (2T+1)-level grid α·{-T..T}); the top `ratio` of weights (`granularity=element`)
    or of input columns (`column`) by Hessian saliency W²/U_jj² (or at random) get `steps` steps,
    the rest 1. Equal steps = (1 - ratio) + ratio·steps."""
    group: ClassVar[str] = "spiking"
    methods: ClassVar[tuple[str, ...]] = ("rtn", "gptq")
    mode: str = doc("ternary", "ternary")
    ratio: float = doc(0.2, "fraction of weights (or columns) that get `steps` steps")
    steps: int = doc(3, "GIF steps of the salient weights")
    select: Select = doc(Select.saliency, "saliency (Hessian) or random (the same cost, a control)")
    granularity: Granularity = doc(Granularity.element, "unit of saliency: element (per weight, "
                                                        "PB-LLM's) or column (input channel)")
    group_size: Optional[int] = doc(None, "columns sharing one ternary threshold per row; None = the "
                                          "quant config's group_size (equal granularity), 0 = per row")
    salient_scale: SalientScale = doc(SalientScale.own, "own: salient weights get their own MSE "
                                                        "threshold; shared: the normal weights' one")
    saliency_from: SaliencyFrom = doc(SaliencyFrom.sequential, "Hessians the saliency is scored on: "
                                      "sequential (the quantized prefix's) or fp (full precision)")
    weighted: bool = doc(False, "weight the threshold search by the OBS importance 1/U_jj²")
    seed: int = doc(0, "seed of a random selection")
    spike_bits: float = doc(1.0, "bits counted per ternary spike in ACE (one signed accumulate)")

    def check(self) -> None:
        self._require([
            (self.mode == "ternary", "mode", "ternary for TernarySpiking"),
            (0 <= self.ratio <= 1, "ratio", "in [0, 1]"),
            (1 <= self.steps <= 64, "steps", "an integer in 1..64"),
            (self.group_size is None or self.group_size >= 0, "group_size",
             "0 (per row), a positive column count, or null (quant.group_size)"),
            (self.spike_bits > 0, "spike_bits", "> 0"),
        ])

    def _moot(self):
        return ("seed",) if self.select == Select.saliency else ()

    def needs(self) -> tuple[str, ...]:
        return ("saliency_diags",) if self.saliency_from == SaliencyFrom.fp else ()

    def describe(self) -> str:
        return (f"ternary {self.ratio:g} x {self.steps} steps ({self.granularity}, {self.select})")

    def threshold_group(self, q) -> int:
        """Columns per ternary threshold group for quant config `q`."""
        return q.group_size if self.group_size is None else self.group_size


@dataclass(kw_only=True)
class GIFSpiking(_Checked):
    """SpikeLLM GIF spiking (t2: ratio 0.1, addbit 1; t4: 0.05, 2): the salient channels get
    2**addbit GIF steps, i.e. bits + addbit over the same range; salient K/V channels
    2**kv_addbit. What spikes follows `target`. Runs in the OmniQuant pipeline, and in the GPTQ
    pipeline (rtn, gptq) on quantized activations (quant.abits < 16: activations and K/V spike;
    the weights stay on GPTQ's grid)."""
    group: ClassVar[str] = "spiking"
    methods: ClassVar[tuple[str, ...]] = ("omniquant", "rtn", "gptq")
    mode: str = doc("gif", "gif")
    ratio: float = doc(0.1, "fraction of channels that spike with more steps")
    addbit: int = doc(1, "salient channels get 2**addbit GIF steps")
    steps: Optional[int] = doc(None, "= 2**addbit (set addbit); None fills it in")
    select: Select = doc(Select.saliency, "saliency or random (the same cost, a control)")
    target: Target = doc(Target.auto, "what spikes: act (linear inputs and K/V), weight "
                         "(Hessian-salient columns), both, or auto (weights when wbits < abits)")
    kv_addbit: int = doc(1, "GIF steps of the salient K/V channels: 2**kv_addbit")
    seed: int = doc(0, "seed of a random selection")

    def check(self) -> None:
        if self.steps is None and 0 <= self.addbit <= 8:
            self.steps = 2 ** self.addbit
        self._require([
            (self.mode == "gif", "mode", "gif for GIFSpiking"),
            (0 <= self.ratio <= 1, "ratio", "in [0, 1]"),
            (0 <= self.addbit <= 8, "addbit", "an integer in 0..8"),
            (0 <= self.kv_addbit <= 8, "kv_addbit", "an integer in 0..8"),
            (self.steps == 2 ** self.addbit, "steps",
             f"2**spiking.addbit = {2 ** self.addbit} in gif mode (set spiking.addbit instead)"),
        ])

    def _moot(self):
        return ("seed",) if self.select == Select.saliency else ()

    def describe(self) -> str:
        return f"gif {self.ratio:g} x {self.steps} steps ({self.target}, {self.select})"

    def spikes_acts(self, q) -> bool:
        if q.method != Method.omniquant:      # the GPTQ pipeline spikes activations only
            return True
        if self.target == Target.auto:
            return not q.wbits < q.abits
        return self.target in (Target.act, Target.both)

    def spikes_weights(self, q) -> bool:
        if q.method != Method.omniquant:
            return False
        if self.target == Target.auto:
            return q.wbits < q.abits
        return self.target in (Target.weight, Target.both)


#: spiking.mode -> its config class
SPIKING_CONFIGS: dict[str, type] = {"none": NoSpiking, "ternary": TernarySpiking, "gif": GIFSpiking}
SPIKING_MODES = tuple(SPIKING_CONFIGS)
SELECT = tuple(Select.__members__)
K_AXES = tuple(KAxis.__members__)

MethodConfig = RTNConfig | GPTQConfig | PBLLMConfig | OmniQuantConfig
SpikingMode = NoSpiking | TernarySpiking | GIFSpiking


def unknown_key(table: dict[str, type], group: str, name: str, keys) -> str | None:
    """A one-line error for the first of `keys` that the config class `table[name]` lacks, naming
    the options that have it; None when all are known."""
    names = {f.name for f in fields(table[name])}
    extra = sorted(set(keys) - names)
    if not extra:
        return None
    owners = [m for m, c in table.items() if extra[0] in {f.name for f in fields(c)}]
    hint = f" (it belongs to {group}={', '.join(owners)})" if owners else ""
    return f"{group}.{extra[0]} is not a key of {group}={name}{hint}; its keys: {', '.join(sorted(names))}"


def _build(table: dict[str, type], group: str, tag: str, name: str, kw: dict):
    if name not in table:
        raise ValueError(f"{group}.{tag}={name!r} is invalid: must be one of {', '.join(table)}")
    err = unknown_key(table, group, name, kw)
    if err:
        raise ValueError(err)
    return table[name](**{tag: name, **kw})


def QuantConfig(method: str = "gptq", **kw) -> MethodConfig:  # noqa: N802 (the pre-split name)
    """The config of `method` (rtn, gptq, pbllm, omniquant) with `kw`; a key that method does not
    read is a ValueError naming it."""
    return _build(QUANT_CONFIGS, "quant", "method", str(method), kw)


def SpikingConfig(mode: str = "none", **kw) -> SpikingMode:  # noqa: N802
    """The config of spiking `mode` (none, ternary, gif) with `kw` (same rules as QuantConfig)."""
    return _build(SPIKING_CONFIGS, "spiking", "mode", str(mode), kw)


@dataclass(kw_only=True)
class Rotation(_Checked):
    """A rotation of the model before its method runs (`spikellm.rotation`): `none`, or
    `hadamard`, QuaRot's (Ashkboos et al. 2024): RMSNorm scales folded into the next linears, the
    residual stream rotated by a seeded randomized Hadamard matrix, online Hadamards before
    down_proj and o_proj, V/O rotated per head, Q/K rotated after RoPE. The rotated model
    computes the same function; its quantizers see activations without outlier channels."""
    group: ClassVar[str] = "rotate"
    mode: RotateMode = doc(RotateMode.none, "none or hadamard (QuaRot)")
    seed: int = doc(0, "seed of the random ±1 diagonal of the residual rotation")

    def __post_init__(self):
        if not isinstance(self.mode, RotateMode):
            if str(self.mode) not in RotateMode.__members__:
                raise ValueError(f"rotate.mode={self.mode!r} is invalid: must be one of "
                                 f"{', '.join(RotateMode.__members__)}")
            self.mode = RotateMode(str(self.mode))
        super().__post_init__()

    @property
    def active(self) -> bool:
        return self.mode != RotateMode.none

    def check(self) -> None:
        self._require([(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0")])

    def _moot(self):
        return ("seed",) if not self.active else ()

    def describe(self) -> str:
        return f"rotate={self.mode}" + (f" (seed {self.seed})" if self.active else "")


def validate(q, s, r: Rotation | None = None) -> None:
    """The cross-check of a (method, spiking[, rotation]) triple (each config checked its own
    fields when it was built). Raise ValueError naming the key and the fix."""
    q.check()
    s.check()
    if q.method in ("rtn", "gptq") and s.mode == "gif":
        if not q.act_quant:
            raise ValueError(f"spiking={s.mode!r} with quant={q.method} spikes activations and the KV "
                             f"cache: set quant.abits < 16 (spiking weights with GIF steps run in "
                             f"quant=omniquant)")
        if s.target not in (Target.auto, Target.act):
            raise ValueError(f"spiking.target={s.target.value!r} is invalid with quant={q.method}: must be "
                             f"auto or act (GIF weight spiking runs in quant=omniquant; ternary "
                             f"spiking weights are spiking=ternary)")
    if q.method in ("rtn", "gptq") and s.mode == "ternary" and q.act_quant:
        raise ValueError("spiking='ternary' with quant.abits < 16 is not supported: ternary spiking "
                         "weights run with full-precision activations (set quant.abits=16)")
    if r is not None and r.active and q.method == "omniquant" and q.let:
        raise ValueError("rotate=hadamard with quant=omniquant needs quant.let=false: the rotation is "
                         "the equivalent transformation of the rotated run (rotation + LWC); LET's "
                         "scales would be learned on top of it")
    if q.method not in s.methods:
        if s.mode == "gif":
            allowed = f"ternary or none with quant={q.method} (spiking=t2/t4 need quant=omniquant)"
        elif q.method == "omniquant":
            allowed = "none, t2 or t4 with quant=omniquant"
        else:
            allowed = f"none with quant={q.method}"
        raise ValueError(f"spiking={s.mode!r} is invalid: must be {allowed}")
