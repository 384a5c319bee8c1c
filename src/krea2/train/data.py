"""Stage data: sources and the batch types objectives read.

Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run
would have seen, and each data-parallel rank takes a disjoint slice of the step's global batch.

Sources (`[stages.data] source = ...`):
- world / emoji: a pool of rendered images with their frozen text states and latents cached (`ImagePool`);
- rows: Parquet rows exported by `krea2 curate export`, streamed one row group per step (`RowStream`): nothing is
  held beyond the current batch, so a pool of 10^9 rows trains the same way as one of 10^3;
- pairs: (caption, winner, loser) Parquet files for preference optimisation (`write_pairs` / `ImagePool`);
- prompts: records without images for rollouts (world prompts, or a JSONL prompt file like `krea2 eval world`'s);
- triplets: (target, reference, caption) for style references: world scenes whose reference is another scene of the
  same style and background with other objects (same style, different content).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from krea2.data.types import CAPTION_KINDS, Example
from krea2.errors import Krea2Error
from krea2.models.text_encoders import encode_valid_rows, pad_rows
from krea2.sampling import patchify

CACHE_DTYPE = torch.bfloat16  # frozen text states: half the memory of fp32, far below the model's noise floor
DATA_KINDS = {"world": "images", "emoji": "images", "rows": "images", "pairs": "pairs", "prompts": "prompts",
              "triplets": "triplets", "style_pairs": "style_pairs"}  # source -> batch kind
SOURCES = tuple(DATA_KINDS)
TEXT_PAD = 8  # text padded per batch in steps of 8 slots: few distinct shapes


@dataclass
class DataConfig:
    source: str = "world"  # see SOURCES
    size: int | list[int] = 32  # square side(s) for world/emoji/prompts: a list makes one size bucket each
    pool: int = 4096  # world/emoji/prompts: scenes in the pool; pairs: at most this many pairs
    n_objects: tuple[int, int] = (1, 4)
    n_objects_weights: list[float] | None = None  # relative weight of each count in n_objects (None = uniform)
    styles: list[str] | None = None
    backgrounds: list[str] | None = None
    sizes: list[str] | None = None  # object sizes, e.g. ["large"] for an early curriculum
    tags: list[str] | None = None  # world: scenes of these prompt families only (an SFT domain), checker-verified
    shapes: list[str] | None = None  # world: object shapes and colours to draw from (a concept for a LoRA)
    colors: list[str] | None = None
    rename: dict[str, str] | None = None  # world/emoji: caption phrase -> new words (bind a new word to a concept)
    path: str = ""  # rows: exported Parquet folder; (style_)pairs: Parquet file or folder; prompts: JSONL (optional)
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
        if self.n_objects_weights is not None:
            lo, hi = self.n_objects
            w = self.n_objects_weights
            if len(w) != hi - lo + 1 or not all(math.isfinite(v) and v >= 0 for v in w) or not sum(w) > 0:
                raise ValueError(f"n_objects_weights {w} must give one finite, non-negative weight per count "
                                 f"{lo}..{hi} with a positive sum")
            if self.tags or self.source not in ("world", "triplets"):
                raise ValueError("n_objects_weights applies to world and triplets pools without tags (tags choose "
                                 "their own scenes); remove it")
        if self.source not in SOURCES:
            raise ValueError(f"data source {self.source!r} unknown; choose one of {list(SOURCES)}")
        if self.source in {"rows", "pairs", "style_pairs"} and not self.path:
            raise ValueError(f"data source {self.source} needs path = the Parquet file or folder")
        if not self.resolutions or any(not isinstance(r, int) or r < 1 for r in self.resolutions):
            raise ValueError(f"size must be a positive integer or a list of them, got {self.size!r}")
        if self.tags is not None:
            from krea2.data.world import TAGS

            unknown = sorted(set(self.tags) - set(TAGS))
            if unknown or not self.tags or self.source != "world":
                raise ValueError(f"tags {unknown or self.tags} must be a non-empty list of {list(TAGS)} for source "
                                 "world")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("caption_dropout must be in [0, 1)")
        if any(k not in CAPTION_KINDS for k in self.captions) or not sum(self.captions.values()) > 0:
            raise ValueError("captions weights must use long/medium/short with a positive sum")


# ---------------------------------------------------------------- batch types


@dataclass
class Batch:
    """One micro-batch of captioned images; every sample shares the resolution (size buckets)."""

    x0: Tensor  # (B, N, C·p·p) clean latent tokens
    context: Tensor  # (B, Lt, n_layers, dim) text states; dropped captions use the empty prompt's encoding
    txtmask: Tensor  # (B, Lt) bool
    images: Tensor  # (B, 3, H, W) in [-1, 1]: the clean images (iREPA teacher input)
    gh: int
    gw: int

    @property
    def size(self) -> int:
        return self.x0.shape[0]


@dataclass
class PairBatch:
    """Preference pairs: a winner and a loser image for one caption (Diffusion-DPO, STPO)."""

    x0_w: Tensor  # (B, N, C·p·p) winner latent tokens
    x0_l: Tensor  # (B, N, C·p·p) loser latent tokens
    context: Tensor  # (B, Lt, n_layers, dim)
    txtmask: Tensor  # (B, Lt)
    images_w: Tensor  # (B, 3, H, W) in [-1, 1]
    images_l: Tensor
    gh: int
    gw: int

    @property
    def size(self) -> int:
        return self.x0_w.shape[0]


@dataclass
class StylePairBatch(PairBatch):
    """Preference pairs sampled with a style reference: winner and loser share the caption and the reference."""

    images_ref: Tensor  # (B, 3, H, W) in [-1, 1]: the reference image both were drawn with


@dataclass
class PromptBatch:
    """Prompts without images, for rollouts: the policy samples, a reward scores (GRPO, TDM)."""

    context: Tensor  # (B, Lt, n_layers, dim)
    txtmask: Tensor  # (B, Lt)
    prompts: list[str]
    records: list[dict]  # what rewards check (world scene records), one per prompt
    indices: list[int]  # each prompt's index in the pool (per-prompt statistics)
    gh: int  # the token grid to sample
    gw: int
    height: int  # pixels
    width: int

    @property
    def size(self) -> int:
        return self.context.shape[0]


@dataclass
class TripletBatch:
    """Style-reference training: the target, a reference sharing its style but not its content, the caption."""

    x0: Tensor  # (B, N, C·p·p) target latent tokens
    x0_ref: Tensor  # (B, N, C·p·p) reference latent tokens
    context: Tensor  # (B, Lt, n_layers, dim)
    txtmask: Tensor  # (B, Lt)
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    images_ref: Tensor
    gh: int
    gw: int
    # the caption with the style and background in words (world triplets' STYLED), encoded; None where absent
    context_styled: Tensor | None = None  # (B, Ls, n_layers, dim)
    txtmask_styled: Tensor | None = None  # (B, Ls)

    @property
    def size(self) -> int:
        return self.x0.shape[0]


def token_count(batch) -> tuple[int, int]:
    """(image tokens, text slots) per sample of any batch type, for throughput and FLOP accounting."""
    return batch.gh * batch.gw, batch.context.shape[1]


# ---------------------------------------------------------------- shared pieces


class CaptionSampler:
    """Which caption kind each sample uses and which captions are dropped, drawn from numpy's (seed, step) RNG."""

    def __init__(self, cfg: DataConfig):
        self.kinds = [k for k in CAPTION_KINDS if cfg.captions.get(k, 0) > 0]
        weights = np.array([cfg.captions[k] for k in self.kinds], dtype=np.float64)
        self.p, self.dropout = weights / weights.sum(), cfg.caption_dropout

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.choice(len(self.kinds), size=n, p=self.p), rng.random(n) < self.dropout

    def pick(self, captions: dict[str, str], kind: int) -> str:
        """Caption of the drawn kind; a source lacking it falls back to the longest it has."""
        return captions.get(self.kinds[kind]) or next(captions[c] for c in CAPTION_KINDS if captions.get(c))


def encode_texts(encoder, texts: list[str], cache_dir: str | Path | None, progress: bool) -> dict[str, Tensor]:
    """Valid text rows of every distinct text (plus ""), encoded once; cached in one file per set of texts."""
    texts = sorted(set(texts) | {""})
    key = hashlib.sha256(json.dumps([getattr(encoder, "identity", type(encoder).__name__), texts]).encode())
    file = Path(cache_dir) / f"text-{key.hexdigest()[:16]}.safetensors" if cache_dir else None
    if file is not None and file.is_file():
        packed = load_file(file)
        return dict(zip(texts, torch.split(packed["rows"], packed["lengths"].tolist())))
    bar = tqdm(total=len(texts), desc="encoding captions", unit="cap", disable=not progress)
    rows = encode_valid_rows(encoder, texts, dtype=CACHE_DTYPE, progress=bar.update)
    bar.close()
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({"rows": torch.cat(rows), "lengths": torch.tensor([len(r) for r in rows])}, str(tmp))
        tmp.replace(file)
    return dict(zip(texts, rows))


def rank_part(n: int, rank: int, world: int) -> slice:
    if n % world:
        raise Krea2Error(f"batch_size {n} must be divisible by the data-parallel size {world}")
    return slice(rank * n // world, (rank + 1) * n // world)


def to_pixels(images: Tensor) -> Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [-1, 1]."""
    return images.movedim(-1, -3).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------- pools: world, emoji, pairs


def renamed(ex: Example, rename: dict[str, str] | None) -> Example:
    """The example with each caption's phrases replaced (longest first), e.g. {"red circle": "zorb"}."""
    if not rename:
        return ex
    caps = dict(ex.captions)
    for old in sorted(rename, key=len, reverse=True):
        caps = {k: v.replace(old, rename[old]) for k, v in caps.items()}
    return Example(ex.image, caps, ex.meta)


def pool_examples(cfg: DataConfig, seed: int) -> list[Example]:
    """The stage's pool. World/emoji: `pool` examples split over the square sizes of `size`; pairs: the file's
    pairs (the loser image in meta["loser"])."""
    sizes = cfg.resolutions
    if cfg.source == "world" and cfg.tags:
        return [ex for k, side in enumerate(sizes) for ex in domain_examples(cfg.pool // len(sizes), side, seed + k,
                                                                            cfg.tags)]
    if cfg.source == "world":
        from krea2.data.world import world_examples

        return [renamed(ex, cfg.rename) for k, side in enumerate(sizes) for ex in world_examples(
            cfg.pool // len(sizes), side, seed + k, n_objects=cfg.n_objects, n_weights=cfg.n_objects_weights,
            styles=cfg.styles, backgrounds=cfg.backgrounds, sizes=cfg.sizes, shapes=cfg.shapes, colors=cfg.colors)]
    if cfg.source == "emoji":
        from krea2.data.emoji import emoji_examples

        return [ex for side in sizes for ex in emoji_examples(side, limit=cfg.pool // len(sizes))]
    if cfg.source in ("pairs", "style_pairs"):
        examples = read_pairs(cfg.path)[: cfg.pool]
        if cfg.source == "style_pairs" and not all("reference" in ex.meta for ex in examples):
            raise Krea2Error(f"{cfg.path} holds pairs without reference images; sample style pairs with "
                             "`krea2 pairs --kind style --style-encoder DIR`")
        return examples
    if cfg.source == "triplets":
        return [ex for k, side in enumerate(sizes) for ex in world_triplets(
            cfg.pool // len(sizes), side, seed + k, n_objects=cfg.n_objects, n_weights=cfg.n_objects_weights,
            styles=cfg.styles,
            backgrounds=cfg.backgrounds, sizes=cfg.sizes)]
    raise Krea2Error(f"data source {cfg.source!r} is not a pool")


def domain_examples(n: int, size: int, seed: int, tags: list[str]) -> list[Example]:
    """n world renders of scenes suited to the prompt families `tags` (in turn), each kept only if the exact checker
    passes it for its family's prompt (a curated SFT set: counting, relations, styles, ...). Captions: the long
    caption (every attribute) and, as "short", the family's prompt for the scene."""
    from krea2.data.world import captions, render, sample_scene_for_tag, scene_to_prompt_record, scene_to_record
    from krea2.eval import checker

    rng = np.random.default_rng([seed, 2])
    out: list[Example] = []
    while len(out) < n:
        tag = tags[len(out) % len(tags)]
        scene = sample_scene_for_tag(rng, tag)
        record = scene_to_prompt_record(scene, tag, rng)
        image = render(scene, size, int(rng.integers(2**31)))
        if checker.matches(checker.detect(image), record):
            caps = captions(scene, rng)
            out.append(Example(image, {"long": caps["long"], "medium": caps["medium"], "short": record["prompt"]},
                               {"scene": scene_to_record(scene), "tag": tag, "record": record}))
    return out


STYLED = "styled"  # a triplet's caption naming what the reference carries (style, background), for a teacher


def world_triplets(n: int, size: int, seed: int, **sample_kwargs) -> list[Example]:
    """World targets, each with a reference (meta["reference"]) rendered from another scene of the same style and
    background: the style is shared, the objects (shapes, colours, places) are drawn anew. captions[STYLED] is the
    short caption with the style and background in words ("... on a gray background in striped style")."""
    from krea2.data.world import render, sample_scene, scene_to_record, world_examples

    rng = np.random.default_rng([seed, 1])
    out = []
    for ex in world_examples(n, size, seed, **sample_kwargs):
        scene = ex.meta["scene"]
        kw = {**sample_kwargs, "styles": [scene["style"]], "backgrounds": [scene["background"]]}
        ref = sample_scene(rng, **kw)
        # the short caption with the reference's share said in words: what a style stage's teacher reads
        styled = f"{ex.captions['short']} on a {scene['background']} background in {scene['style']} style"
        out.append(Example(ex.image, {**ex.captions, STYLED: styled},
                           {**ex.meta, "reference": render(ref, size, int(rng.integers(2**31))),
                            "reference_scene": scene_to_record(ref)}))
    return out


class ImagePool:
    """Images (or winner/loser pairs, or target/reference triplets) of one stage with cached caption encodings
    and latents; `batch(step)` is a pure function of (seed, step)."""

    def __init__(self, cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int,
                 cache_dir: str | Path | None = None, progress: bool = True, styled: bool = False):
        self.cfg, self.seed, self.ae, self.patch = cfg, seed, autoencoder, patch
        examples = pool_examples(cfg, seed)
        if not examples:
            raise Krea2Error(f"data source {cfg.source} gave no examples")
        others = {"pairs": ["loser"], "triplets": ["reference"], "style_pairs": ["loser", "reference"]}.get(
            cfg.source, [])
        # size buckets: every batch is drawn from one image shape (resolution/aspect), picked per step
        shapes = sorted({ex.image.shape for ex in examples})
        unit = autoencoder.compression * patch
        bad = sorted({f"{h}x{w}" for h, w, _ in shapes if h % unit or w % unit})
        if bad:
            raise Krea2Error(f"data source {cfg.source}: image size(s) {bad} are not multiples of the token size "
                             f"{unit} px; resize or crop them")
        self.native = max(max(h, w) for h, w, _ in shapes)  # the side the stage's output is sampled at
        self.buckets = [torch.tensor([i for i, ex in enumerate(examples) if ex.image.shape == sh]) for sh in shapes]
        self.bucket_p = np.array([len(b) for b in self.buckets], dtype=np.float64) / len(examples)
        for ex in examples:
            for k in others:
                if ex.meta[k].shape != ex.image.shape:
                    raise Krea2Error(f"data source {cfg.source}: an example's {k} image is {ex.meta[k].shape[:2]}, "
                                     f"its image {ex.image.shape[:2]}; write them at one size")

        def views(ex):
            return [ex.image] + [ex.meta[k] for k in others]

        # (n, views, H, W, 3) uint8 per bucket
        self.images = [torch.from_numpy(np.stack([np.stack(views(examples[i])) for i in b.tolist()]))
                       for b in self.buckets]
        self.sampler = CaptionSampler(cfg)
        self.captions = [[self.sampler.pick(ex.captions, k) for k in range(len(self.sampler.kinds))]
                         for ex in examples]
        # styled: triplets also carry their STYLED captions (a style stage's teacher reads them; None where absent)
        self.styled = [ex.captions.get(STYLED) for ex in examples] if styled and cfg.source == "triplets" else []
        texts = [c for caps in self.captions for c in caps] + [c for c in self.styled if c]
        self.text = encode_texts(text_encoder, texts, cache_dir, progress)
        self.latents = self._latents(progress)

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def _latents(self, progress) -> list[Tensor]:
        """Posterior means of the whole pool, encoded once per bucket and view: the autoencoder is frozen."""
        out = []
        for images in self.images:
            n, v = images.shape[:2]
            flat = images.flatten(0, 1)
            chunks = [self.ae.encode(to_pixels(flat[i:i + 256]))
                      for i in tqdm(range(0, len(flat), 256), desc="encoding latents", leave=False,
                                    disable=not progress)]
            lat = torch.cat(chunks)
            out.append(lat.view(n, v, *lat.shape[1:]))
        return out

    def indices(self, step: int, batch_size: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        bucket = int(rng.choice(len(self.buckets), p=self.bucket_p))
        local = rng.integers(len(self.buckets[bucket]), size=batch_size)
        kind, drop = self.sampler.draw(rng, batch_size)
        return bucket, local, kind, drop

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1,
              device="cpu") -> Batch | PairBatch | TripletBatch | StylePairBatch:
        """The global batch of `step`, of which this rank takes its disjoint slice."""
        part = rank_part(batch_size, rank, world)
        bucket, local, kind, drop = self.indices(step, batch_size)
        local, kind, drop = torch.from_numpy(local[part]), kind[part], drop[part]
        idx = self.buckets[bucket][local].tolist()
        rows = [self.text[""] if d else self.text[self.captions[i][k]] for i, k, d in zip(idx, kind, drop)]
        context, txtmask = pad_rows(rows, multiple=TEXT_PAD, dtype=torch.float32)
        images = to_pixels(self.images[bucket][local]).to(device)
        latent = self.latents[bucket][local].to(device)
        gh, gw = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        context, txtmask = context.to(device), txtmask.to(device)
        if self.cfg.source in ("pairs", "triplets", "style_pairs"):
            cls = {"pairs": PairBatch, "triplets": TripletBatch, "style_pairs": StylePairBatch}[self.cfg.source]
            extra = (images[:, 2],) if self.cfg.source == "style_pairs" else ()
            if self.styled and all(self.styled[i] for i in idx):
                styled, styled_mask = pad_rows([self.text[self.styled[i]] for i in idx], multiple=TEXT_PAD,
                                               dtype=torch.float32)
                extra = (styled.to(device), styled_mask.to(device))
            return cls(patchify(latent[:, 0], self.patch), patchify(latent[:, 1], self.patch), context, txtmask,
                       images[:, 0], images[:, 1], gh, gw, *extra)
        return Batch(patchify(latent[:, 0], self.patch), context, txtmask, images[:, 0], gh, gw)


# ---------------------------------------------------------------- rows: streamed from the curation export


class RowStream:
    """Curation's exported rows, one row group per step (wrapping for later epochs), encoded as they are read.

    Nothing is materialised: step s reads row group s mod n, takes its first `batch_size` rows (the export writes
    same-bucket row groups), and this rank encodes only its slice. Caption kind and dropout come from the
    (seed, step) RNG like the pools', so resume is exact.
    """

    def __init__(self, cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int, **_):
        from krea2.data.curation.rows import TrainingRows

        self.cfg, self.seed, self.te, self.ae, self.patch = cfg, seed, text_encoder, autoencoder, patch
        self.rows = TrainingRows(cfg.path)
        if len(self.rows) == 0:
            raise Krea2Error(f"no training rows in {cfg.path}; run `krea2 curate export` first")
        self.sampler = CaptionSampler(cfg)
        self.empty = encode_valid_rows(text_encoder, [""])[0]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, device="cpu") -> Batch:
        part = rank_part(batch_size, rank, world)
        examples = self.rows.batch(step)
        if len(examples) < batch_size:
            raise Krea2Error(f"row group of step {step} in {self.cfg.path} holds {len(examples)} rows, fewer than "
                             f"batch_size {batch_size}; export with --batch-size >= {batch_size}")
        kind, drop = self.sampler.draw(np.random.default_rng([self.seed, step]), batch_size)
        mine = examples[:batch_size][part]
        texts = [self.sampler.pick(ex.captions, k) for ex, k in zip(mine, kind[part])]
        encoded = iter(encode_valid_rows(self.te, [t for t, d in zip(texts, drop[part]) if not d]))
        rows = [self.empty if d else next(encoded) for d in drop[part]]
        context, txtmask = pad_rows(rows, multiple=TEXT_PAD, dtype=torch.float32)
        images = to_pixels(torch.from_numpy(np.stack([ex.image for ex in mine])))
        with torch.no_grad():
            latent = self.ae.encode(images)
        gh, gw = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        return Batch(patchify(latent, self.patch).to(device), context.to(device), txtmask.to(device),
                     images.to(device), gh, gw)


# ---------------------------------------------------------------- pairs: a Parquet file format


def write_pairs(path: str | Path, captions: list[str], winners: list[np.ndarray], losers: list[np.ndarray],
                metas: list[dict] | None = None, references: list[np.ndarray] | None = None) -> Path:
    """Write preference pairs as one Parquet file (PNG bytes, caption, meta JSON); atomic (temp file + rename).

    winners/losers: (H, W, 3) uint8, a winner and its loser of the same shape; references (optional, the same
    shape): the style reference each pair was sampled with (a `style_pairs` data source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    if not len(captions) == len(winners) == len(losers):
        raise Krea2Error("write_pairs needs as many winners and losers as captions")

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
        return buf.getvalue()

    for w, lo in zip(winners, losers):
        if w.shape != lo.shape:
            raise Krea2Error(f"a pair's images differ in shape: {w.shape} vs {lo.shape}")
    columns = {"caption": captions, "winner": [png(w) for w in winners], "loser": [png(x) for x in losers],
               "meta": [json.dumps(m) for m in (metas or [{}] * len(captions))]}
    if references is not None:
        if len(references) != len(captions):
            raise Krea2Error("write_pairs needs one reference per pair")
        if any(r.shape != w.shape for r, w in zip(references, winners)):
            raise Krea2Error("a pair's reference differs in shape from its winner; render references at the "
                             "pairs' size")
        columns["reference"] = [png(r) for r in references]
    table = pa.table(columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_pairs(path: str | Path) -> list[Example]:
    """Pairs from a Parquet file or every *.parquet of a folder, as Examples: winner in `image`, loser in
    meta["loser"] (and the style reference, where the file has one, in meta["reference"]), the caption as every
    caption kind."""
    import pyarrow.parquet as pq
    from PIL import Image

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise Krea2Error(f"no pairs at {path}: make them with `krea2 pairs` (or krea2.train.data.write_pairs)")
    out = []
    for f in files:
        try:
            rows = pq.read_table(f).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise Krea2Error(f"{f} is not a readable pairs file ({str(e).splitlines()[0][:120]}); make it again "
                             "with `krea2 pairs`") from None
        for r in rows:
            def rgb(b):
                return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
            meta = {**json.loads(r["meta"] or "{}"), "loser": rgb(r["loser"])}
            if r.get("reference") is not None:
                meta["reference"] = rgb(r["reference"])
            out.append(Example(rgb(r["winner"]), dict.fromkeys(CAPTION_KINDS, r["caption"]), meta))
    return out


# ---------------------------------------------------------------- prompts: records without images


PROMPT_SEED = 1_000_003  # training prompts: seeds far from the eval prompt files' (0, 1, ...)


class PromptPool:
    """Prompts and their checkable records: world prompts of every eval family (single object, counting, colours,
    position, ...), or the records of a JSONL prompt file (`{"prompt": ..., "objects": [...]}` as `krea2 eval
    world` reads)."""

    def __init__(self, cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int,
                 cache_dir: str | Path | None = None, progress: bool = True, **_):
        self.cfg, self.seed = cfg, seed
        self.pixels_per_token = autoencoder.compression * patch
        if cfg.path:  # the eval's own reader: one-line errors naming the file and line
            from krea2.eval.checker import load_prompts

            self.records = load_prompts(cfg.path)[: cfg.pool]
        else:  # every tag of the eval families, from a seed range the shipped eval prompts do not use
            from krea2.data.world import TAGS, make_eval_prompts

            self.records = make_eval_prompts(-(-cfg.pool // len(TAGS)), seed=PROMPT_SEED + seed)[: cfg.pool]
        if not self.records or any("prompt" not in r for r in self.records):
            raise Krea2Error("prompt records need a 'prompt' field each, and at least one record")
        for side in cfg.resolutions:
            if side % self.pixels_per_token:
                raise Krea2Error(f"size {side} is not a multiple of the token size {self.pixels_per_token} px")
        self.text = encode_texts(text_encoder, [r["prompt"] for r in self.records], cache_dir, progress)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, device="cpu",
              weights: Tensor | None = None) -> PromptBatch:
        """The global batch of `step` (this rank's slice); `weights` (pool,) >= 0 bias which prompts are drawn."""
        part = rank_part(batch_size, rank, world)
        rng = np.random.default_rng([self.seed, step])
        side = int(rng.choice(self.cfg.resolutions))
        if weights is None:
            idx = rng.integers(len(self.records), size=batch_size)[part].tolist()
        else:
            p = weights.double().cpu().numpy()
            idx = rng.choice(len(self.records), size=batch_size, p=p / p.sum())[part].tolist()
        records = [self.records[i] for i in idx]
        context, txtmask = pad_rows([self.text[r["prompt"]] for r in records], multiple=TEXT_PAD,
                                    dtype=torch.float32)
        g = side // self.pixels_per_token
        return PromptBatch(context.to(device), txtmask.to(device), [r["prompt"] for r in records], records, idx, g,
                           g, side, side)


def build_data(cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int, cache_dir=None,
               progress: bool = True, **options):
    """The stage's data source: an object with `batch(step, batch_size, rank, world, device)` and `len()`.
    options: what the objective asks of it (`Objective.data_options`; `styled=True`: triplets with STYLED captions)."""
    cls = {"rows": RowStream, "prompts": PromptPool}.get(cfg.source, ImagePool)
    return cls(cfg, seed, text_encoder, autoencoder, patch, cache_dir=cache_dir, progress=progress, **options)
