"""Regenerate the shipped world evaluation prompts (deterministic): python scripts/make_world_prompts.py"""

from pathlib import Path

from krea2.eval.world_eval import PROMPT_SETS, write_prompts

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "src" / "krea2" / "prompts"
    for name, (n_per_tag, seed) in PROMPT_SETS.items():
        path = write_prompts(out / f"{name}.jsonl", n_per_tag, seed)
        print(path)
