"""An "aesthetic" stand-in reward for the world: a small classifier of ground-truth renders against a model's samples.

Krea's aesthetic rewards are preference models trained on human ratings, which a world of flat shapes has no use for;
what its images lack is the look of a clean render: whole shapes with straight or round edges, flat fills, the
style's own texture and nothing stray. The stand-in learns exactly that difference: a discriminator (as in GAN-based
rewards, e.g. the discriminator reward of DMD2 / "Diffusion-GAN" used as a score) trained once, offline, on renders
of world scenes (label 1) against the model's samples of the same scenes' captions (label 0), so content is matched
and only the drawing separates the classes. The reward is P(render | image) in (0, 1). It is frozen during RL (a
fixed reward model, like any learnt reward); label smoothing keeps it from saturating, so groups keep a spread.

`world_aesthetic` uses the classifier shipped in the package (trained against the shipped world base);
`world_aesthetic:FOLDER` one trained with `krea2 train-aesthetic --out FOLDER`.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from krea2.errors import Krea2Error

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "world_aesthetic"
WEIGHTS, CONFIG = "aesthetic.safetensors", "aesthetic.json"


@dataclass
class AestheticConfig:
    """`krea2 train-aesthetic --set key=value` fields."""

    width: int = 32  # channels of the first conv; the net is ~0.1M parameters at 32
    images: int = 4096  # renders, and as many samples of their captions
    holdout: float = 0.2  # fraction of scenes (both classes) kept out of training to measure accuracy
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    label_smoothing: float = 0.1
    # a quarter of the samples at the checkpoint's preset, the rest at `rollout_guidance` with `rollout_steps`
    # Euler steps: what Flow-GRPO's guidance-free rollouts look like, the images the reward scores in RL
    preset_fraction: float = 0.25
    rollout_guidance: float = 0.0
    rollout_steps: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.width < 4 or (self.width > 8 and self.width % 8) or self.images < 10 or self.steps < 1:
            raise Krea2Error("train-aesthetic needs width 4-8 or a multiple of 8 (GroupNorm groups), images >= 10 "
                             "and steps >= 1")
        if self.batch_size < 2 or self.warmup < 0 or self.rollout_steps < 1 or self.seed < 0:
            raise Krea2Error("train-aesthetic needs batch_size >= 2, warmup >= 0, rollout_steps >= 1 and seed >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0) or not math.isfinite(self.rollout_guidance):
            raise Krea2Error("train-aesthetic needs a finite lr > 0 and a finite rollout_guidance")
        if not 0 < self.holdout < 0.5 or not 0 <= self.label_smoothing < 0.5 or not 0 <= self.preset_fraction <= 1:
            raise Krea2Error("train-aesthetic needs holdout in (0, 0.5), label_smoothing in [0, 0.5) and "
                             "preset_fraction in [0, 1]")


class AestheticNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] (any side >= 8) -> (B,) logits of "a ground-truth render".

    Two full-resolution convs (what separates a sample from a render lives at single pixels: soft or wobbly edges,
    off-palette fills, stray fragments), two stride-2 convs, GroupNorm, then the mean and the max over positions
    (a mean alone dilutes one bad edge in a mostly empty canvas; measured: held-out accuracy 0.57 with stride 2 from
    the first layer and a mean pool, 0.91 with this net).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        chans, layers = [3, width, width, 2 * width, 2 * width], []
        for i, stride in enumerate((1, 1, 2, 2)):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=stride, padding=1),
                       nn.GroupNorm(min(8, chans[i + 1]), chans[i + 1]), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips and quarter turns: what is drawn matters, not where."""
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return torch.rot90(x, int(torch.randint(4, (), generator=generator)), dims=(2, 3))


def _to_tensor(arrays: Sequence[np.ndarray]) -> Tensor:
    """N arrays (H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def quantize(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same on the 8-bit grid (as a saved image, and as renders are): the classifier
    trains and scores on this, so a sample's off-grid floats can never be its cue. NaN becomes -1 (black)."""
    from krea2.pipeline import to_uint8

    return torch.from_numpy(to_uint8(images)).movedim(-1, -3).float() / 127.5 - 1


@torch.no_grad()
def _accuracy(net: AestheticNet, x: Tensor, y: Tensor) -> float:
    net.eval()
    logits = torch.cat([net(chunk) for chunk in x.split(256)])
    net.train()
    return float(((logits > 0).float() == y).float().mean())


def train_aesthetic(checkpoint: str, out: str | Path, cfg: AestheticConfig | None = None, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Train the classifier against `checkpoint`'s samples; write OUT/aesthetic.{safetensors,json}; return the report.

    Renders: `cfg.images` world scenes (1-4 objects, every style) at the checkpoint's resolution; samples: the model
    on one caption of each scene (short, medium or long at random), `preset_fraction` at its preset and the rest at
    `rollout_guidance` with `rollout_steps` steps. A random `holdout` fraction of scenes is never trained on; the
    report's `holdout_accuracy` is measured on them (both classes). TensorBoard logs in OUT/tb. Raises Krea2Error
    for an existing non-empty OUT without overwrite, and for bad config values.
    """
    from safetensors.torch import save_file

    from krea2.data.world import world_examples
    from krea2.models.checkpoint import publish_dir
    from krea2.pipeline import load_pipeline

    cfg = cfg or AestheticConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Krea2Error(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Krea2Error(f"{out} already exists; choose another --out or pass --overwrite")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise Krea2Error(f"{out}: a parent of it is a file; choose another --out")
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        net = AestheticNet(cfg.width)
    pipe = load_pipeline(checkpoint)
    size = pipe.resolution
    rng = np.random.default_rng(cfg.seed)
    examples = list(world_examples(cfg.images, size, seed=10_007 + cfg.seed))
    captions = [ex.captions[rng.choice(["short", "medium", "long"])] for ex in examples]
    renders = _to_tensor([np.asarray(ex.image) for ex in examples])
    half = int(round(cfg.preset_fraction * cfg.images))  # images [0, half) at the preset
    rollout = pipe.sampling_config(guidance=cfg.rollout_guidance, steps=cfg.rollout_steps)
    bar = tqdm(total=cfg.images, desc="sampling", unit="img", disable=not progress)
    chunks = []
    start = 0
    while start < cfg.images:  # image i: noise seed seed·1000003 + i, whatever the chunking
        stop = min(start + 64, half if start < half else cfg.images)
        seeds = [cfg.seed * 1_000_003 + i for i in range(start, stop)]
        chunks.append(quantize(pipe.generate(captions[start:stop], None if start < half else rollout, width=size,
                                             height=size, seeds=seeds)))
        bar.update(stop - start)
        start = stop
    bar.close()
    samples = torch.cat(chunks)
    order = torch.randperm(cfg.images, generator=torch.Generator().manual_seed(cfg.seed))  # held-out: both kinds
    samples, renders = samples[order], renders[order]

    n_train = cfg.images - max(1, int(round(cfg.holdout * cfg.images)))
    x_train = torch.cat([renders[:n_train], samples[:n_train]])
    y_train = torch.cat([torch.ones(n_train), torch.zeros(n_train)])
    x_test = torch.cat([renders[n_train:], samples[n_train:]])
    y_test = torch.cat([torch.ones(cfg.images - n_train), torch.zeros(cfg.images - n_train)])

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    target = y_train * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_tb = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tb"))  # copied in when published
    try:
        report = _fit(net, opt, x_train, target, x_test, y_test, gen, cfg, tmp_tb, progress)
        report = {"config": asdict(cfg), "checkpoint": checkpoint, "resolution": size, **report}

        def fill(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
            (tmp / CONFIG).write_text(json.dumps(report, indent=1) + "\n")
            shutil.copytree(tmp_tb, tmp / "tb")

        publish_dir(out, fill, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp_tb, ignore_errors=True)
    return report


def _fit(net: AestheticNet, opt, x_train: Tensor, target: Tensor, x_test: Tensor, y_test: Tensor,
         gen: torch.Generator, cfg: AestheticConfig, tb: Path, progress: bool) -> dict:
    """The training loop (BCE on smoothed labels, flips and quarter turns); returns the held-out figures."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb))
    bar = tqdm(total=cfg.steps, desc="train-aesthetic", unit="step", disable=not progress)
    for step in range(1, cfg.steps + 1):
        # linear warmup, then cosine to 0: a one-shot run
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(_augment(x_train[idx], gen)), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps:
            writer.add_scalar("aesthetic/loss", loss.item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 200 == 0 or step == cfg.steps:
            writer.add_scalar("aesthetic/holdout_accuracy", _accuracy(net, x_test, y_test), step)
        bar.update(1)
    bar.close()
    writer.close()
    net.eval()
    with torch.no_grad():
        p_test = torch.sigmoid(torch.cat([net(c) for c in x_test.split(256)]))
    n_test = len(y_test) // 2  # renders first, then samples
    return {"holdout_accuracy": _accuracy(net, x_test, y_test), "holdout_reward_renders": float(p_test[:n_test].mean()),
            "holdout_reward_samples": float(p_test[n_test:].mean())}


def load_aesthetic(folder: str | Path = SHIPPED) -> AestheticNet:
    """The classifier in FOLDER (aesthetic.safetensors + aesthetic.json), eval mode, cached per resolved folder and
    file version (a retrained classifier is reloaded). Raises Krea2Error if missing or not a classifier of this
    shape."""
    folder = Path(folder).resolve()
    stat = (folder / WEIGHTS).stat() if (folder / WEIGHTS).is_file() else None
    return _load_aesthetic(str(folder), stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _load_aesthetic(folder: str, version: tuple | None) -> AestheticNet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        if path == SHIPPED.resolve():
            raise Krea2Error("the shipped world_aesthetic classifier is not in this install (src/krea2/assets/"
                             "world_aesthetic); reinstall krea2, or train one (krea2 train-aesthetic --out DIR) and "
                             "use the reward world_aesthetic:DIR")
        raise Krea2Error(f"{path} has no {WEIGHTS} and {CONFIG}; train one with `krea2 train-aesthetic --out "
                         f"{path}`")
    try:
        cfg = AestheticConfig(**json.loads((path / CONFIG).read_text())["config"])
        net = AestheticNet(cfg.width)
        net.load_state_dict(load_file(str(path / WEIGHTS)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, Krea2Error) as e:
        raise Krea2Error(f"{path} is not a krea2 aesthetic classifier ({type(e).__name__}); retrain it with "
                         "`krea2 train-aesthetic`") from None
    return net.eval().requires_grad_(False)


def world_aesthetic(images: Tensor, records: Sequence[dict] | None = None, folder: str | Path = SHIPPED) -> Tensor:
    """P(ground-truth render | image) from the classifier in `folder`; records are not used (any prompt).

    images: (B, 3, H, W) in [-1, 1] (rounded to 8 bits first, as saved images and the training data are; NaN
    pixels read as black). Returns (B,) float32 in (0, 1) on images' device.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise Krea2Error(f"world_aesthetic needs images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    net = load_aesthetic(folder)
    x = quantize(images)
    with torch.no_grad():
        p = torch.sigmoid(torch.cat([net(c) for c in x.split(256)]))
    return p.to(images.device)
