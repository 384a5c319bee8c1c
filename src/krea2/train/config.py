"""Recipe files: TOML listing stages; each stage starts from the previous stage's output.

    name = "world"
    [model]      preset = "world-s"            # or official fields; init = "world" / a checkpoint to start from
    [encoders]   text = "minilm"  autoencoder = "identity"
    [[stages]]   name = "pretrain-16"  steps = 3000  batch_size = 64  lr = 1e-3 ...
                 [stages.data]       source = "world"  size = 16  n_objects = [1, 1]
                 [stages.objective]  name = "flow"  irepa = true  irepa_until = 1000
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from krea2.errors import Krea2Error
from krea2.train.parallel import ParallelConfig


def _build(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise Krea2Error(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise Krea2Error(f"{where}: {e}") from None


@dataclass
class DataConfig:
    source: str = "world"  # world | emoji | rows (Parquet training rows from `krea2 curate export`)
    size: int | list[int] = 32  # square side(s) for world/emoji: a list makes one size bucket each; rows carry theirs
    pool: int = 4096  # scenes rendered and captions encoded once per stage (cached frozen-encoder states)
    n_objects: tuple[int, int] = (1, 4)
    styles: list[str] | None = None
    backgrounds: list[str] | None = None
    sizes: list[str] | None = None  # object sizes, e.g. ["large"] for an early curriculum
    path: str = ""  # rows: the exported Parquet folder
    captions: dict[str, float] = field(default_factory=lambda: {"long": 0.7, "medium": 0.2, "short": 0.1})
    caption_dropout: float = 0.1  # replaced by the empty-prompt encoding, never zeros

    @property
    def resolutions(self) -> list[int]:
        return self.size if isinstance(self.size, list) else [self.size]

    @property
    def native(self) -> int:
        """The largest bucket side: the resolution the stage's output is sampled at."""
        return max(self.resolutions)

    def __post_init__(self):
        self.n_objects = tuple(self.n_objects)
        if self.source not in {"world", "emoji", "rows"}:
            raise ValueError(f"data source {self.source!r} must be world, emoji or rows")
        if self.source == "rows" and not self.path:
            raise ValueError("data source rows needs path = the exported Parquet folder")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("caption_dropout must be in [0, 1)")
        if any(k not in {"long", "medium", "short"} for k in self.captions) or sum(self.captions.values()) <= 0:
            raise ValueError("captions weights must use long/medium/short with a positive sum")


@dataclass
class ObjectiveConfig:
    name: str = "flow"
    shift_offset: float = 0.0  # added to the resolution rule's mu for training timesteps
    logit_mean: float = 0.0
    logit_std: float = 1.0
    irepa: bool = False
    irepa_until: int = 0  # steps of this stage with the alignment term on (ramped to 0 over the last 5%)
    irepa_layer: int = 2  # 1-based block whose image tokens are aligned
    irepa_weight: float = 0.5
    irepa_gamma: float = 0.6  # spatial normalisation strength of the teacher features
    irepa_teacher: str = "world"  # world (the project's world encoder) | hf:PATH (a transformers vision backbone)

    def __post_init__(self):
        if self.name not in {"flow"}:
            raise ValueError(f"objective {self.name!r} unknown; available: flow")


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
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    guard: str = "skip"  # bad step (NaN/inf, loss spike): skip it, or rollback to the last saved state
    activation_checkpoint: str = "none"  # none | selective | full
    compile: bool = False
    pma_k: int = 0  # average of the last k snapshots taken every pma_every steps (0: off)
    pma_every: int = 0
    ema: float = 0.0  # EMA decay (0: off); PMA is the release's choice
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.precision not in {"fp32", "bf16"}:
            raise ValueError(f"precision {self.precision!r} must be fp32 or bf16")
        if self.activation_checkpoint not in {"none", "selective", "full"}:
            raise ValueError("activation_checkpoint must be none, selective or full")
        if self.pma_k and self.pma_every < 1:
            raise ValueError("pma_k needs pma_every >= 1")


@dataclass
class Recipe:
    name: str
    model: dict  # {"preset": name} or official fields, plus optional "init": checkpoint to start from
    text_encoder: str = "minilm"
    autoencoder: str = "identity"
    sampling: dict = field(default_factory=dict)  # stored in the output checkpoint's config
    sample_prompts: list[str] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_recipe(d: dict, where: str = "recipe") -> Recipe:
    d = dict(d)
    stages = []
    for i, s in enumerate(d.pop("stages", [])):
        s = dict(s)
        sw = f"{where}: stage {i} ({s.get('name', '?')})"
        s["data"] = _build(DataConfig, s.get("data", {}), sw + " [data]")
        s["objective"] = _build(ObjectiveConfig, s.get("objective", {}), sw + " [objective]")
        stages.append(_build(StageConfig, s, sw))
    if not stages:
        raise Krea2Error(f"{where}: no [[stages]]; a recipe needs at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise Krea2Error(f"{where}: stage names must be unique, got {names}")
    encoders = d.pop("encoders", {})
    d["text_encoder"] = encoders.get("text", "minilm")
    d["autoencoder"] = encoders.get("autoencoder", "identity")
    d["parallel"] = ParallelConfig.from_dict(d.pop("parallel", {}))
    if "model" not in d:
        raise Krea2Error(f"{where}: missing [model] (preset = NAME or the official architecture fields)")
    return _build(Recipe, {**d, "stages": stages}, where)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe; overrides like `stages.0.steps=20` or `model.preset=tiny-world` patch it first."""
    path = Path(path)
    if not path.is_file():
        raise Krea2Error(f"recipe not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
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
    elif rest:
        _set_path(node.setdefault(head, {}), rest, value, item)
    else:
        node[head] = value
