"""Dedup grouping: exact duplicates by md5, near-duplicates by 12x12 phash AND colour grid; one representative each.

A row joins the cluster of the first representative it matches, or becomes a representative itself. Workers run
this step under a named lock (see JobSpec.lock), so two near-duplicates processed at once cannot both stay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

from krea2.data.curation.store import Store


@dataclass
class DedupConfig:
    """Hamming thresholds (bits), tuned on the emoji set with injected near-duplicates (tests/test_curation_dedup)."""

    max_phash_dist: int = 26  # of 144 bits
    max_color_dist: int = 18  # largest difference of one channel of one 4x4 grid cell, 0..255

    @classmethod
    def from_options(cls, options: dict) -> DedupConfig:
        return cls(**{f.name: int(options[f.name]) for f in fields(cls) if f.name in options})


def hex_bits(h: str) -> np.ndarray:
    bits = bin(int(h, 16))[2:].zfill(len(h) * 4)  # imagehash's colour hash hex can have an odd length
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def color_grid(h: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(h), dtype=np.uint8).astype(np.int16)


@dataclass
class Match:
    rep: int
    exact: bool
    phash_dist: int
    color_dist: int


class HashIndex:
    """Representatives in memory; brute-force Hamming in numpy (fine to ~1e6 rows per shard; beyond that, bucket by
    hash chunks: two hashes within d bits share at least one of d+1 chunks exactly)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.ids: list[int] = []
        self.md5: dict[str, int] = {}
        self._ph: list[np.ndarray] = []
        self._ch: list[np.ndarray] = []
        self._mats: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, rid: int, md5: str | None, phash: str, colorhash: str) -> None:
        self.ids.append(rid)
        if md5:
            self.md5.setdefault(md5, rid)
        self._ph.append(hex_bits(phash))
        self._ch.append(color_grid(colorhash))
        self._mats = None

    def match(self, md5: str | None, phash: str, colorhash: str) -> Match | None:
        if md5 and md5 in self.md5:
            return Match(self.md5[md5], True, 0, 0)
        if not self.ids:
            return None
        if self._mats is None:
            self._mats = (np.stack(self._ph), np.stack(self._ch))
        ph, ch = self._mats
        dp = (ph != hex_bits(phash)).sum(axis=1)
        dc = np.abs(ch - color_grid(colorhash)).max(axis=1)
        hit = np.flatnonzero((dp <= self.cfg.max_phash_dist) & (dc <= self.cfg.max_color_dist))
        if hit.size == 0:
            return None
        best = hit[np.argmin(dp[hit] + dc[hit])]
        return Match(self.ids[best], False, int(dp[best]), int(dc[best]))


def load_index(store: Store, cfg: DedupConfig) -> HashIndex:
    index = HashIndex(cfg)
    for r in store.execute("SELECT id, md5, hash FROM images WHERE dedup_ok = 1 ORDER BY id"):
        h = json.loads(r["hash"])
        index.add(r["id"], r["md5"], h["phash"], h["colorhash"])
    return index


def make_dedup_processor(options: dict):
    cfg = DedupConfig.from_options(options)

    def process(rows: list[dict], store: Store):
        index = load_index(store, cfg)  # under the dedup lock: no one else adds representatives meanwhile
        out = []
        for row in rows:
            h = json.loads(row["hash"])
            m = index.match(row["md5"], h["phash"], h["colorhash"])
            if m is None:
                index.add(row["id"], row["md5"], h["phash"], h["colorhash"])
                out.append((row["id"], True, {"cluster": row["id"]}, None))
            else:
                out.append((row["id"], False, {"cluster": m.rep, "exact": m.exact, "phash_dist": m.phash_dist,
                                               "color_dist": m.color_dist}, None))
        return out

    return process


def group_offline(items: list[tuple[int, str | None, str, str]], cfg: DedupConfig) -> dict[int, int]:
    """id -> representative id for (id, md5, phash, colorhash) items, in order: the same rule as the job."""
    index, out = HashIndex(cfg), {}
    for rid, md5, ph, ch in items:
        m = index.match(md5, ph, ch)
        if m is None:
            index.add(rid, md5, ph, ch)
            out[rid] = rid
        else:
            out[rid] = m.rep
    return out
