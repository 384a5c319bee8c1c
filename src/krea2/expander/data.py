"""Training text for the expander: (short prompt -> intent + expansion) pairs from the world's caption cascade.

The input is what a user types: a cascade short caption ("two circles and a square") or an evaluation-style prompt
of a random tag ("a green square to the right of a red circle"); its requirements come from the grammar's parser.
The target is the intent reconstruction (what the user fixed, what is left open) followed by a caption of a scene
that satisfies the requirements, every open attribute drawn uniformly (no house style), written at the creativity
level named in the input. Visually rich scenes are oversampled: cascade scenes draw n objects with weight n (mean 3
objects against the evaluation tags' 1-2).
"""

from __future__ import annotations

import numpy as np

from krea2.data import world
from krea2.expander import grammar

TEXT_LEVELS = ("low", "medium", "high")  # raw is the prompt itself: no model


def model_input(prompt: str, level: str) -> str:
    """The world expander's input line for a prompt at a level (low | medium | high)."""
    return f"expand {level}: {' '.join(prompt.split())}\n"


def target_text(record: dict, scene: world.Scene, level: str, rng: np.random.Generator) -> str:
    """Intent reconstruction, then the caption: 'keep: ... | open: ... | caption: ...'."""
    return f"{grammar.intent_text(record)} | caption: {grammar.expansion_text(scene, record, level, rng)}"


def split_completion(text: str) -> str | None:
    """The caption of a completion in the expander's format (the text after 'caption:'), or None if it has none."""
    head, sep, tail = text.partition("caption:")
    return (" ".join(tail.split()) or None) if sep else None


def user_prompt(rng: np.random.Generator) -> dict:
    """A user-like short prompt with its requirements (a world prompt record): half cascade short captions of rich
    scenes, half evaluation-style prompts of a random tag."""
    if rng.random() < 0.5:
        n = int(rng.choice(4, p=np.arange(1, 5) / 10)) + 1
        scene = world.sample_scene(rng, n_objects=(n, n))
        return grammar.prompt_record(world.captions(scene, rng)["short"])
    tag = world.TAGS[int(rng.integers(len(world.TAGS)))]
    rec = world.scene_to_prompt_record(world.sample_scene_for_tag(rng, tag), tag, rng)
    return {k: v for k, v in rec.items() if k != "tag"}


def sft_pairs(n: int, seed: int = 0) -> list[dict]:
    """n prompt/completion pairs (TRL's prompt-completion format), levels low/medium/high in equal parts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = user_prompt(rng)
        level = TEXT_LEVELS[i % 3]
        scene = grammar.complete_scene(rec, rng)
        out.append({"prompt": model_input(rec["prompt"], level), "completion": target_text(rec, scene, level, rng)})
    return out
