"""The expander model: a transformers causal LM that turns a short prompt into a rich, faithful caption.

Two kinds load here. The world expander (`world`, shipped in the package, or any folder `krea2-expander` wrote,
marked by expander.json) is a `Qwen3ForCausalLM` sized for a CPU with a byte-level BPE tokenizer trained on the
world's language; it reads `expand LEVEL: PROMPT` and writes `keep: ... | open: ... | caption: ...` (the intent
reconstruction, then the caption). Any other local causal LM (`hf:PATH`) is prompted with SYSTEM_PROMPT through its
chat template, the way the release ships only a system prompt for any LLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2.errors import Krea2Error
from krea2.expander import data, grammar

ASSET = Path(__file__).resolve().parents[1] / "assets" / "world_expander"
MARKER = "expander.json"
# Sampling per level: low keeps close to the most likely caption, medium and high sample the learned spread.
SAMPLING = {"low": {"temperature": 0.7}, "medium": {"temperature": 1.0}, "high": {"temperature": 1.0}}

SYSTEM_PROMPT = "\n".join((
    "You rewrite a short image prompt as one rich paragraph that an image model can follow.",
    "Keep the user's intent exactly: every subject, count, colour, size, position, relation, background and style "
    "the prompt names stays as written, and nothing you add may contradict it. Add no new subjects.",
    "Keep any text in quotes verbatim, in quotes. Keep the user's medium (photo, painting, drawing, render) when they "
    "name one.",
    "Fill what the user left open according to the creativity level:",
    "- low: fill only obvious gaps (setting, background, rendering style);",
    "- medium: also choose colours, sizes and materials of the named subjects;",
    "- high: take creative liberty with composition, placement, lighting and mood, still without new subjects.",
    "Answer with the paragraph only: no preamble, no list, no quotes around it."))


def build_tokenizer(texts, vocab_size: int = 384):
    """A byte-level BPE tokenizer (GPT-2's scheme: any text round-trips exactly) trained on `texts`, with <pad> and
    <eos>; left padding for batched generation. Returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left",
                                   model_max_length=256)


def build_model(tokenizer, hidden: int = 192, layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A fresh Qwen3ForCausalLM sized for a CPU (hidden 192, 4 layers: 1.7M parameters at a 384-token vocabulary)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


@dataclass
class Expander:
    """A loaded expander. kind: 'world' (the project's format) or 'chat' (any causal LM with SYSTEM_PROMPT)."""
    model: torch.nn.Module
    tokenizer: object
    kind: str
    max_new_tokens: int = 128

    def _inputs(self, prompt: str, level: str) -> str:
        if self.kind == "world":
            return data.model_input(prompt, level)
        messages = [{"role": "system", "content": f"{SYSTEM_PROMPT}\nCreativity level: {level}."},
                    {"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{messages[0]['content']}\n\nPrompt: {prompt}\nParagraph:"

    @torch.no_grad()
    def completions(self, prompt: str, creativity: str = "medium", n: int = 1, seed: int = 0) -> list[str]:
        """n sampled completions of one prompt as the model wrote them (world kind: intent and caption).
        Deterministic in seed. Raises Krea2Error for an unknown level, raw (no model runs for raw), n < 1 or an
        empty prompt."""
        if n < 1:
            raise Krea2Error(f"n must be at least 1, got {n}")
        return self.complete_many([prompt] * n, creativity, seed)

    @torch.no_grad()
    def complete_many(self, prompts: list[str], creativity: str = "medium", seed: int = 0,
                      batch_size: int = 64) -> list[str]:
        """One sampled completion per prompt, batch_size prompts per (left-padded) generate call; deterministic in
        seed and batch_size. Errors as `completions`."""
        grammar.check_level(creativity)
        if creativity == "raw":
            raise Krea2Error("creativity raw does not run the expander; the prompt is used as written")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise Krea2Error("a prompt is empty; give the expander something to expand")
        device = next(self.model.parameters()).device
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [self._inputs(p, creativity) for p in prompts[start:start + batch_size]]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed + start)
            ids = self.model.generate(**{k: v.to(device) for k, v in enc.items()}, do_sample=True, top_k=0,
                                      top_p=1.0, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **SAMPLING[creativity])
            texts = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [" ".join(t.split()) for t in texts]
        return out

    def caption_of(self, completion: str, prompt: str) -> str:
        """The text for the image model: the caption of a world completion, a chat model's first paragraph. A world
        completion without a caption falls back to the prompt as written, so the user's intent is never lost."""
        if self.kind == "world":
            return data.split_completion(completion) or prompt
        return completion.strip().split("\n\n")[0].strip() or prompt

    def expand(self, prompt: str, creativity: str = "medium", n: int = 1, seed: int = 0,
               verify: bool = False) -> list[str]:
        """n expansions of prompt at a creativity level (raw: the prompt itself, n times). See `expand_many`."""
        return self.expand_many([prompt] * n, creativity, seed, verify)

    def expand_many(self, prompts: list[str], creativity: str = "medium", seed: int = 0, verify: bool = False,
                    tries: int = 4) -> list[str]:
        """One expansion per prompt (repeat a prompt for several); raw returns the prompts. See `complete_many`.

        verify (world kind, prompts the world grammar reads): an expansion that fails the gates or drops, changes or
        contradicts a requirement of the prompt (`rewards.verified`) is sampled again, up to `tries` samples in all;
        then the prompt itself is used. The model alone is what `verify=False` measures.
        """
        if grammar.check_level(creativity) == "raw":
            return list(prompts)
        out = [self.caption_of(c, p) for c, p in zip(self.complete_many(prompts, creativity, seed), prompts)]
        if not verify or self.kind != "world":
            return out
        from krea2.expander.rewards import verified

        records = {}
        for p in set(prompts):
            try:
                records[p] = grammar.prompt_record(p)
            except Krea2Error:
                records[p] = None  # outside the world's language: nothing to verify against
        todo = [i for i, p in enumerate(prompts) if records[p] and not verified(out[i], records[p])]
        for k in range(1, tries):
            if not todo:
                break
            again = self.expand_many([prompts[i] for i in todo], creativity, seed + 7919 * k)
            for i, text in zip(todo, again):
                out[i] = text
            todo = [i for i in todo if not verified(out[i], records[prompts[i]])]
        for i in todo:
            out[i] = prompts[i]
        return out


def save_expander(expander: Expander, path: str | Path, info: dict | None = None, overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer and expander.json to a folder, crash-safely (publish_dir)."""
    from krea2.models.checkpoint import publish_dir

    def fill(tmp: Path) -> None:
        expander.model.save_pretrained(tmp, safe_serialization=True)
        expander.tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": "krea2-expander", **(info or {})}, indent=1) + "\n")

    return publish_dir(path, fill, overwrite=overwrite)


def load_expander(spec: str = "world", device: str = "cpu") -> Expander:
    """`world` (shipped), a folder written by krea2-expander, or `hf:PATH` (a local transformers causal LM folder; no
    download). Raises Krea2Error for a missing or unreadable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "world":
        path = ASSET
        if not (path / MARKER).exists():
            raise Krea2Error(f"the world expander is not in this install ({path}); build it with `make world-expander`")
    else:
        path = Path(spec[3:] if spec.startswith("hf:") else spec)
        if not path.is_dir():
            raise Krea2Error(f"expander {spec!r} not found: give world, a folder written by krea2-expander, or hf:PATH "
                             "to a local transformers causal LM folder (nothing is downloaded)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise Krea2Error(f"cannot load expander {spec!r} from {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return Expander(model, tokenizer, "world" if (path / MARKER).exists() else "chat")
