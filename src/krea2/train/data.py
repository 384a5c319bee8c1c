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
    if cfg.source == "world":
        from krea2.data.world import world_examples

        return list(world_examples(cfg.pool, cfg.size, seed, n_objects=cfg.n_objects, styles=cfg.styles,
                                   backgrounds=cfg.backgrounds, sizes=cfg.sizes))
    if cfg.source == "emoji":
        from krea2.data.emoji import emoji_examples

        return list(emoji_examples(cfg.size, limit=cfg.pool))
    from krea2.data.curation.rows import TrainingRows

    rows = TrainingRows(cfg.path)
    out: list[Example] = []
    for batch in rows.batches(0):
        out += batch
        if len(out) >= cfg.pool:
            break
    if not out:
        raise Krea2Error(f"no training rows in {cfg.path}; run `krea2 curate export` first")
    sizes = {ex.image.shape for ex in out}
    if len(sizes) > 1:  # one bucket per pool keeps every batch same-shaped; export one bucket per stage
        raise Krea2Error(f"{cfg.path} holds several buckets {sorted(sizes)}; export one bucket for this stage")
    return out[: cfg.pool]


class StageData:
    """Images and cached caption encodings of one stage; `batch(step)` is a pure function of (seed, step)."""

    def __init__(self, cfg: DataConfig, seed: int, text_encoder, autoencoder, patch: int,
                 cache_dir: str | Path | None = None, progress: bool = True):
        self.cfg, self.seed, self.ae, self.patch = cfg, seed, autoencoder, patch
        examples = pool_examples(cfg, seed)
        self.images = torch.from_numpy(np.stack([ex.image for ex in examples]))  # (P, H, W, 3) uint8
        self.kinds = [k for k in CAPTION_KINDS if cfg.captions.get(k, 0) > 0]
        weights = np.array([cfg.captions[k] for k in self.kinds], dtype=np.float64)
        self.kind_p = weights / weights.sum()
        # caption of kind k for example i; a source lacking a kind falls back to the longest it has
        self.captions = [[ex.captions.get(k) or next(ex.captions[c] for c in CAPTION_KINDS if ex.captions.get(c))
                          for k in self.kinds] for ex in examples]
        self.rows, self.empty = self._encode(text_encoder, cache_dir, progress)
        self.latents = self._latents(progress)

    def __len__(self) -> int:
        return len(self.images)

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

    def _latents(self, progress) -> Tensor:
        """Posterior means of the whole pool, encoded once: the autoencoder is frozen."""
        out = []
        for start in tqdm(range(0, len(self.images), 256), desc="encoding latents", disable=not progress,
                          leave=False):
            with torch.no_grad():
                out.append(self.ae.encode(self.pixels(torch.arange(start, min(start + 256, len(self.images))))))
        return torch.cat(out)

    def pixels(self, idx: Tensor) -> Tensor:
        return self.images[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def indices(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(len(self), size=batch_size)
        kind = rng.choice(len(self.kinds), size=batch_size, p=self.kind_p)
        drop = rng.random(batch_size) < self.cfg.caption_dropout
        return idx, kind, drop

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, device="cpu") -> Batch:
        """The global batch of `step`, of which this rank takes its disjoint slice."""
        if batch_size % world:
            raise Krea2Error(f"batch_size {batch_size} must be divisible by the data-parallel size {world}")
        idx, kind, drop = self.indices(step, batch_size)
        part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        idx, kind, drop = idx[part], kind[part], drop[part]
        rows = [self.empty if d else self.rows[i * len(self.kinds) + k] for i, k, d in zip(idx, kind, drop)]
        length = -(-max(len(r) for r in rows) // 8) * 8  # per-batch padding in steps of 8: few distinct shapes
        context = torch.zeros(len(rows), length, *rows[0].shape[1:], dtype=torch.float32)
        txtmask = torch.zeros(len(rows), length, dtype=torch.bool)
        for b, r in enumerate(rows):
            context[b, :len(r)] = r.float()
            txtmask[b, :len(r)] = True
        idx = torch.from_numpy(idx)
        images, latent = self.pixels(idx).to(device), self.latents[idx].to(device)
        gh, gw = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        return Batch(patchify(latent, self.patch), context.to(device), txtmask.to(device), images, gh, gw)
