"""The Krea 2 single-stream DiT, tensor-for-tensor the released architecture.

Module and parameter names are the official ones (`first`, `blocks.N.attn.wq`, `txtfusion.projector`, ...), so
released checkpoints load with strict=True and ours load in the official code and diffusers' single-file loader.
Differences from the official forward that leave outputs identical (fp32 parity <= 1e-5 with the release fixtures and
diffusers), all to do less work:
- no padding of the joint sequence to 256; text padding slots dropped (`compact_text`) and the layer-wise text
  fusion run on valid tokens only; a key-only attention mask, dropped entirely when every token is valid;
- the last block computes queries, output and MLP for image tokens only (text outputs there are never read);
- RoPE tables cached across calls;
- norm + modulation as one autograd Function with a hand-written backward, written straight in the matmul dtype
  under autocast (one cast instead of one per Linear); the residual stream keeps its dtype and takes bf16 branch
  outputs through type promotion, without separate casts;
- on CPU in bf16, grouped-matmul attention instead of the flash kernel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DiTConfig:
    """Architecture fields under the official names (the `model` block of a release config.json)."""

    features: int = 6144
    tdim: int = 256
    txtdim: int = 2560
    heads: int = 48
    kvheads: int = 12
    multiplier: int = 4
    layers: int = 28
    patch: int = 2
    channels: int = 16
    bias: bool = False
    theta: float = 1000.0
    txtlayers: int = 12
    txtheads: int = 20
    txtkvheads: int = 20
    txtblocks: int = 2  # layerwise and refiner blocks each; 2 in the release (not an official config field)

    def __post_init__(self):
        # every field typed and in range first: a 4.0 or "4" would otherwise fail deep inside torch
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
            elif f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be true or false, got {v!r}")
            elif f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"{f.name} must be a positive number, got {v!r}")
        for name, heads in (("features", self.heads), ("txtdim", self.txtheads)):
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its head count {heads}")
        if self.heads % self.kvheads or self.txtheads % self.txtkvheads:
            raise ValueError("query heads must be a multiple of kv heads (GQA)")
        if self.head_dim % 16 or self.head_dim < 16:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 16 for the 3-axis RoPE split")

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiT config fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.features // self.heads

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        d = self.head_dim
        return (d - 12 * (d // 16), 6 * (d // 16), 6 * (d // 16))


def swiglu_hidden(dim: int, multiplier: int) -> int:
    """SwiGLU width: int(2d/3)·multiplier rounded up to a multiple of 128 (6144 -> 16384, 2560 -> 6912)."""
    return -(-int(2 * dim / 3) * multiplier // 128) * 128


PRESETS: dict[str, DiTConfig] = {
    "krea2-12b": DiTConfig(),
    # the reference fixture's shape: the smallest model that exercises every code path
    "tiny": DiTConfig(features=64, tdim=32, txtdim=32, heads=4, kvheads=2, layers=2, channels=4, txtlayers=3,
                      txtheads=2, txtkvheads=2),
    # benchmark configuration of the core issue (dit_step.py)
    "bench": DiTConfig(features=512, tdim=256, txtdim=256, heads=8, kvheads=2, layers=4, channels=16, txtlayers=3,
                       txtheads=2, txtkvheads=2),
    # pixel-space models for the embedded world with the MiniLM encoder (384 wide, 3 taps)
    "tiny-world": DiTConfig(features=64, tdim=32, txtdim=384, heads=4, kvheads=2, layers=2, patch=2, channels=3,
                            txtlayers=3, txtheads=6, txtkvheads=6, txtblocks=1),
    # the embedded world's base model: pixel space, patch 4 (one token = 4x4 px), MiniLM text (384 wide, 3 taps)
    "world-s": DiTConfig(features=192, tdim=128, txtdim=384, heads=3, kvheads=1, multiplier=3, layers=6, patch=4,
                         channels=3, txtlayers=2, txtheads=3, txtkvheads=3, txtblocks=1),
    # world-s in the world autoencoder's latent space (32 channels, 4x) with patch 2, as the release: 64 px = 64 tokens
    "world-s-latent": DiTConfig(features=192, tdim=128, txtdim=384, heads=3, kvheads=1, multiplier=3, layers=6,
                                patch=2, channels=32, txtlayers=2, txtheads=3, txtkvheads=3, txtblocks=1),
    "world-m": DiTConfig(features=256, tdim=128, txtdim=384, heads=4, kvheads=2, layers=6, patch=4, channels=3,
                         txtlayers=3, txtheads=3, txtkvheads=3, txtblocks=1),
}


def get_config(name_or_dict: str | dict | DiTConfig) -> DiTConfig:
    if isinstance(name_or_dict, DiTConfig):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return DiTConfig.from_dict(name_or_dict)
    if name_or_dict not in PRESETS:
        raise KeyError(f"unknown DiT preset {name_or_dict!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name_or_dict]


# ---------------------------------------------------------------- functional pieces


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] scaled by 1000, cosine first, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = 1000.0 * t.float()[:, None] * freqs
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def rope_table(pos: Tensor, axes: tuple[int, ...], theta: float) -> Tensor:
    """Rotations (B, 1, L, head_dim/2, 2) as fp32 (cos, sin) for 3-axis positions (B, L, 3); angles in float64.

    Real-valued so the table slices and compiles like any tensor; eager views it as complex64 for free.
    """
    parts = []
    for a, d in enumerate(axes):
        omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        parts.append(pos[..., a].double()[..., None] * omega)
    angles = torch.cat(parts, dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()[:, None]


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate adjacent pairs (x_2j, x_2j+1) in fp32; returns x's dtype.

    Eager: one complex multiply (a single pass). Under torch.compile the same product written out in reals, since
    inductor cannot generate code for complex ops and would fall back to eager kernels around them.
    """
    if torch.compiler.is_compiling():
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rot.unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.view_as_complex(rot)).flatten(-2).to(x.dtype)


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero-centred RMSNorm in fp32: x / rms(x) * (1 + scale)."""
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + scale.float(), eps)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention, q (B,H,Lq,D), k/v (B,KV,L,D) with H a multiple of KV (GQA), mask (B,1,1,L) bool or None.

    bf16 on CPU: grouped batched matmuls (2x faster than the CPU flash kernel at these lengths; each KV head serves
    its query group without repeating K/V). Everywhere else: SDPA, which picks flash/cuDNN kernels on GPUs.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    B, H, Lq, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    # scores = bias + D^-0.5 q k^T in one GEMM per (sample, KV head): the mask as an additive -inf bias and the
    # softmax scale as alpha, so neither costs a pass over the scores (nor a masked_fill copy in the backward)
    bias = q.new_zeros(B, 1, 1, L)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    s = torch.baddbmm(bias.expand(B, KV, 1, L).reshape(B * KV, 1, L), q.reshape(B * KV, (H // KV) * Lq, D),
                      k.reshape(B * KV, L, D).transpose(1, 2), beta=1.0 if mask is not None else 0.0, alpha=D**-0.5)
    p = torch.softmax(s, dim=-1)  # the bf16 kernel accumulates in fp32: no fp32 copy of the scores
    return torch.bmm(p, v.reshape(B * KV, L, D)).view(B, H, Lq, D)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls will run in: autocast's when it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ModulatedRMSNorm(torch.autograd.Function):
    """u = h / rms(h) * coef + shift, computed in fp32 and written straight in the matmul dtype.

    coef = (1 + norm gain)(1 + modulation scale) and shift are per sample (B, 1, D). Autograd over the plain chain
    (fp32 copy, rms_norm's pow/mean/rsqrt/mul, gain, addcmul, cast, then one cast per consuming Linear under
    autocast) keeps every intermediate and replays each in the backward; this keeps only h and the row rstd.
    """

    @staticmethod
    def forward(ctx, h: Tensor, coef: Tensor, shift: Tensor | None, eps: float, dtype: torch.dtype) -> Tensor:
        hf = h.float()
        # vector_norm reads h once without a squared temporary; rstd = 1 / sqrt(mean(h^2) + eps)
        rstd = torch.linalg.vector_norm(hf, dim=-1, keepdim=True).square_().div_(h.shape[-1]).add_(eps).rsqrt_()
        u = torch.empty(h.shape, dtype=dtype, device=h.device)
        if shift is None:
            torch.mul(hf * rstd, coef, out=u)  # fp32 math, one rounding on store
        else:
            torch.addcmul(shift, hf * rstd, coef, out=u)
        ctx.save_for_backward(h, rstd, coef)
        return u

    @staticmethod
    def backward(ctx, g: Tensor):
        h, rstd, coef = ctx.saved_tensors
        x = h.float() * rstd
        # per-sample (B, 1, D) coef/shift: sum over tokens; autograd reduces further for broadcast (D,) gains
        grad_shift = g.sum(1, keepdim=True, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        grad_coef = (g * x).sum(1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_h = None
        if ctx.needs_input_grad[0]:  # not for the text-fusion input, which has no gradient
            gx = g * coef
            # d/dh of x = h * rstd: rstd * (gx - x * mean(gx * x))
            grad_h = torch.addcmul(gx, x, (gx * x).mean(-1, keepdim=True), value=-1).mul_(rstd).to(h.dtype)
        return grad_h, grad_coef, grad_shift, None, None


def modulated_norm(h: Tensor, norm: RMSNorm, scale: Tensor, shift: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(1 + scale) * norm(h) + shift in fp32, returned in `dtype` (default h's); scale/shift (B, 1, D) fp32."""
    coef = (1.0 + norm.scale.float()) * (1.0 + scale)
    return ModulatedRMSNorm.apply(h, coef, shift, norm.eps, dtype or h.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalised x in the dtype of the matmul that consumes it."""
        return ModulatedRMSNorm.apply(x, 1.0 + self.scale.float(), None, self.eps, compute_dtype(x))


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.qnorm = RMSNorm(head_dim)
        self.knorm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        # kept in fp32 for RoPE; a module call (not inline) so tensor parallelism can replicate the shared scales
        return rms_norm(q, self.qnorm.scale, self.qnorm.eps), rms_norm(k, self.knorm.scale, self.knorm.eps)


class Attention(nn.Module):
    """GQA self-attention with per-head QK-norm, optional RoPE and an elementwise sigmoid output gate."""

    def __init__(self, dim: int, heads: int, kvheads: int, bias: bool = False):
        super().__init__()
        self.heads, self.kvheads, self.head_dim = heads, kvheads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=bias)
        self.wk = nn.Linear(dim, kvheads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, kvheads * self.head_dim, bias=bias)
        self.gate = nn.Linear(dim, dim, bias=bias)
        self.qknorm = QKNorm(self.head_dim)
        self.wo = nn.Linear(dim, dim, bias=bias)

    def forward(self, u: Tensor, rot: Tensor | None, mask: Tensor | None, start: int = 0) -> Tensor:
        """Keys/values from every token of u, queries (and the output) only from token `start` on."""
        uq = u[:, start:]
        # (B, L, heads * hd) -> (B, heads, L, hd); no sizes computed from `start` (keeps compiled shapes simple)
        q = self.wq(uq).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        k = self.wk(u).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        v = self.wv(u).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        q, k = self.qknorm(q, k)
        if rot is not None:
            q, k = apply_rope(q, rot[:, :, start:]), apply_rope(k, rot)
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = attention(q, k, v, mask)
        o = o.transpose(1, 2).flatten(2)
        return self.wo(o * torch.sigmoid(self.gate(uq)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, u: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(u)) * self.up(u))


class Modulation(nn.Module):
    """Per-block learned bias on the shared `tproj` output (official name `mod.lin`)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.lin = nn.Parameter(torch.zeros(n * dim))


class Block(nn.Module):
    """Single-stream block over [text; image]: modulated gated attention, then modulated SwiGLU."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.features
        self.mod = Modulation(d, 6)
        self.prenorm = RMSNorm(d)
        self.postnorm = RMSNorm(d)
        self.attn = Attention(d, cfg.heads, cfg.kvheads, cfg.bias)
        self.mlp = MLP(d, swiglu_hidden(d, cfg.multiplier), cfg.bias)

    def forward(self, h: Tensor, tv: Tensor, rot: Tensor, mask: Tensor | None, start: int = 0) -> Tensor:
        """start > 0 returns only tokens start.. (the last block: text outputs are never read, skip their work)."""
        a1, b1, g1, a2, b2, g2 = (tv.float() + self.mod.lin.float()).chunk(6, dim=-1)
        dtype = compute_dtype(h)  # norm outputs go straight to the matmul dtype: one cast, not one per Linear
        u = modulated_norm(h, self.prenorm, a1, b1, dtype)
        # the residual stream keeps its dtype; addcmul promotes a bf16 branch output without a separate cast
        h = torch.addcmul(h[:, start:], g1.to(h.dtype), self.attn(u, rot, mask, start))
        u = modulated_norm(h, self.postnorm, a2, b2, dtype)
        return torch.addcmul(h, g2.to(h.dtype), self.mlp(u))


class FusionBlock(nn.Module):
    """Text-fusion block: pre-norm gated attention and SwiGLU, no modulation, no RoPE."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.txtdim
        self.prenorm = RMSNorm(d)
        self.postnorm = RMSNorm(d)
        self.attn = Attention(d, cfg.txtheads, cfg.txtkvheads, cfg.bias)
        self.mlp = MLP(d, swiglu_hidden(d, cfg.multiplier), cfg.bias)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.prenorm(x), None, mask)  # a bf16 branch output is promoted, x keeps its dtype
        return x + self.mlp(self.postnorm(x))


class TextFusion(nn.Module):
    """Multilayer feature aggregation: attend across the tapped layers per token, collapse them, refine over tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList([FusionBlock(cfg) for _ in range(cfg.txtblocks)])
        self.projector = nn.Linear(cfg.txtlayers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([FusionBlock(cfg) for _ in range(cfg.txtblocks)])

    def forward(self, ctx: Tensor, txtmask: Tensor | None) -> Tensor:
        """ctx (B, L, txtlayers, txtdim), txtmask (B, L) bool or None -> (B, L, txtdim); padded slots come out as
        garbage that no valid token ever reads."""
        B, L, n, d = ctx.shape
        x = ctx.reshape(B * L, n, d)
        # the layer-wise pass is per token: run it on valid tokens only and leave padded slots zero
        keep = None if txtmask is None or bool(txtmask.all()) else txtmask.reshape(-1).nonzero().squeeze(1)
        if keep is not None:
            x = x[keep]
        for blk in self.layerwise_blocks:
            x = blk(x, None)
        x = self.projector(x.transpose(-1, -2)).squeeze(-1)
        if keep is not None:
            x = x.new_zeros(B * L, d).index_copy(0, keep, x)
        x = x.reshape(B, L, d)
        mask = key_mask(txtmask)
        for blk in self.refiner_blocks:
            x = blk(x, mask)
        return x


class LastLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.features)
        self.modulation = nn.Module()
        self.modulation.lin = nn.Parameter(torch.zeros(2, cfg.features))
        self.linear = nn.Linear(cfg.features, cfg.token_dim, bias=True)

    def forward(self, h: Tensor, tt: Tensor) -> Tensor:
        m = tt.float() + self.modulation.lin.float()[:, None, None, :]  # (2, B, 1, F): same tt in both rows
        return self.linear(modulated_norm(h, self.norm, m[0], m[1], compute_dtype(h)))


def key_mask(mask: Tensor | None) -> Tensor | None:
    """Joint validity (B, L) -> SDPA key mask (B, 1, 1, L); None when every token is valid (faster kernels)."""
    if mask is None:
        return None
    mask = mask.bool()
    return None if bool(mask.all()) else mask[:, None, None, :]


def compact_text(context: Tensor, pos: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Move each caption's valid text tokens to the front and drop the text columns that are padding in every caption.

    Exact: tokens keep their own positions, attention does not care about key order, text fusion has no positions
    and only image tokens are returned. Released captions are padded to 512 slots, mostly padding, and the empty
    uncond caption has 5 valid tokens: this removes most of the text work. Returns the inputs when nothing drops.
    """
    Lt = context.shape[1]
    if mask is None:
        return context, pos, mask
    txt = mask[:, :Lt].bool()
    keep = int(txt.sum(1).max())
    if keep == Lt:
        return context, pos, mask
    order = torch.argsort((~txt).to(torch.uint8), dim=1, stable=True)[:, :keep]  # valid first, in their order
    context = context.gather(1, order[:, :, None, None].expand(-1, -1, *context.shape[2:]))
    pos = torch.cat([pos[:, :Lt].gather(1, order[..., None].expand(-1, -1, pos.shape[-1])), pos[:, Lt:]], dim=1)
    return context, pos, torch.cat([txt.gather(1, order), mask[:, Lt:].bool()], dim=1)


class DiT(nn.Module):
    """model(img, context, t, pos, mask) -> velocity of the image tokens (official argument order)."""

    def __init__(self, cfg: DiTConfig | str | dict = "krea2-12b"):
        super().__init__()
        cfg = get_config(cfg)
        self.cfg = cfg
        d = cfg.features
        self.first = nn.Linear(cfg.token_dim, d, bias=True)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.tmlp = nn.Sequential(nn.Linear(cfg.tdim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(d, 6 * d))
        self.txtfusion = TextFusion(cfg)
        self.txtmlp = nn.Sequential(RMSNorm(cfg.txtdim), nn.Linear(cfg.txtdim, d), nn.GELU(approximate="tanh"),
                                    nn.Linear(d, d))
        self.last = LastLayer(cfg)
        self._rope_cache: list[tuple[Tensor, Tensor]] = []

    def rope(self, pos: Tensor) -> Tensor:
        """RoPE table for positions, reused while the positions repeat (every step of a sampler or a bucket).

        Two entries: a guided sampler alternates the cond and uncond passes, whose compacted text lengths differ.
        """
        for p, rot in self._rope_cache:
            if p.shape == pos.shape and p.device == pos.device and torch.equal(p, pos):
                return rot
        rot = rope_table(pos, self.cfg.rope_axes, self.cfg.theta)
        self._rope_cache = [(pos.clone(), rot), *self._rope_cache[:1]]
        return rot

    def condition(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Timestep -> (tt, tv): the tmlp output (used by `last`) and the shared modulation vector."""
        tt = self.tmlp(timestep_embedding(t, self.cfg.tdim).to(dtype))[:, None]
        return tt, self.tproj(tt)

    def embed_text(self, context: Tensor, txtmask: Tensor | None) -> Tensor:
        return self.txtmlp(self.txtfusion(context, txtmask))

    def forward(self, img: Tensor, context: Tensor, t: Tensor, pos: Tensor, mask: Tensor | None = None,
                return_hidden: int | None = None, reference: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """img (B,N,C·p·p); context (B,Lt,txtlayers,txtdim); t (B,); pos (B,Lt+N,3); mask (B,Lt+N) bool.

        The joint sequence has named segments in order [text; reference; image]. `reference` (B,Nr,features):
        tokens already in the model's width (a style adapter's output), placed between text and image; pos and mask
        then cover Lt+Nr+N (see `krea2.sampling.joint_inputs`). None (the release) leaves the sequence unchanged.
        With return_hidden=k, also returns the image tokens after block k (1-based), for representation alignment.
        """
        context, pos, mask = compact_text(context, pos, mask)
        Lt, N = context.shape[1], img.shape[1]
        tt, tv = self.condition(t, self.first.weight.dtype)
        c = self.embed_text(context, None if mask is None else mask[:, :Lt])
        segments = [c.to(img.dtype), self.first(img).to(img.dtype)]
        if reference is not None:
            segments.insert(1, reference.to(img.dtype))
        h = torch.cat(segments, dim=1)
        rot, kmask = self.rope(pos), key_mask(mask)
        # outputs of the last block other than the image tokens are never read: it runs queries and MLP for image
        # tokens only. Not when the block is compiled (nn.Module.compile): its query start then differs from the
        # other blocks' 0, becomes a dynamic int and trips inductor's shape algebra (torch 2.13)
        last = len(self.blocks) - 1
        start = 0 if getattr(self.blocks[last], "_compiled_call_impl", None) is not None else h.shape[1] - N
        hidden = None
        for i, blk in enumerate(self.blocks):
            h = blk(h, tv, rot, kmask, start=start if i == last else 0)
            if return_hidden == i + 1:
                hidden = h[:, -N:]
        out = self.last(h[:, -N:], tt)
        return (out, hidden) if return_hidden is not None else out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
