"""The prompt expander (issue 13): short prompt -> faithful rich caption, trained with TRL (SFT, then GRPO).

Public API: `load_expander(spec)` -> `Expander` (`.expand(prompt, creativity, n, seed)`), `LEVELS`, and the world
grammar (`krea2.expander.grammar`) that judges faithfulness exactly. Training: `krea2-expander sft|grpo|ship`.
"""

from krea2.expander.grammar import LEVELS
from krea2.expander.model import Expander, load_expander

__all__ = ["LEVELS", "Expander", "load_expander"]
