"""Rewards by name: a reward maps (images (B, 3, H, W) in [-1, 1], records: list[dict]) to (B,) float32 scores.

Used by RL objectives (Flow-GRPO's verifiable reward) and by the prompt expander; records are whatever the reward
needs about each image's prompt (for the world rewards: world prompt or scene records, docs/WORLD.md). A learnt
reward takes its model as `name:FOLDER` (`world_aesthetic:runs/aesthetic`); the bare name uses the shipped one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import Tensor

from krea2.errors import Krea2Error
from krea2.rewards.aesthetic import world_aesthetic
from krea2.rewards.world import requirement_results, world_artifacts, world_rubric, world_strict

Reward = Callable[[Tensor, Sequence[dict]], Tensor]

REWARDS: dict[str, Reward] = {
    "world_rubric": world_rubric,
    "world_strict": world_strict,
    "world_artifacts": world_artifacts,
    "world_aesthetic": world_aesthetic,
}
LEARNT = ("world_aesthetic",)  # rewards with a model: NAME:FOLDER picks a trained one


def is_known(name: str) -> bool:
    """Whether `name` is a reward name, or NAME:FOLDER for a learnt reward (the folder is checked when loading)."""
    base, sep, folder = name.partition(":")
    return name in REWARDS or (bool(sep) and base in LEARNT and bool(folder))


def get_reward(name: str) -> Reward:
    """The reward called `name` (or NAME:FOLDER, see LEARNT); raises Krea2Error for an unknown name, or a folder
    without a trained model."""
    if not is_known(name):
        raise Krea2Error(f"unknown reward {name!r}; choose from {sorted(REWARDS)} (or NAME:FOLDER for "
                         f"{', '.join(LEARNT)})")
    base, _, folder = name.partition(":")
    if base in LEARNT:
        from krea2.rewards.aesthetic import SHIPPED, load_aesthetic

        load_aesthetic(folder or SHIPPED)  # a missing or broken model fails here, before any rollout
        return functools.partial(REWARDS[base], folder=folder or SHIPPED)
    return REWARDS[name]


__all__ = ["LEARNT", "REWARDS", "Reward", "get_reward", "is_known", "requirement_results", "world_aesthetic",
           "world_artifacts", "world_rubric", "world_strict"]
