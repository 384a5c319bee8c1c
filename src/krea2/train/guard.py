"""Loss-spike and NaN guard: decide, before optimizer.step(), whether a step is safe to apply.

A step is bad when the loss or the gradient norm is not finite, or when the loss jumps above the running median of
recent good steps by `spike_factor` (and the window is full, so warmup noise does not trigger it). The configured
action is "skip" (drop this step's update) or "rollback" (reload the last good checkpoint); after
`max_consecutive` bad steps in a row the guard escalates skip to rollback, since skipping is not converging.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch

from krea2.errors import Krea2Error

ACTIONS = ("skip", "rollback")


@dataclass
class GuardConfig:
    action: str = "skip"  # skip | rollback
    window: int = 50  # good steps in the running median
    spike_factor: float = 3.0  # loss > factor * median is a spike
    min_steps: int = 20  # good steps seen before spikes are judged
    grad_norm_factor: float = 0.0  # >0: also flag grad norm > factor * its median
    max_consecutive: int = 5  # bad steps in a row before "skip" becomes "rollback"

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise Krea2Error(f"guard action={self.action!r}; choose one of {ACTIONS}")
        if self.window < 1 or self.spike_factor <= 1.0:
            raise Krea2Error("guard needs window >= 1 and spike_factor > 1")


@dataclass
class Verdict:
    ok: bool
    action: str | None = None  # None when ok, else "skip" or "rollback"
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _as_float(x) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


class SpikeGuard:
    """`verdict = guard.check(loss, grad_norm)`; apply the step only if `verdict.ok`.

    Pass values already reduced over ranks (every rank must take the same decision, or ranks diverge).
    """

    def __init__(self, cfg: GuardConfig | None = None):
        self.cfg = cfg or GuardConfig()
        self.losses: deque[float] = deque(maxlen=self.cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=self.cfg.window)
        self.consecutive_bad = 0
        self.total_bad = 0

    def _bad(self, reason: str) -> Verdict:
        self.consecutive_bad += 1
        self.total_bad += 1
        action = self.cfg.action
        if self.consecutive_bad >= self.cfg.max_consecutive:
            action, reason = "rollback", f"{reason} ({self.consecutive_bad} bad steps in a row)"
        return Verdict(False, action, reason)

    def check(self, loss, grad_norm=None) -> Verdict:
        loss = _as_float(loss)
        gnorm = None if grad_norm is None else _as_float(grad_norm)
        if not math.isfinite(loss):
            return self._bad(f"loss is {loss}")
        if gnorm is not None and not math.isfinite(gnorm):
            return self._bad(f"grad norm is {gnorm}")
        if len(self.losses) >= min(self.cfg.min_steps, self.cfg.window):
            med = statistics.median(self.losses)
            if med > 0 and loss > self.cfg.spike_factor * med:  # a ratio test means nothing for med <= 0
                return self._bad(f"loss {loss:.4g} > {self.cfg.spike_factor}x running median {med:.4g}")
            if gnorm is not None and self.cfg.grad_norm_factor > 0 and self.grad_norms:
                gmed = statistics.median(self.grad_norms)
                if gnorm > self.cfg.grad_norm_factor * gmed:
                    return self._bad(f"grad norm {gnorm:.4g} > {self.cfg.grad_norm_factor}x median {gmed:.4g}")
        self.losses.append(loss)
        if gnorm is not None:
            self.grad_norms.append(gnorm)
        self.consecutive_bad = 0
        return Verdict(True)

    def reset_after_rollback(self) -> None:
        """After reloading a checkpoint the recent history no longer describes the weights: start the count again."""
        self.consecutive_bad = 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "total_bad": self.total_bad}

    def load_state_dict(self, d: dict) -> None:
        self.losses.extend(d.get("losses", []))
        self.grad_norms.extend(d.get("grad_norms", []))
        self.total_bad = d.get("total_bad", 0)
