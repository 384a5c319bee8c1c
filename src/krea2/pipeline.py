"""Text-to-image pipeline: encode -> sample -> decode -> image tensors, with PIL conversion and grids beside it.

`Pipeline.generate` has no side effects (no prints, no bars unless asked) and returns (B, 3, H, W) tensors in
[-1, 1]; `to_pil` and `image_grid` turn them into pictures. The checkpoint folder format lives in
`krea2.models.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from krea2.errors import Krea2Error
from krea2.models.checkpoint import resolve_checkpoint
from krea2.models.dit import DiT
from krea2.models.loading import load_dit
from krea2.sampling import (
    Conditioning,
    SamplingConfig,
    euler_sample,
    initial_noise,
    patchify,
    schedule,
    unpatchify,
)

Progress = Callable[[int, int], None]  # (steps done, total steps) over the whole call


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8 as the release scales them (values outside are clamped,
    NaN is black): the one rounding every saved image, reward canvas and pairs file uses."""
    x = torch.nan_to_num(images.detach().float(), nan=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB PIL images (`to_uint8`)."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8(images)]


def image_grid(images: list[Image.Image] | torch.Tensor, cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (PIL, or a (B, 3, H, W) tensor in [-1, 1]) into one picture with white gutters, row-major.

    cols defaults to ceil(sqrt(n)). Raises Krea2Error when there are no images.
    """
    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    if not images:
        raise Krea2Error("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


@dataclass
class Pipeline:
    model: DiT
    text_encoder: object
    autoencoder: object
    sampling: SamplingConfig  # the checkpoint's defaults; per call, pass sampling_config(...)
    resolution: int  # native side in px, used when generate gets no width/height
    device: str = "cpu"
    # the "" encoding for the unconditional branch, keyed by (device, dtype): computed once, not per chunk
    _empty: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def pixels_per_token(self) -> int:
        return self.autoencoder.compression * self.model.cfg.patch

    def sampling_config(self, **overrides) -> SamplingConfig:
        """The checkpoint's SamplingConfig with overrides (dataclasses.replace); None values keep the default.

        Raises Krea2Error for a name that is not a SamplingConfig field.
        """
        from krea2.limits import check_sampling

        known = {f.name for f in dataclasses.fields(SamplingConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise Krea2Error(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
        check_sampling(overrides.get("steps"), overrides.get("guidance"), overrides.get("mu"))
        return dataclasses.replace(self.sampling, **{k: v for k, v in overrides.items() if v is not None})

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, L, layers, dim) in the DiT's dtype and mask (B, L) bool, on the pipeline's device."""
        states, mask = self.text_encoder.encode(prompts)
        return states.to(self.device, self.model.first.weight.dtype), mask.to(self.device)

    def encode_empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """encode([""]) (1, L, layers, dim), cached for the pipeline's device and the DiT's dtype."""
        key = (str(self.device), self.model.first.weight.dtype)
        if self._empty is None or self._empty[0] != key:
            self._empty = (key, *self.encode([""]))
        return self._empty[1], self._empty[2]

    def snap_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height) in px rounded up to a multiple of pixels_per_token; None means the native resolution.

        Raises Krea2Error for a side < 1 or over the limit (krea2.limits). Prints nothing: callers that want to tell
        users compare the result.
        """
        from krea2.limits import check_side

        m = self.pixels_per_token
        out = []
        for name, v in (("width", width), ("height", height)):
            check_side(v, name)
            out.append(math.ceil((v or self.resolution) / m) * m)
        return out[0], out[1]

    def load_lora(self, lora, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a LoRA (a file in any supported format, or a `krea2.models.lora.LoRA`) to the DiT at `scale`.

        Reversible (forward hooks, the weights stay as loaded); several stack, each with its own scale. name None:
        the file's stem (made unique), or lora0, lora1, ... for a LoRA object; an existing name is hot-swapped (the
        old adapter replaced). Returns the name. One-line Krea2Error for a missing file, keys that match no module
        (or only some), shapes that do not fit this model, or a quantised DiT (not supported yet).
        """
        from pathlib import Path

        from krea2.models.lora import LoRA, active_loras, apply_lora, read_lora, refuse_quantized

        refuse_quantized(self.model)  # before reading the file: the refusal does not depend on it
        if not isinstance(lora, LoRA):
            path = Path(lora)
            lora = read_lora(path, self.model)
            if name is None:
                loaded, name, i = active_loras(self.model), path.stem, 1
                while name in loaded:
                    i += 1
                    name = f"{path.stem}_{i}"
        return apply_lora(self.model, lora, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (0 switches it off). Krea2Error for an unknown name."""
        from krea2.models.lora import set_lora_scale

        set_lora_scale(self.model, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all (name None): the DiT is then exactly as loaded. Krea2Error for an unknown name."""
        from krea2.models.lora import unload_lora

        unload_lora(self.model, name)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs."""
        from krea2.models.lora import active_loras

        return active_loras(self.model)

    @staticmethod
    def expand_prompts(prompts: list[str], expander, creativity: str = "medium", seed: int = 0,
                       verify: bool = True) -> list[str]:
        """One expansion per prompt by a `krea2.expander.Expander` (raw: unchanged), sampled in one batch from seed,
        so that repeated prompts (several images of one prompt) get different expansions; verify: resample what
        fails the exact faithfulness check (see Expander.expand_many). Raises Krea2Error for an unknown creativity."""
        return expander.expand_many(list(prompts), creativity, seed, verify=verify)

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, sampling: SamplingConfig | None = None, seed: int = 0,
                 width: int | None = None, height: int | None = None, batch_size: int = 16,
                 progress: bool | Progress | None = None, seeds: list[int] | None = None,
                 style=None, expander=None, creativity: str = "medium") -> torch.Tensor:
        """One image per prompt as a float32 tensor (B, 3, H, W) in [-1, 1] on the pipeline's device.

        Image i uses noise seeded seed + i, whatever batch_size is, or seeds[i] when `seeds` (one per prompt) is
        given: a server batching several requests gives each image its own request's seed. `style`: a
        `krea2.style.StyleMix` (style references, their weights and strength; None: the release path; a mix with a
        reference LoRA adds it to the model during the reference passes, so one pipeline must not sample from two
        threads at once — `krea2 serve` runs one worker). expander: a
        `krea2.expander.Expander` that rewrites prompt i at `creativity` first (see expand_prompts). sampling
        defaults to the checkpoint's (build another with `sampling_config(steps=..., guidance=..., mu=...)`).
        width/height default to the native
        resolution and are snapped up silently to a multiple of pixels_per_token (see snap_size; H, W of the
        result say what was used). progress: True draws a tqdm bar on stderr; a callable gets (done, total)
        Euler steps after each step. Raises Krea2Error for no prompts, batch_size < 1, a side out of range or
        sampling settings out of range (krea2.limits). An empty prompt "" is the unconditional input, allowed here on
        purpose (commands refuse it: krea2.limits.check_prompts).
        """
        from functools import partial

        from krea2.limits import check_sampling
        from krea2.style import styled_velocity

        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise Krea2Error("no prompts given; pass at least one prompt")
        if batch_size < 1:
            raise Krea2Error(f"batch_size must be at least 1, got {batch_size}")
        if seeds is not None and len(seeds) != len(prompts):
            raise Krea2Error(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if expander is not None:
            prompts = self.expand_prompts(prompts, expander, creativity, seed)
        cfg = sampling or self.sampling
        check_sampling(cfg.steps, cfg.guidance, cfg.mu)
        width, height = self.snap_size(width, height)
        f, p = self.autoencoder.compression, self.model.cfg.patch
        h, w = height // f, width // f
        gh, gw = h // p, w // p
        ts = schedule(gh * gw, cfg, self.pixels_per_token)
        total = math.ceil(len(prompts) / batch_size) * cfg.steps
        bar, done = None, 0
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="sampling", unit="step")

        def tick(_: int) -> None:
            nonlocal done
            done += 1
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, total)

        images = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                ctx, cmask = self.encode(chunk)
                cond = Conditioning.build(ctx, cmask, gh, gw)
                uncond = None
                if cfg.guidance > 0:  # as the release: g <= 0 is the conditional pass alone
                    uctx, umask = self.encode_empty()
                    uncond = Conditioning.build(uctx.expand(len(chunk), -1, -1, -1), umask.expand(len(chunk), -1),
                                                gh, gw)
                if seeds is None:
                    noise = initial_noise(len(chunk), self.model.cfg.channels, h, w, seed + start, device=self.device)
                else:
                    noise = torch.cat([initial_noise(1, self.model.cfg.channels, h, w, s, device=self.device)
                                       for s in seeds[start:start + len(chunk)]])
                velocity = None if style is None else partial(styled_velocity, mix=style, gh=gh, gw=gw)
                x = euler_sample(self.model, patchify(noise, p), ts, cond, uncond, cfg.guidance,
                                 progress=tick if progress else None, velocity=velocity)
                if not bool(torch.isfinite(x).all()):  # clamp would turn NaN into a black image with exit 0
                    raise Krea2Error(
                        f"sampling produced non-finite values (NaN or inf) for prompt {start + 1}; the model's "
                        f"weights or the settings overflow (steps {cfg.steps}, guidance {cfg.guidance}): try "
                        "float32, a lower guidance or another checkpoint")
                latent = unpatchify(x, p, h, w)
                images.append(self.autoencoder.decode(latent.to(self.device)).float().clamp(-1, 1))
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(images)



def load_pipeline(checkpoint: str = "world", device: str = "cpu", dtype: torch.dtype | None = None,
                  text_encoder: str | None = None, autoencoder: str | None = None,
                  quantize: str | None = None) -> Pipeline:
    """Load a checkpoint (see krea2.models.checkpoint.resolve_checkpoint) with its encoders, or the ones given.

    The DiT is loaded in dtype (default float32). quantize 'fp8' | 'int8' stores the block Linears' weights in 8
    bits (per-row scales; dtype is then the compute dtype and that of the other modules); a checkpoint stored in
    8 bits loads quantised as stored (see krea2.models.quantize). Raises Krea2Error when the encoders do not fit
    the DiT, or for an unknown quantize.
    """
    from krea2.models.autoencoders import load_autoencoder
    from krea2.models.text_encoders import load_text_encoder

    info = resolve_checkpoint(checkpoint)
    model = load_dit(info.model_path, info.model, dtype=dtype or torch.float32, device=device, quantize=quantize)
    te = load_text_encoder(text_encoder or info.text_encoder, device=device)
    ae = load_autoencoder(autoencoder or info.autoencoder, device=device)
    if te.dim != model.cfg.txtdim or te.n_layers != model.cfg.txtlayers:
        raise Krea2Error(f"text encoder gives {te.n_layers} layers x {te.dim} but the model expects "
                         f"{model.cfg.txtlayers} x {model.cfg.txtdim}; use the checkpoint's own text encoder")
    if ae.channels != model.cfg.channels:
        raise Krea2Error(f"autoencoder has {ae.channels} channels but the model expects {model.cfg.channels}")
    return Pipeline(model, te, ae, info.sampling, info.resolution, device)
