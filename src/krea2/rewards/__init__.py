"""Rewards by name: a reward maps (images (B, 3, H, W) in [-1, 1], records: list[dict]) to (B,) float32 scores.

Used by RL objectives (Flow-GRPO's verifiable reward) and by the prompt expander; records are whatever the reward
needs about each image's prompt (for the world rewards: world prompt or scene records, docs/WORLD.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from krea2.errors import Krea2Error
from krea2.rewards.world import requirement_results, world_artifacts, world_rubric, world_strict

Reward = Callable[[Tensor, Sequence[dict]], Tensor]

REWARDS: dict[str, Reward] = {
    "world_rubric": world_rubric,
    "world_strict": world_strict,
    "world_artifacts": world_artifacts,
}


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise Krea2Error(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
    return REWARDS[name]


__all__ = ["REWARDS", "Reward", "get_reward", "requirement_results", "world_artifacts", "world_rubric",
           "world_strict"]
