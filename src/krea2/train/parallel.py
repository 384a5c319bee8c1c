"""Scale-out applied from outside the model: device mesh, tensor parallel, activation checkpointing, compile, FSDP2.

Order matters and follows torchtitan: TP rewrites the block Linears into DTensor shards, AC and compile wrap each
block's forward, and FSDP2 (`fully_shard` per block, then the root) shards what is left over the data-parallel mesh.
Parameter names stay the official ones throughout (no wrapper modules), so checkpoints and exports need no renames.
The model itself never imports torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from krea2.errors import Krea2Error

AC_MODES = ("none", "selective", "full")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ParallelConfig:
    """The `[parallel]` table of a recipe. dp_shard=-1 takes whatever world size the other degrees leave."""

    dp_replicate: int = 1  # HSDP replica groups (>1: shard inside a group, all-reduce across groups)
    dp_shard: int = -1
    tp: int = 1
    activation_checkpoint: str = "none"  # none | selective (save matmul/attention outputs) | full
    compile: bool = False  # torch.compile per block
    param_dtype: str = "bfloat16"  # FSDP2 compute dtype of the gathered params; master weights stay fp32
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # ZeRO-3; False keeps gathered params until backward (ZeRO-2, more memory)
    timeout_s: float = 600.0  # collective timeout of the process group

    def __post_init__(self):
        if self.activation_checkpoint not in AC_MODES:
            raise Krea2Error(f"activation_checkpoint={self.activation_checkpoint!r}; choose one of {AC_MODES}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise Krea2Error(f"{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
        for name in ("dp_replicate", "tp"):
            if getattr(self, name) < 1:
                raise Krea2Error(f"{name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise Krea2Error(f"dp_shard={self.dp_shard} must be >= 1, or -1 for the rest of the world size")

    @classmethod
    def from_dict(cls, d: dict) -> ParallelConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise Krea2Error(f"unknown [parallel] fields {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def resolve(self, world_size: int) -> ParallelConfig:
        """Fill dp_shard=-1 and check that the degrees multiply to the world size."""
        rest = self.dp_replicate * self.tp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % rest:
                raise Krea2Error(f"world size {world_size} is not divisible by dp_replicate*tp={rest}")
            dp_shard = world_size // rest
        if dp_shard * rest != world_size:
            raise Krea2Error(f"dp_replicate*dp_shard*tp = {self.dp_replicate}*{dp_shard}*{self.tp} "
                             f"= {dp_shard * rest}, but the world size is {world_size}")
        return replace(self, dp_shard=dp_shard)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- process group and mesh


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; a plain single process when there is none.

    CUDA ranks use NCCL for tensors plus gloo for CPU objects (async checkpoint saves need a CPU backend).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(cfg: ParallelConfig, world_size: int | None = None, device_type: str | None = None):
    """A 3-D mesh (dp_replicate, dp_shard, tp); size-1 dimensions are kept so code can always slice by name."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    cfg = cfg.resolve(world_size)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (cfg.dp_replicate, cfg.dp_shard, cfg.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def dp_mesh(mesh):
    """The mesh FSDP shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard alone."""
    return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def dp_rank_and_size(mesh=None) -> tuple[int, int]:
    """This rank's data-parallel coordinate: TP peers share it (they must see the same samples)."""
    if mesh is None:
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()


# ---------------------------------------------------------------- data sharding


def shard_indices(n: int, rank: int, world: int) -> range:
    """Sample indices rank `rank` of `world` reads: a contiguous block, disjoint across ranks, same every run.

    The tail that does not divide evenly is dropped so every rank runs the same number of steps (a rank with one
    extra batch would wait forever in a collective).
    """
    if not 0 <= rank < world:
        raise Krea2Error(f"rank {rank} is outside a world of {world}")
    per = n // world
    return range(rank * per, (rank + 1) * per)


def rank_slice(batch, rank: int, world: int):
    """This rank's share of a global batch: a tensor, or a dataclass/dict/tuple of tensors split on dim 0."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world:
            raise Krea2Error(f"global batch {batch.shape[0]} is not divisible by {world} data-parallel ranks")
        per = batch.shape[0] // world
        return batch[rank * per:(rank + 1) * per]
    if isinstance(batch, dict):
        return {k: rank_slice(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(rank_slice(v, rank, world) for v in batch)
    if hasattr(batch, "__dataclass_fields__"):
        return replace(batch, **{k: rank_slice(getattr(batch, k), rank, world) for k in batch.__dataclass_fields__})
    return batch  # scalars, strings: the same on every rank


# ---------------------------------------------------------------- tensor parallel


def _replicate_params(name: str, mod: nn.Module, mesh) -> None:
    """distribute_module's partition_fn: the module's own parameters become replicated DTensors, frozen flags kept
    (a LoRA stage freezes the base; a fresh nn.Parameter would make it trainable again)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    for pname, p in list(mod.named_parameters(recurse=False)):
        mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]),
                                                 requires_grad=p.requires_grad))


def _head_shared_style():
    """A TP style for QK-norm: its scale is shared by every head, but each TP rank holds only its own heads.

    The scale becomes a replicated DTensor and q, k enter as head-sharded DTensors, so the backward sums the scale's
    gradient over all heads (an all-reduce over TP) instead of leaving each rank with a partial one.
    """
    from torch.distributed.tensor import DTensor, Shard, distribute_module
    from torch.distributed.tensor.parallel.style import ParallelStyle

    class HeadShardedNorm(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            def inputs_as_head_shards(mod, inputs, mesh):
                return tuple(DTensor.from_local(x, mesh, [Shard(1)], run_check=False) for x in inputs)

            def outputs_to_local(mod, outputs, mesh):
                return tuple(o.to_local() for o in outputs)

            return distribute_module(module, device_mesh, _replicate_params, inputs_as_head_shards,
                                     outputs_to_local)

    return HeadShardedNorm()


def _replicated_lora_a_style():
    """A TP style for the LoRA A of a column-parallel Linear: A (rank x in) is replicated, its output stays a
    replicated DTensor so the column-parallel B that follows takes it as is. In backward each TP rank holds the
    gradient of its own output shard only: a Partial DTensor, which FSDP2 (always applied over a mesh by
    `parallelize_dit`) redistributes to Replicate, i.e. sums over TP, before the optimiser sees it."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel.style import ParallelStyle

    class ReplicatedLoRAA(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            def inputs_replicated(mod, inputs, mesh):
                return tuple(x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()],
                                                                                 run_check=False) for x in inputs)

            return distribute_module(module, device_mesh, _replicate_params, inputs_replicated)

    return ReplicatedLoRAA()


def lora_tensor_parallel_plan(block: nn.Module, plan: dict) -> dict:
    """The TP plan of a block whose Linears may be wrapped in peft LoRA layers (`base_layer`, `lora_A[k]`,
    `lora_B[k]`; the official names stay as prefixes, so the plan keys stay the official ones).

    Column-parallel W (out split): base W column-wise, A replicated, B column-wise, so B A x lands on the same output
    shard as W x. Row-parallel W (in split): base W row-wise, A row-wise (its partial rank-r outputs all-reduced),
    B a plain replicated Linear fed the same replicated input on every TP rank (identical gradients, no collective).
    Unwrapped Linears keep their style. LoRA dropout would draw different masks on TP peers; the trainer refuses it.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    out = {}
    for name, style in plan.items():
        module = block.get_submodule(name)
        if not hasattr(module, "base_layer") or not isinstance(style, (ColwiseParallel, RowwiseParallel)):
            out[name] = style
            continue
        out[f"{name}.base_layer"] = style
        for key in module.lora_A:
            if isinstance(style, ColwiseParallel):
                out[f"{name}.lora_A.{key}"] = _replicated_lora_a_style()
                out[f"{name}.lora_B.{key}"] = ColwiseParallel()
            else:
                out[f"{name}.lora_A.{key}"] = RowwiseParallel()
    return out


def _check_tp_divides(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    checks = {"heads": cfg.heads, "kvheads": cfg.kvheads, "txtheads": cfg.txtheads, "txtkvheads": cfg.txtkvheads}
    for name, n in checks.items():
        if n % tp:
            raise Krea2Error(f"tp={tp} does not divide {name}={n}; each TP rank must hold whole heads")


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP on every block and text-fusion block: q/k/v/gate and SwiGLU gate/up split column-wise
    (whole query and KV heads per rank, so GQA groups stay local), wo and down row-wise (one all-reduce each).
    Embeddings, `tproj` and `last` stay replicated over TP (FSDP still shards them). Linears wrapped in LoRA layers
    (a `[stages.lora]` stage) follow `lora_tensor_parallel_plan`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _check_tp_divides(model, tp_mesh.size())
    plan = {
        "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
        "attn.gate": ColwiseParallel(), "attn.wo": RowwiseParallel(), "attn.qknorm": _head_shared_style(),
        "mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(),
    }
    fusion = [*model.txtfusion.layerwise_blocks, *model.txtfusion.refiner_blocks]
    for block in [*model.blocks, *fusion]:
        parallelize_module(block, tp_mesh, lora_tensor_parallel_plan(block, plan))


# ---------------------------------------------------------------- activation checkpointing and compile


def _save_matmuls_policy():
    """Selective AC: keep matmul and attention outputs, recompute the cheap elementwise ops (norms, gates, RoPE)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(module: nn.Module, mode: str) -> None:
    """Wrap the module's forward in place (no wrapper module, so parameter names are unchanged)."""
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = None
    if mode == "selective":
        context_fn = partial(create_selective_checkpoint_contexts, _save_matmuls_policy())
    inner = module.forward
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}

    def forward(*args, **kw):
        return checkpoint(inner, *args, **kwargs, **kw)

    module.forward = forward


# ---------------------------------------------------------------- FSDP2 and the whole recipe


def mixed_precision(cfg: ParallelConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])


def parallelize_dit(model: nn.Module, mesh, cfg: ParallelConfig) -> nn.Module:
    """Apply TP, AC, per-block compile and FSDP2 to a DiT in place; mesh=None applies only AC and compile.

    Returns the same module (its parameters become DTensors when a mesh is given).
    """
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    blocks = [*model.blocks, *model.txtfusion.layerwise_blocks, *model.txtfusion.refiner_blocks]
    for block in blocks:
        apply_activation_checkpointing(block, cfg.activation_checkpoint)
        if cfg.compile:
            block.compile(fullgraph=False)  # per block: repeated structure compiles once, small graphs
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    shard_mesh, mp = dp_mesh(mesh), mixed_precision(cfg)
    for i, block in enumerate(blocks):
        # the last block is gathered again at the start of backward anyway: keeping it saves one all-gather
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    return model


def parallelize_text_encoder(encoder: nn.Module, mesh, cfg: ParallelConfig) -> nn.Module:
    """Shard the frozen text encoder with FSDP2 (per decoder layer, then root), as the release does.

    Frozen: no grads, eval mode; parameters gathered in param_dtype per layer and freed after its forward.
    """
    encoder.eval().requires_grad_(False)
    if mesh is None:
        return encoder
    from torch.distributed.fsdp import fully_shard

    shard_mesh, mp = dp_mesh(mesh), mixed_precision(cfg)
    layers = [m for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")]
    for layer_list in layers:
        for layer in layer_list:
            fully_shard(layer, mesh=shard_mesh, mp_policy=mp)
    fully_shard(encoder, mesh=shard_mesh, mp_policy=mp)
    return encoder


def replicate_autoencoder(autoencoder: nn.Module, device: torch.device) -> nn.Module:
    """The VAE is small and only encodes: a full frozen copy on every rank (as the release does), no collectives."""
    return autoencoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also works when FSDP+TP leave gradients on different meshes.

    TP'd Linears hold 2-D (dp, tp) DTensor grads while norms, modulation and embeddings hold 1-D dp ones; DTensor
    cannot combine the two, so each mesh's norm is reduced over its own ranks first, then the norms are combined.
    Returns the total norm as a plain tensor (identical on every rank).
    """
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not norms:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(norms, norm_type)
    for params in groups.values():  # per mesh: foreach kernels cannot mix meshes either
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def all_reduce_mean(value: float | torch.Tensor, group=None) -> float:
    """Average a scalar metric over ranks (loss, grad norm are per-rank until reduced); identity in one process."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().cpu()  # CPU: gloo serves it on every setup
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t = t / dist.get_world_size(group)
    return float(t)
