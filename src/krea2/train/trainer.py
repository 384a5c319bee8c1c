"""One trainer for every stage: the loop, optimiser, LR schedule, checkpoints, averaging, logging and samples.

The objective (flow matching with optional iREPA, ...) computes the loss; the trainer never looks inside it.
Everything random in a step is derived from (seed, step), so `--resume` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, get_config
from krea2.models.loading import infer_config, load_dit, read_shapes
from krea2.pipeline import (
    Pipeline,
    image_grid,
    read_checkpoint_dir,
    resolve_checkpoint,
    sampling_from_dict,
    write_checkpoint_dir,
)
from krea2.train import checkpoint as ckpt
from krea2.train import parallel
from krea2.train.config import Recipe, StageConfig
from krea2.train.data import StageData
from krea2.train.guard import GuardConfig, SpikeGuard
from krea2.train.health import HealthConfig, HealthMonitor, dit_train_flops, peak_flops
from krea2.train.objectives.flow import FlowMatching
from krea2.train.watchdog import Watchdog

NO_DECAY = ("bias", "mod.lin", "modulation.lin")


def init_weights(model: DiT) -> DiT:
    """From-scratch init: xavier Linears, zero biases, and zero modulation/output so every block starts as identity
    (adaLN-Zero: tproj outputs zero gates; `last.linear` outputs zero velocity)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.tmlp[0].weight, std=0.02)
    nn.init.normal_(model.tmlp[2].weight, std=0.02)
    for p in (model.tproj[1].weight, model.tproj[1].bias, model.last.linear.weight, model.last.linear.bias):
        nn.init.zeros_(p)
    return model


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decay on matrices and zero-centred norm gains (decay pulls them to identity); none on biases/modulation."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def wsd_lr(step: int, stage: StageConfig) -> float:
    """Warmup-stable-decay: linear warmup, plateau, linear decay to 0 over the last `decay` fraction."""
    warm = min(1.0, (step + 1) / max(1, stage.warmup))
    decay_steps = int(stage.decay * stage.steps)
    if decay_steps and step >= stage.steps - decay_steps:
        return stage.lr * warm * max(0.0, (stage.steps - step) / decay_steps)
    return stage.lr * warm


def average_state_dicts(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average (PMA merge) in fp32."""
    return {k: sum(sd[k].float() for sd in sds) / len(sds) for k in sds[0]}


class EMA(nn.Module):
    """Shadow weights as buffers, so they ride in the training checkpoint without entering the optimizer."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        for i, (_, p) in enumerate(model.named_parameters()):
            self.register_buffer(f"w{i}", p.detach().clone().float())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for i, p in enumerate(model.parameters()):
            getattr(self, f"w{i}").lerp_(p.detach().float(), 1 - self.decay)

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = dict(model.state_dict())
        sd.update({n: getattr(self, f"w{i}") for i, n in enumerate(self.names)})
        return sd


@dataclass
class Context:
    """What every stage shares: the recipe, the frozen encoders, the output folder, the process layout."""

    recipe: Recipe
    out: Path
    text_encoder: object
    autoencoder: object
    dist: parallel.DistInfo
    mesh: object = None
    progress: bool = True

    @property
    def sampling(self):
        return sampling_from_dict(self.recipe.sampling)


def stage_dir(ctx: Context, stage: StageConfig) -> Path:
    return ctx.out / stage.name


def write_output(ctx: Context, model: DiT, path: Path, sd: dict | None = None, resolution: int = 32) -> Path:
    if sd is not None:
        tmp = DiT(model.cfg)
        tmp.load_state_dict({k: v.to(tmp.state_dict()[k].dtype) for k, v in sd.items()})
        model = tmp
    return write_checkpoint_dir(path, model, ctx.recipe.text_encoder, ctx.recipe.autoencoder, ctx.recipe.sampling,
                                resolution)


def sample_grid(ctx: Context, model: DiT, stage: StageConfig, seed: int = 0):
    """Fixed prompts and seeds, so grids from successive steps are comparable."""
    prompts = ctx.recipe.sample_prompts or ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    was_training = model.training
    model.eval()
    pipe = Pipeline(model, ctx.text_encoder, ctx.autoencoder, ctx.sampling, stage.data.native)
    images = pipe.generate(prompts, seed=seed)
    model.train(was_training)
    return image_grid(images, cols=min(len(images), 8))


def train_stage(ctx: Context, stage: StageConfig, init: DiT, resume: bool) -> DiT:
    """Run one stage from `init`; writes <out>/<stage>/final (the stage's output) and returns the model."""
    sdir = stage_dir(ctx, stage)
    state_dir, final_dir = sdir / "state", sdir / "final"
    main = ctx.dist.is_main
    model = init.train()
    if model.cfg.channels != ctx.autoencoder.channels:
        raise Krea2Error(f"model has {model.cfg.channels} channels but the autoencoder {ctx.recipe.autoencoder} has "
                         f"{ctx.autoencoder.channels}")
    pixels_per_token = ctx.autoencoder.compression * model.cfg.patch
    objective = FlowMatching(stage.objective, model, ctx.sampling, pixels_per_token, stage.steps)
    ema = EMA(model, stage.ema) if stage.ema else None
    if ctx.dist.world_size > 1 or stage.activation_checkpoint != "none" or stage.compile:
        # an fp32 stage computes in fp32 on any number of ranks; bf16 stages use the recipe's FSDP param dtype
        param_dtype = "float32" if stage.precision == "fp32" else ctx.recipe.parallel.param_dtype
        pcfg = parallel.ParallelConfig(**{**ctx.recipe.parallel.__dict__,
                                          "activation_checkpoint": stage.activation_checkpoint,
                                          "compile": stage.compile, "param_dtype": param_dtype})
        model = parallel.parallelize_dit(model, ctx.mesh, pcfg.resolve(ctx.dist.world_size))
    trainable = nn.ModuleDict({"dit": model, "objective": objective})
    if ema is not None:
        trainable["ema"] = ema
    opt = torch.optim.AdamW(param_groups([trainable], stage.weight_decay), lr=stage.lr, betas=stage.betas,
                            eps=1e-8, fused=False)
    guard = SpikeGuard(GuardConfig(action=stage.guard))

    start = 0
    if state_dir.exists() and not resume:
        raise Krea2Error(f"{sdir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and ckpt.is_checkpoint(state_dir):
        extra = ckpt.load_training_state(state_dir, trainable, opt)
        start = int(extra["step"])
        guard.load_state_dict(extra.get("guard", {}))
        torch.set_rng_state(extra["torch_rng"])
        if main:
            print(f"[{stage.name}] resuming at step {start}")

    data = StageData(stage.data, stage.seed, ctx.text_encoder, ctx.autoencoder, unwrap(model).cfg.patch,
                     cache_dir=ctx.out / "cache", progress=ctx.progress and main)
    dp_rank, dp_size = parallel.dp_rank_and_size(ctx.mesh)
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        sdir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(ctx.out / "tb" / stage.name))
        losses_file = sdir / "losses.jsonl"
        keep = [line for line in (losses_file.read_text().splitlines() if losses_file.exists() else [])
                if json.loads(line)["step"] < start]  # steps after the checkpoint are redone identically
        losses_file.write_text("".join(line + "\n" for line in keep))
    autocast = (torch.autocast(ctx.dist.device.type, dtype=torch.bfloat16) if stage.precision == "bf16"
                else nullcontext())
    pma_dir = sdir / "pma"
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step", disable=not (ctx.progress and main),
               dynamic_ncols=True)
    t_last, samples_seen = time.perf_counter(), 0
    monitor = HealthMonitor(HealthConfig(port=metrics_port()), writer=writer, rank=ctx.dist.rank,
                            local_rank=ctx.dist.local_rank, tensorboard_skip=("loss", "grad_norm"))
    peak = peak_flops(torch.cuda.get_device_name()) if ctx.dist.device.type == "cuda" else None
    # a collective stalled past the process-group timeout: dump stacks and exit non-zero so the launcher restarts
    watchdog = Watchdog(ctx.recipe.parallel.timeout_s, sdir / f"hang-rank{ctx.dist.rank}.txt").start() \
        if ctx.dist.world_size > 1 else None
    for step in range(start, stage.steps):
        t_step = time.perf_counter()
        batch = data.batch(step, stage.batch_size, dp_rank, dp_size, device=ctx.dist.device)
        generator = torch.Generator(device=ctx.dist.device).manual_seed(hash((stage.seed, step, dp_rank)) % 2**63)
        for g in opt.param_groups:
            g["lr"] = wsd_lr(step, stage)
        with autocast:
            loss, metrics = objective(model, batch, step, generator)
        loss.backward()
        grad_norm = parallel.clip_grad_norm_(trainable.parameters(), stage.grad_clip)
        loss_value = parallel.all_reduce_mean(loss.detach())
        # judge the data-fit term: auxiliary terms (iREPA's −cos) can make the total negative
        verdict = guard.check(parallel.all_reduce_mean(metrics.get("loss/flow", loss.detach())), grad_norm)
        if verdict.ok:
            opt.step()
            if ema is not None:
                ema.update(model)
        else:
            monitor.record_bad_step(step, verdict.reason)
            if verdict.action == "rollback" and ckpt.is_checkpoint(state_dir):
                ckpt.load_training_state(state_dir, trainable, opt)  # weights back; data moves past the bad batch
                guard.reset_after_rollback()
            if main:
                tqdm.write(f"[{stage.name}] step {step}: {verdict.reason}; "
                           f"{'rolled back' if verdict.action == 'rollback' else 'step skipped'}")
        opt.zero_grad(set_to_none=True)
        dt_step = time.perf_counter() - t_step
        tokens = batch.x0.shape[0] * (batch.x0.shape[1] + batch.context.shape[1]) * dp_size
        flops = dit_train_flops(unwrap(model).cfg, batch.x0.shape[1], batch.context.shape[1]) * stage.batch_size
        monitor.log_step(step + 1, loss=loss_value, grad_norm=float(grad_norm), step_time_s=dt_step,
                         tokens_per_s=tokens / dt_step,
                         mfu=None if peak is None else flops / dt_step / (peak * ctx.dist.world_size))
        if watchdog is not None:
            watchdog.kick(f"step {step + 1}")
        samples_seen += stage.batch_size
        done = step + 1
        if main:
            with open(sdir / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_value}) + "\n")
            bar.set_postfix(flow=f"{float(metrics['loss/flow']):.4f}", lr=f"{wsd_lr(step, stage):.2e}")
            bar.update(1)
            if done % stage.log_every == 0 or done == stage.steps:
                dt = time.perf_counter() - t_last
                writer.add_scalar("train/loss", loss_value, done)
                writer.add_scalar("train/grad_norm", float(grad_norm), done)
                writer.add_scalar("train/lr", wsd_lr(step, stage), done)
                writer.add_scalar("train/samples_per_s", samples_seen / max(dt, 1e-9), done)
                for k, v in metrics.items():
                    writer.add_scalar(k, float(v), done)
                t_last, samples_seen = time.perf_counter(), 0
            if stage.sample_every and (done % stage.sample_every == 0 or done == stage.steps):
                grid = sample_grid(ctx, model, stage)
                (sdir / "samples").mkdir(exist_ok=True)
                grid.save(sdir / "samples" / f"step_{done:07d}.png")
                writer.add_image("samples", np.asarray(grid), done, dataformats="HWC")
        if stage.pma_k and done % stage.pma_every == 0 and done > stage.steps - stage.pma_k * stage.pma_every:
            sd = ckpt.full_state_dict(model)
            if main:
                from safetensors.torch import save_file

                pma_dir.mkdir(exist_ok=True)
                save_file(sd, str(pma_dir / f"step_{done:07d}.safetensors"))
        if done % stage.save_every == 0 or done == stage.steps:
            ckpt.save_training_state(state_dir, trainable, opt, {
                "step": done, "guard": guard.state_dict(), "torch_rng": torch.get_rng_state(), "stage": stage.name})
    bar.close()
    monitor.close()
    if watchdog is not None:
        watchdog.stop()

    # the stage's output: PMA merge of the last k snapshots, else EMA, else the raw weights
    sd = ckpt.full_state_dict(model)
    if main:
        write_output(ctx, unwrap(model), sdir / "last", sd, stage.data.native)
        if stage.pma_k:
            from safetensors.torch import load_file

            snaps = sorted(pma_dir.glob("step_*.safetensors"))[-stage.pma_k:]
            sd = average_state_dicts([load_file(str(p)) for p in snaps])
        elif ema is not None:
            sd = ema.state_for(unwrap(model))
        write_output(ctx, unwrap(model), final_dir, sd, stage.data.native)
        writer.close()
    barrier()
    out = load_dit(final_dir / "model.safetensors", unwrap(model).cfg)
    return out


def metrics_port() -> int | None:
    """Prometheus port from KREA2_METRICS_PORT (each local rank serves on port + local_rank); unset: no endpoint."""
    import os

    port = os.environ.get("KREA2_METRICS_PORT")
    return int(port) if port else None


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def unwrap(model: nn.Module) -> DiT:
    """The DiT under parallel wrappers (compile/AC keep the class; FSDP/TP keep the module tree)."""
    return getattr(model, "_orig_mod", model)


def recipe_model_config(recipe: Recipe):
    """The DiT config a recipe trains: its `init` checkpoint's (released files: read off the shapes), else its
    preset or explicit fields."""
    spec = dict(recipe.model)
    if "init" in spec:
        info = resolve_checkpoint(spec["init"])
        return info.model or infer_config(read_shapes(info.model_path))
    return get_config(spec["preset"]) if "preset" in spec else get_config(spec)


def initial_model(ctx: Context) -> DiT:
    init = ctx.recipe.model.get("init")
    if init:
        info = resolve_checkpoint(init)
        return load_dit(info.model_path, info.model)
    torch.manual_seed(ctx.recipe.stages[0].seed)
    return init_weights(DiT(recipe_model_config(ctx.recipe)))


def train_recipe(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run every stage in order; each starts from the previous stage's output. Returns <out>/final."""
    from krea2.models.autoencoders import load_autoencoder
    from krea2.models.text_encoders import load_text_encoder

    out = Path(out)
    dist = parallel.init_distributed()
    mesh = parallel.build_mesh(recipe.parallel.resolve(dist.world_size), dist.world_size) if dist.world_size > 1 \
        else None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str) + "\n")
    ctx = Context(recipe, out, load_text_encoder(recipe.text_encoder, device=dist.device),
                  load_autoencoder(recipe.autoencoder, device=dist.device), dist, mesh, progress)
    model = initial_model(ctx).to(dist.device)
    for stage in recipe.stages:
        final = stage_dir(ctx, stage) / "final"
        if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
            if dist.is_main:
                print(f"[{stage.name}] done earlier; using {final}")
            model = load_dit(final / "model.safetensors", read_checkpoint_dir(final).model).to(dist.device)
            continue
        model = train_stage(ctx, stage, model, resume)
    if dist.is_main:
        last = stage_dir(ctx, recipe.stages[-1]) / "final"
        target = out / "final"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(last, target)
    barrier()
    return out / "final"


def validate_recipe(recipe: Recipe) -> str:
    """Build every stage on the meta device (model, optimiser groups, schedule, data shapes) without running it."""
    cfg = recipe_model_config(recipe)
    with torch.device("meta"):
        model = DiT(cfg)
    groups = param_groups([model], 0.1)
    lines = [f"recipe {recipe.name}: {model.num_params():,} parameters, text encoder {recipe.text_encoder}, "
             f"autoencoder {recipe.autoencoder}, {len(groups[0]['params'])}+{len(groups[1]['params'])} tensors "
             "with/without weight decay"]
    compression = 1 if recipe.autoencoder == "identity" else 8
    for s in recipe.stages:
        unit = compression * cfg.patch
        bad = [r for r in s.data.resolutions if r % unit]
        if bad:
            raise Krea2Error(f"stage {s.name}: size(s) {bad} are not multiples of the token size {unit} px")
        tokens = "/".join(str((r // unit) ** 2) for r in s.data.resolutions)
        px = "/".join(str(r) for r in s.data.resolutions)
        lrs = [wsd_lr(k, s) for k in (0, s.warmup, s.steps - 1)]
        irepa = (f", iREPA on block {s.objective.irepa_layer} until step {s.objective.irepa_until or s.steps} "
                 f"(teacher {s.objective.irepa_teacher})") if s.objective.irepa else ""
        if s.objective.irepa and not 1 <= s.objective.irepa_layer <= cfg.layers:
            raise Krea2Error(f"stage {s.name}: irepa_layer {s.objective.irepa_layer} is outside 1..{cfg.layers}")
        lines.append(f"  {s.name}: {s.steps} steps x {s.batch_size}, {px}px = {tokens} tokens, "
                     f"{s.precision}, lr {lrs[0]:.2e} -> {lrs[1]:.2e} -> {lrs[2]:.2e}, data {s.data.source}{irepa}")
    return "\n".join(lines)
