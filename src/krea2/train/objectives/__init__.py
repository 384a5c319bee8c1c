"""Objectives by name: `[stages.objective] name = "..."` picks the class; the rest of the table is its Config.

    OBJECTIVES = {"flow": FlowMatching, "dpo": DiffusionDPO, "stpo": STPO, "grpo": FlowGRPO, "tdm": TDM,
                  "dmd2": DMD2, "style": StyleAdapter, "style_po": StylePreference}
"""

from __future__ import annotations

from krea2.errors import Krea2Error
from krea2.train.objectives.base import LossObjective, Objective, ObjectiveEnv, Role
from krea2.train.objectives.dmd2 import DMD2
from krea2.train.objectives.dpo import DiffusionDPO
from krea2.train.objectives.flow import FlowMatching
from krea2.train.objectives.grpo import FlowGRPO
from krea2.train.objectives.stpo import STPO
from krea2.train.objectives.style import StyleAdapter
from krea2.train.objectives.style_po import StylePreference
from krea2.train.objectives.tdm import TDM

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls
                                          for cls in (FlowMatching, DiffusionDPO, STPO, FlowGRPO, TDM, DMD2,
                                                      StyleAdapter, StylePreference)}


def get_objective(name: str, where: str = "") -> type[Objective]:
    if name not in OBJECTIVES:
        raise Krea2Error(f"{where + ': ' if where else ''}objective {name!r} unknown; available: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective_config(table: dict | None, where: str):
    """The objective's own Config from its recipe table (default: flow). `name` picks the class; a Config that has no
    `name` field of its own does not receive it (the trainer reads the name from the class)."""
    from dataclasses import fields

    from krea2.train.schema import build

    table = dict(table or {})
    cls = get_objective(table.get("name", "flow"), where)
    if "name" not in {f.name for f in fields(cls.Config)}:
        table.pop("name", None)
    cfg = build(cls.Config, table, where)
    if not hasattr(cfg, "name"):
        object.__setattr__(cfg, "name", cls.name)
    return cfg


__all__ = ["OBJECTIVES", "LossObjective", "Objective", "ObjectiveEnv", "Role", "build_objective_config",
           "get_objective"]
