"""Recipe files: TOML listing stages; each stage starts from the previous stage's output.

    name = "world"
    [model]      preset = "world-s"            # or official fields; init = "world" / a checkpoint to start from;
                 transfer = CKPT (with a preset): start from CKPT's tensors wherever name and shape fit (not its
                 encoders or sampling settings, which only `init` carries)
    [encoders]   text = "minilm"  autoencoder = "identity"
    [[stages]]   name = "pretrain-16"  steps = 3000  batch_size = 64  lr = 1e-3 ...
                 [stages.data]       source = "world"  size = 16  n_objects = [1, 1]
                 [stages.objective]  name = "flow"   (the objective's own fields; see train/objectives)
                 [stages.objective.irepa]  until = 1000  layer = 2
    [parallel]   dp_shard = -1  tp = 1  activation_checkpoint = "none" ...   (train/parallel.py)

Every table is typed: an unknown key is a one-line error listing the known ones.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from krea2.errors import Krea2Error
from krea2.train.data import DataConfig
from krea2.train.lora import LoRAConfig
from krea2.train.objectives import build_objective_config
from krea2.train.objectives.flow import FlowConfig
from krea2.train.parallel import ParallelConfig
from krea2.train.schema import build

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}  # a stage's precision -> FSDP2's param_dtype
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED_NAMES = {"final", "cache", "tb", "recipe.json"}  # the run folder's own entries


@dataclass
class ModelSection:
    """`[model]`: a preset, or the official architecture fields; `init` starts from a checkpoint instead.

    `transfer` (with a preset or fields) starts the new architecture from a checkpoint's tensors wherever name and
    shape match (the rest keep the from-scratch init): a trained body moved to a new latent space or patch size.
    """

    preset: str | None = None
    init: str | None = None
    transfer: str | None = None
    features: int | None = None
    tdim: int | None = None
    txtdim: int | None = None
    heads: int | None = None
    kvheads: int | None = None
    multiplier: int | None = None
    layers: int | None = None
    patch: int | None = None
    channels: int | None = None
    bias: bool | None = None
    theta: float | None = None
    txtlayers: int | None = None
    txtheads: int | None = None
    txtkvheads: int | None = None
    txtblocks: int | None = None

    def __post_init__(self):
        from krea2.models.dit import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.preset is not None and self.fields():
            raise ValueError(f"preset {self.preset!r} and architecture fields {sorted(self.fields())} are both set; "
                             "use one")
        if self.preset is not None and self.init is not None:
            raise ValueError(f"preset {self.preset!r} and init {self.init!r} are both set; init takes the checkpoint's "
                             "architecture, so drop preset")
        if self.preset is None and self.init is None and not self.fields():
            raise ValueError("needs preset = NAME, init = CHECKPOINT or the official architecture fields")
        if self.transfer is not None and self.init is not None:
            raise ValueError(f"transfer {self.transfer!r} and init {self.init!r} are both set; init loads a whole "
                             "checkpoint, transfer gives a preset the tensors that fit: use one")

    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in {"preset", "init", "transfer"} and getattr(self, f.name) is not None}


@dataclass
class SamplingSection:
    """`[sampling]`: the sampling preset and its overrides, stored in the output checkpoint's config; an empty
    table with `[model] init` takes the init checkpoint's own sampling settings, else the raw preset."""

    preset: str | None = None
    steps: int | None = None
    guidance: float | None = None
    mu: float | None = None
    y1: float | None = None
    y2: float | None = None
    minres: int | None = None
    maxres: int | None = None

    def __post_init__(self):
        from krea2.sampling import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown sampling preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class EncodersSection:
    """`[encoders]`; unset: the `[model] init` checkpoint's own encoders, else minilm and identity."""

    text: str | None = None
    autoencoder: str | None = None


@dataclass
class StageConfig:
    name: str
    steps: int
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    decay: float = 0.0  # fraction of the stage at the end with linear decay to 0 (WSD); 0 keeps the plateau
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast); with FSDP also the gathered parameters' dtype
    guard: str = "skip"  # bad step (NaN/inf, loss spike): skip it, or rollback to the last saved state
    # None: the recipe's [parallel] value; a stage may set them only where [parallel] does not (one home each)
    activation_checkpoint: str | None = None  # none | selective | full
    compile: bool | None = None
    pma_k: int = 0  # average of the last k snapshots taken every pma_every steps (0: off)
    pma_every: int = 0
    ema: float = 0.0  # EMA decay (0: off); PMA is the release's choice
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    objective: object = field(default_factory=FlowConfig)  # the objective's own Config (see objectives.OBJECTIVES)
    lora: LoRAConfig | None = None  # [stages.lora]: train peft adapters on a frozen policy (train/lora.py)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if not STAGE_NAME.fullmatch(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(f"stage name {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder) "
                             f"and not one of {sorted(RESERVED_NAMES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.seed < 0 or self.weight_decay < 0 or self.sample_every < 0 or self.pma_k < 0 or self.pma_every < 0:
            raise ValueError("seed, weight_decay, sample_every, pma_k and pma_every must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.pma_k and self.pma_k * self.pma_every > self.steps:
            raise ValueError(f"pma_k x pma_every = {self.pma_k * self.pma_every} snapshots span more than the stage's "
                             f"{self.steps} steps")
        if self.precision not in PRECISION_DTYPE:
            raise ValueError(f"precision {self.precision!r} must be fp32 or bf16")
        if self.guard not in {"skip", "rollback"}:
            raise ValueError(f"guard {self.guard!r} must be skip or rollback")
        if self.activation_checkpoint not in {None, "none", "selective", "full"}:
            raise ValueError("activation_checkpoint must be none, selective or full")
        if self.pma_k and self.pma_every < 1:
            raise ValueError("pma_k needs pma_every >= 1")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:  # also rejects nan
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.decay <= 1 or self.warmup < 0 or self.save_every < 1 or self.log_every < 1:
            raise ValueError("needs decay in [0, 1], warmup >= 0, save_every >= 1 and log_every >= 1")

    def parallel(self, recipe_parallel: ParallelConfig) -> ParallelConfig:
        """The [parallel] settings this stage runs with: its AC/compile where it sets them, its precision's dtype."""
        from dataclasses import replace

        return replace(recipe_parallel, param_dtype=PRECISION_DTYPE[self.precision],
                       activation_checkpoint=self.activation_checkpoint or recipe_parallel.activation_checkpoint,
                       compile=recipe_parallel.compile if self.compile is None else self.compile)


@dataclass
class Recipe:
    name: str
    model: ModelSection
    encoders: EncodersSection = field(default_factory=EncodersSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)  # stored in the output checkpoint's config
    sample_prompts: list[str] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def sampling_dict(self) -> dict:
        """The sampling settings the stages use and the outputs record (see SamplingSection)."""
        d = self.sampling.to_dict()
        if not d and self.model.init is not None:
            from krea2.models.checkpoint import resolve_checkpoint

            return asdict(resolve_checkpoint(self.model.init).sampling)
        return d

    def _init_encoder(self, kind: str, default: str) -> str:
        if self.model.init is None:
            return default
        from krea2.models.checkpoint import resolve_checkpoint

        return getattr(resolve_checkpoint(self.model.init), kind)

    @property
    def text_encoder(self) -> str:
        return self.encoders.text or self._init_encoder("text_encoder", "minilm")

    @property
    def autoencoder(self) -> str:
        return self.encoders.autoencoder or self._init_encoder("autoencoder", "identity")

    def to_dict(self) -> dict:
        return asdict(self)


def check_one_home(stage: dict, par: dict, where: str) -> None:
    """A setting both [parallel] and a stage set to different values is ambiguous: say so instead of picking one."""
    for key in ("activation_checkpoint", "compile"):
        if key in stage and key in par and stage[key] != par[key]:
            raise Krea2Error(f"{where}: {key} = {stage[key]!r} but [parallel] sets {key} = {par[key]!r}; set it in "
                             "one place ([parallel] for every stage, or per stage and not in [parallel])")
    if "param_dtype" in par:
        precision = stage.get("precision", "fp32")
        if PRECISION_DTYPE.get(precision, par["param_dtype"]) != par["param_dtype"]:
            raise Krea2Error(f"{where}: precision = {precision!r} but [parallel] param_dtype = "
                             f"{par['param_dtype']!r}; the stage's precision sets the compute dtype, so drop "
                             "param_dtype or make them agree")


def parse_recipe(d: dict, where: str = "recipe") -> Recipe:
    d = dict(d)
    par = d.pop("parallel", {})
    if not isinstance(par, dict):
        raise Krea2Error(f"{where}: [parallel] must be a table")
    stages = []
    for i, s in enumerate(d.pop("stages", [])):
        if not isinstance(s, dict):
            raise Krea2Error(f"{where}: stage {i} must be a table")
        s = dict(s)
        sw = f"{where}: stage {i} ({s.get('name', '?')})"
        check_one_home(s, par, sw)
        s["data"] = build(DataConfig, s.get("data", {}), sw + " [data]")
        s["objective"] = build_objective_config(s.get("objective", {}), sw + " [objective]")
        stages.append(build(StageConfig, s, sw))
    if not stages:
        raise Krea2Error(f"{where}: no [[stages]]; a recipe needs at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise Krea2Error(f"{where}: stage names must be unique, got {names}")
    if "model" not in d:
        raise Krea2Error(f"{where}: missing [model] (preset = NAME or the official architecture fields)")
    d["model"] = build(ModelSection, d["model"], f"{where} [model]")
    d["encoders"] = build(EncodersSection, d.get("encoders", {}), f"{where} [encoders]")
    d["sampling"] = build(SamplingSection, d.get("sampling", {}), f"{where} [sampling]")
    d["parallel"] = build(ParallelConfig, {k: v for k, v in par.items() if k != "param_dtype"},
                          f"{where} [parallel]")
    return build(Recipe, {**d, "stages": stages}, where)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe; overrides like `stages.0.steps=20` or `model.preset=tiny-world` patch it first."""
    path = Path(path)
    if not path.is_file():
        raise Krea2Error(f"recipe not found: {path}")
    from krea2.errors import read_text

    text = read_text(path, "recipe")
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Krea2Error(f"{path} is not valid TOML: {e}") from None
    for o in overrides or []:
        apply_override(d, o)
    return parse_recipe(d, str(path))


def apply_override(d: dict, item: str) -> None:
    """`a.b.c=value` (TOML value syntax; bare words are strings); `stages.*.steps=10` sets it in every stage."""
    if "=" not in item:
        raise Krea2Error(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    _set_path(d, key.split("."), value, item)


def _set_path(node, parts: list[str], value, item: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        try:
            targets = range(len(node)) if head == "*" else [int(head)]
            for i in targets:
                if rest:
                    _set_path(node[i], rest, value, item)
                else:
                    node[i] = value
        except (ValueError, IndexError):
            raise Krea2Error(f"override {item!r}: {head!r} is not a valid index (0..{len(node) - 1} or *)") from None
    elif not isinstance(node, dict):
        raise Krea2Error(f"override {item!r}: {head!r} is inside a value, not a table")
    elif rest:
        _set_path(node.setdefault(head, {}), rest, value, item)
    else:
        node[head] = value


def parse_overrides(cfg, overrides: list[str], command: str = "train-ae"):
    """`key=value` pairs onto a config dataclass (AEConfig, AestheticConfig), typed by the field; unknown keys and bad
    values are one-line Krea2Errors naming `command`; the result is validated (`validate()` or __post_init__)."""
    known = {f.name for f in fields(cfg) if f.name != "extra"}
    values = asdict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise Krea2Error(f"{command} --set {item!r}: expected key=value with key one of {sorted(known)}")
        current = values[key]
        try:
            if isinstance(current, tuple):
                values[key] = tuple(int(v) for v in raw.split(",") if v.strip())
            elif isinstance(current, bool):
                values[key] = raw.lower() in ("1", "true", "yes")
            else:
                values[key] = type(current)(raw)
        except (ValueError, TypeError):
            raise Krea2Error(f"{command} --set {item!r}: {raw!r} is not a {type(current).__name__}") from None
    values.pop("extra", None)
    out = type(cfg)(**values)
    if hasattr(out, "validate"):
        out.validate()
    return out
