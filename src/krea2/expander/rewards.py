"""Rewards for the expander's RL stage, as TRL reward functions: `f(prompts, completions, record, **kw) -> list[float]`.

Dense terms (normalised per reward within each group, then summed: GDPO, TRL's `normalize_then_sum`):
- `text_faithfulness`: the fraction of the short prompt's requirements the expansion's caption keeps, read by the
  grammar's parser and judged by the world checker's own rule (`krea2.rewards.world.requirement_results` on
  `grammar.caption_detection`): an object dropped, an attribute changed, an object added or a relation broken
  each cost their requirement;
- `image_faithfulness`: the same requirements judged by the checker on the image the world model draws from the
  expansion (`krea2.rewards.world.world_rubric`);
- `image_diversity`: the mean world-encoder feature distance from a completion's image to the images of the other
  completions of its group. A group's images share one noise seed, so the spread comes from the expansions alone:
  identical completions score exactly 0. Always on (annealing it collapsed the release's expander to one style).
Gates act on the total, not as dense terms: a completion that fails the format gate (the 'keep | open | caption'
structure, a caption that parses, at most `max_words` words) or the constraint gate (no word outside the world's
language, i.e. no new subject, and no content word the parser could not place; at most 4 objects; one background
and one style; distinct cells; a declared count that agrees) gets the floor 0 in every term, so after
normalisation it ranks above no completion of its group on any term.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence

import numpy as np

from krea2.expander import data, grammar

FORMAT = re.compile(r"^keep: [^|]+ \| open: [^|]+ \| caption: [^|]+$")


def format_ok(completion: str, max_words: int = 80) -> bool:
    """The format and length gate: 'keep: ... | open: ... | caption: ...', a caption naming an object of the world,
    at most max_words words in all."""
    if not FORMAT.match(completion) or len(completion.split()) > max_words:
        return False
    caption = data.split_completion(completion)
    return caption is not None and bool(grammar.parse(caption).phrases)


def constraint_ok(parsed: grammar.ParsedCaption) -> bool:
    """The constraint gate on a parsed caption: only the world's language (no new subjects), 1-4 objects, one
    background and one style at most, objects given cells in distinct cells, a declared count that agrees."""
    if parsed.unknown or not 1 <= parsed.n_objects <= 4:
        return False
    if len(set(parsed.backgrounds)) > 1 or len(set(parsed.styles)) > 1:
        return False
    cells = [p.position for p in parsed.phrases for _ in range(p.count) if p.position]
    if len(set(cells)) != len(cells):
        return False
    return parsed.declared_count is None or parsed.declared_count == parsed.n_objects


def text_requirements(caption: str, record: dict) -> dict[str, bool]:
    """Which requirements of a prompt record a caption keeps (the keys of krea2.rewards.world.requirement_results)."""
    from krea2.rewards.world import requirement_results

    return requirement_results(grammar.caption_detection(grammar.parse(caption)), record)


def text_faithful(caption: str, record: dict) -> bool:
    """True when the caption keeps every requirement of the record and adds nothing that contradicts it (exactly
    the checker's rule, read on the text)."""
    from krea2.eval import checker

    return checker.matches(grammar.caption_detection(grammar.parse(caption)), record)


def verified(caption: str, record: dict, max_words: int = 80) -> bool:
    """A caption that passes the constraint gate, stays within max_words and is faithful to the record."""
    return (len(caption.split()) <= max_words and constraint_ok(grammar.parse(caption))
            and text_faithful(caption, record))


def group_seed(prompt: str) -> int:
    """The noise seed shared by a group's images (one per prompt text)."""
    return zlib.crc32(prompt.encode()) % 2**31


def group_diversity(features: np.ndarray, groups: Sequence, valid: Sequence[bool]) -> np.ndarray:
    """Per item: the mean L2 distance of its feature row to the valid items of its own group (0 for an invalid item
    or a group with one valid item). features (N, D); groups: N hashable group keys."""
    out = np.zeros(len(groups))
    for key in set(groups):
        idx = [i for i, g in enumerate(groups) if g == key and valid[i]]
        if len(idx) < 2:
            continue
        f = features[idx]
        d = np.linalg.norm(f[:, None] - f[None], axis=-1)
        out[idx] = d.sum(axis=1) / (len(idx) - 1)
    return out


class ExpansionRewards:
    """The RL rewards, sharing one image generation per batch of completions.

    checkpoint: the image model that draws the expansions (default world-turbo: 8 steps, no CFG), or pass a loaded
    `pipeline`. Rewards are computed once per (prompts, completions) batch and cached for the other functions.
    """

    def __init__(self, checkpoint: str = "world-turbo", pipeline=None, max_words: int = 80):
        self.checkpoint, self._pipe, self.max_words = checkpoint, pipeline, max_words
        self._key, self._values = None, None

    @property
    def pipe(self):
        if self._pipe is None:
            from krea2.pipeline import load_pipeline

            self._pipe = load_pipeline(self.checkpoint)
        return self._pipe

    def images(self, texts: Sequence[str], seeds: Sequence[int]):
        return self.pipe.generate(list(texts), seeds=list(seeds))

    def image_scores(self, texts: Sequence[str], records: Sequence[dict], seeds: Sequence[int]) -> np.ndarray:
        """The image rubric of text i drawn with seeds[i] against records[i] (the prompt mix's scoring pass)."""
        from krea2.rewards.world import world_rubric

        return world_rubric(self.images(texts, seeds), list(records)).cpu().numpy()

    def judge(self, prompts: Sequence[str], completions: Sequence[str], record: Sequence[str]) -> dict[str, np.ndarray]:
        """Every term for a batch: arrays gate, text, image, diversity (each (N,))."""
        key = (tuple(prompts), tuple(completions))
        if key == self._key:
            return self._values
        from krea2.eval.fid import world_features
        from krea2.rewards.world import to_canvases, world_rubric

        recs = [json.loads(r) if isinstance(r, str) else r for r in record]
        captions = [data.split_completion(c) if format_ok(c, self.max_words) else None for c in completions]
        gate = np.array([c is not None and constraint_ok(grammar.parse(c)) for c in captions])
        n = len(completions)
        text, image, diversity = np.zeros(n), np.zeros(n), np.zeros(n)
        idx = np.flatnonzero(gate)
        for i in idx:
            met = text_requirements(captions[i], recs[i])
            text[i] = sum(met.values()) / len(met)
        if len(idx):
            imgs = self.images([captions[i] for i in idx], [group_seed(prompts[i]) for i in idx])
            image[idx] = world_rubric(imgs, [recs[i] for i in idx]).cpu().numpy()
            feats = world_features(to_canvases(imgs))
            diversity[idx] = group_diversity(feats, [prompts[i] for i in idx], [True] * len(idx))
        self._key, self._values = key, {"gate": gate.astype(float), "text": text, "image": image,
                                        "diversity": diversity}
        return self._values

    def text_faithfulness(self, prompts, completions, record, **_) -> list[float]:
        return self.judge(prompts, completions, record)["text"].tolist()

    def image_faithfulness(self, prompts, completions, record, **_) -> list[float]:
        return self.judge(prompts, completions, record)["image"].tolist()

    def image_diversity(self, prompts, completions, record, **_) -> list[float]:
        return self.judge(prompts, completions, record)["diversity"].tolist()

    def reward_funcs(self) -> list:
        """The dense terms for trl.GRPOTrainer(reward_funcs=...), gates applied inside each."""
        return [self.text_faithfulness, self.image_faithfulness, self.image_diversity]
