"""Stage data: a finite pool of captioned images with their frozen text-encoder states cached, and deterministic
batches indexed by step, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from krea2.data.types import CAPTION_KINDS, Example
from krea2.errors import Krea2Error
from krea2.sampling import patchify
from krea2.train.config import DataConfig

CACHE_DTYPE = torch.bfloat16  # frozen text states: half the memory of fp32, far below the model's noise floor


@dataclass
class Batch:
    """One micro-batch; every sample shares the resolution (size buckets)."""

    x0: Tensor  # (B, N, C·p·p) clean latent tokens
    context: Tensor  # (B, Lt, n_layers, dim) text states; dropped captions use the empty prompt's encoding
    txtmask: Tensor  # (B, Lt) bool
    images: Tensor  # (B, 3, H, W) in [-1, 1]: the clean images (iREPA teacher input)
    gh: int
    gw: int


def pool_examples(cfg: DataConfig, seed: int) -> list[Example]:
    """The stage's pool. World/emoji: `pool` examples split over the square sizes of `size`; rows: the exported
    same-bucket batches from the start of the manifest."""
    sizes = cfg.resolutions
    if cfg.source == "world":
        from krea2.data.world import world_examples

        return [ex for k, side in enumerate(sizes) for ex in world_examples(
            cfg.pool // len(sizes), side, seed + k, n_objects=cfg.n_objects, styles=cfg.styles,
            backgrounds=cfg.backgrounds, sizes=cfg.sizes)]
    if cfg.source == "emoji":
        from krea2.data.emoji import emoji_examples

        return [ex for side in sizes for ex in emoji_examples(side, limit=cfg.pool // len(sizes))]
    from krea2.data.curation.rows import TrainingRows

    rows = TrainingRows(cfg.path)
    out: list[Example] = []
    for batch in rows.batches(0):
        out += batch
        if len(out) >= cfg.pool:
            break
    if not out:
        raise Krea2Error(f"no training rows in {cfg.path}; run `krea2 curate export` first")
    return out[: cfg.pool]


class StageData:
    """Images and cached caption encodings of one stage; `batch(step)` is a pure function of (seed, step)."""

    def __init__(self, cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int,
                 cache_dir: str | Path | None = None, progress: bool = True):
        self.cfg, self.seed, self.ae, self.patch = cfg, seed, autoencoder, patch
        examples = pool_examples(cfg, seed)
        # size buckets: every batch is drawn from one image shape (resolution/aspect), picked per step
        shapes = sorted({ex.image.shape for ex in examples})
        self.buckets = [torch.tensor([i for i, ex in enumerate(examples) if ex.image.shape == sh]) for sh in shapes]
        self.bucket_p = np.array([len(b) for b in self.buckets], dtype=np.float64) / len(examples)
        self.images = [torch.from_numpy(np.stack([examples[i].image for i in b.tolist()])) for b in self.buckets]
        self.kinds = [k for k in CAPTION_KINDS if cfg.captions.get(k, 0) > 0]
        weights = np.array([cfg.captions[k] for k in self.kinds], dtype=np.float64)
        self.kind_p = weights / weights.sum()
        # caption of kind k for example i; a source lacking a kind falls back to the longest it has
        self.captions = [[ex.captions.get(k) or next(ex.captions[c] for c in CAPTION_KINDS if ex.captions.get(c))
                          for k in self.kinds] for ex in examples]
        self.rows, self.empty = self._encode(text_encoder, cache_dir, progress)
        self.latents = self._latents(progress)

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def _encode(self, encoder, cache_dir, progress) -> tuple[list[Tensor], Tensor]:
        """Valid rows of every distinct caption (plus ""), encoded once and cached in one file per pool."""
        texts = sorted({c for caps in self.captions for c in caps} | {""})
        key = hashlib.sha256(json.dumps([getattr(encoder, "identity", type(encoder).__name__), texts]).encode())
        file = Path(cache_dir) / f"text-{key.hexdigest()[:16]}.safetensors" if cache_dir else None
        if file is not None and file.is_file():
            packed = load_file(file)
            flat, lengths = packed["rows"], packed["lengths"].tolist()
        else:
            chunks, lengths = [], []
            bar = tqdm(total=len(texts), desc="encoding captions", unit="cap", disable=not progress)
            for start in range(0, len(texts), 128):
                part = texts[start:start + 128]
                with torch.no_grad():
                    states, mask = encoder.encode(part)
                for s, m in zip(states, mask):
                    chunks.append(s[m].to("cpu", CACHE_DTYPE))
                    lengths.append(int(m.sum()))
                bar.update(len(part))
            bar.close()
            flat = torch.cat(chunks)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(".tmp")
                save_file({"rows": flat, "lengths": torch.tensor(lengths)}, str(tmp))
                tmp.replace(file)
        by_text = dict(zip(texts, torch.split(flat, lengths)))
        rows = [by_text[c] for caps in self.captions for c in caps]  # flat index i * n_kinds + k
        return rows, by_text[""]

    def _latents(self, progress) -> list[Tensor]:
        """Posterior means of the whole pool, encoded once per bucket: the autoencoder is frozen."""
        out = []
        for b in range(len(self.buckets)):
            chunks = [self.ae.encode(self.pixels(b, torch.arange(i, min(i + 256, len(self.images[b])))))
                      for i in tqdm(range(0, len(self.images[b]), 256), desc="encoding latents", leave=False,
                                    disable=not progress)]
            out.append(torch.cat(chunks))
        return out

    def pixels(self, bucket: int, local: Tensor) -> Tensor:
        return self.images[bucket][local].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def indices(self, step: int, batch_size: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        bucket = int(rng.choice(len(self.buckets), p=self.bucket_p))
        local = rng.integers(len(self.buckets[bucket]), size=batch_size)
        kind = rng.choice(len(self.kinds), size=batch_size, p=self.kind_p)
        drop = rng.random(batch_size) < self.cfg.caption_dropout
        return bucket, local, kind, drop

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, device="cpu") -> Batch:
        """The global batch of `step`, of which this rank takes its disjoint slice."""
        if batch_size % world:
            raise Krea2Error(f"batch_size {batch_size} must be divisible by the data-parallel size {world}")
        bucket, local, kind, drop = self.indices(step, batch_size)
        part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        local, kind, drop = torch.from_numpy(local[part]), kind[part], drop[part]
        idx = self.buckets[bucket][local].tolist()
        rows = [self.empty if d else self.rows[i * len(self.kinds) + k] for i, k, d in zip(idx, kind, drop)]
        length = -(-max(len(r) for r in rows) // 8) * 8  # per-batch padding in steps of 8: few distinct shapes
        context = torch.zeros(len(rows), length, *rows[0].shape[1:], dtype=torch.float32)
        txtmask = torch.zeros(len(rows), length, dtype=torch.bool)
        for b, r in enumerate(rows):
            context[b, :len(r)] = r.float()
            txtmask[b, :len(r)] = True
        images, latent = self.pixels(bucket, local).to(device), self.latents[bucket][local].to(device)
        gh, gw = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        return Batch(patchify(latent, self.patch), context.to(device), txtmask.to(device), images, gh, gw)
