"""One trainer for every stage: the loop, optimisers, LR schedule, spike guard, checkpoints, averaging, logging
and samples.

The objective (`train/objectives`, picked by name) owns its step; the model set (`train/models.py`) builds, places
and parallelises every model it asks for; the trainer names no objective and reads only the metrics the objective
names ("loss" and its `guard_metric`). Everything random in a step is derived from (seed, step), so `--resume`
reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from krea2.errors import Krea2Error
from krea2.models.checkpoint import (
    merge_state_dicts,
    read_checkpoint_dir,
    resolve_checkpoint,
    sampling_from_dict,
    write_checkpoint,
)
from krea2.models.dit import DiT, get_config
from krea2.models.loading import infer_config, load_dit, read_shapes
from krea2.pipeline import Pipeline, image_grid
from krea2.sampling import unpatchify
from krea2.train import checkpoint as ckpt
from krea2.train import parallel
from krea2.train.config import Recipe, StageConfig
from krea2.train.data import DATA_KINDS, build_data, token_count
from krea2.train.guard import GuardConfig, SpikeGuard
from krea2.train.health import HealthConfig, HealthMonitor, dit_train_flops, peak_flops
from krea2.train.lora import fold_lora, initial_adapters, initial_factors, lora_targets, lora_transform, save_adapters
from krea2.train.models import build_model_set, load_master_weights
from krea2.train.objectives import ObjectiveEnv, get_objective
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
        return sampling_from_dict(self.recipe.sampling_dict())


def stage_dir(ctx: Context, stage: StageConfig) -> Path:
    return ctx.out / stage.name


def write_output(ctx: Context, cfg, path: Path, sd: dict, resolution: int = 32) -> Path:
    """A stage's output folder in the release format; replaces the folder an interrupted earlier run left.
    Raises Krea2Error instead of publishing non-finite weights."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Krea2Error(f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}); nothing was "
                         "written. Lower the learning rate, or resume from an earlier checkpoint")
    config = {"model": cfg.to_dict(), "text_encoder": ctx.recipe.text_encoder,
              "autoencoder": ctx.recipe.autoencoder, "sampling": ctx.recipe.sampling_dict(),
              "resolution": resolution}
    return write_checkpoint(path, sd, config, dtype=torch.float32, overwrite=True)


SAMPLE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def sample_grid(ctx: Context, model: DiT, resolution: int, seed: int = 0):
    """Fixed prompts and seeds, so grids from successive steps are comparable."""
    prompts = ctx.recipe.sample_prompts or SAMPLE_PROMPTS
    was_training = model.training
    model.eval()
    pipe = Pipeline(model, ctx.text_encoder, ctx.autoencoder, ctx.sampling, resolution, ctx.dist.device)
    images = pipe.generate(prompts, seed=seed)
    model.train(was_training)
    return image_grid(images, cols=min(len(images), 8))


class TrainerContext:
    """The trainer's side of `StepContext`: what an objective's `step()` calls to update its models.

    One optimiser (AdamW) and one spike guard per name the objective declares; each optimiser's LR follows the
    stage's WSD schedule times its `lr_scale`. Bad steps are skipped, or rolled back by the loop after the step.
    """

    def __init__(self, stage: StageConfig, optimizers: dict, specs: dict, ema, policy: nn.Module,
                 device: torch.device, autoencoder=None, spike_test: bool = True):
        self.stage, self.optimizers, self.autoencoder = stage, optimizers, autoencoder
        self.lr_scales = {name: spec.lr_scale for name, spec in specs.items()}
        # in module order: the clipping norm sums per-tensor norms, and its rounding depends on the order
        self.params = {name: [p for m in spec.modules for p in m.parameters() if p.requires_grad]
                       for name, spec in specs.items()}
        factor = 3.0 if spike_test else math.inf  # inf: non-finite loss or grad norm only
        self.guards = {name: SpikeGuard(GuardConfig(action=stage.guard, spike_factor=factor)) for name in optimizers}
        self.ema, self.policy, self.device = ema, policy, device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if stage.precision == "bf16"
                         else nullcontext())
        self.begin(0)

    def begin(self, step: int) -> None:
        self.grad_norms, self.bad, self.rollback = {}, [], False
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = wsd_lr(step, self.stage) * self.lr_scales[name]

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def decode(self, tokens: Tensor, gh: int, gw: int) -> Tensor:
        """Image tokens (B, gh·gw, C·p·p) -> images (B, 3, H, W) in [-1, 1] through the recipe's autoencoder."""
        p = unwrap(self.policy).cfg.patch
        latent = unpatchify(tokens.float(), p, gh * p, gw * p)
        return self.autoencoder.decode(latent.to(self.device)).float().clamp(-1, 1)

    def all_reduce_mean(self, x: Tensor) -> Tensor:
        return torch.tensor(parallel.all_reduce_mean(x))

    def all_gather(self, x: Tensor) -> Tensor:
        """Concatenate x (B, ...) from every rank along dim 0, in rank order (identity in one process)."""
        if not torch.distributed.is_initialized():
            return x
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def optimizer_step(self, name: str, metric: Tensor) -> bool:
        opt = self.optimizers[name]
        grad_norm = parallel.clip_grad_norm_(self.params[name], self.stage.grad_clip)
        self.grad_norms[name] = float(grad_norm)
        verdict = self.guards[name].check(parallel.all_reduce_mean(metric), grad_norm)
        if verdict.ok:
            opt.step()
            if name == "policy" and self.ema is not None:
                self.ema.update(self.policy)
        else:
            self.bad.append(f"{name}: {verdict.reason}")
            self.rollback = self.rollback or verdict.action == "rollback"
        opt.zero_grad(set_to_none=True)
        return verdict.ok

    def state_dict(self) -> dict:
        return {name: g.state_dict() for name, g in self.guards.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, g in self.guards.items():
            g.load_state_dict(state.get(name, {}))


def build_optimizers(objective, models, stage: StageConfig) -> tuple[dict, dict]:
    """One AdamW per optimiser the objective declares (weight decay split by name); returns them and the specs."""
    specs = objective.optimizers(models)
    if "policy" not in specs:
        raise Krea2Error(f"objective {objective.name} declares no 'policy' optimiser")
    optimizers = {name: torch.optim.AdamW(param_groups(spec.modules, stage.weight_decay), lr=stage.lr,
                                          betas=stage.betas, eps=1e-8, fused=False)
                  for name, spec in sorted(specs.items())}
    return optimizers, specs


def objective_env(ctx: Context, cfg, stage: StageConfig, data_size: int | None = None) -> ObjectiveEnv:
    from krea2.models.text_encoders import encode_valid_rows, pad_rows
    from krea2.train.data import TEXT_PAD

    null = pad_rows(encode_valid_rows(ctx.text_encoder, [""]), multiple=TEXT_PAD, dtype=torch.float32,
                    device=ctx.dist.device)
    return ObjectiveEnv(cfg, ctx.sampling, ctx.autoencoder.compression * cfg.patch, stage.steps, data_size, null)


@dataclass
class StageRuntime:
    """A stage ready to step: its objective, model set, optimisers and the context handed to the objective."""

    objective: object
    mset: object
    optimizers: dict
    tctx: TrainerContext

    @property
    def opt_list(self) -> list:
        return [self.optimizers[k] for k in sorted(self.optimizers)]


def stage_objective(stage: StageConfig):
    """The stage's objective class, after checking that its data source gives the batch kind it reads."""
    cls = get_objective(stage.objective.name)
    if DATA_KINDS[stage.data.source] != cls.data_kind:
        raise Krea2Error(f"stage {stage.name}: objective {cls.name} reads {cls.data_kind} but data source "
                         f"{stage.data.source} gives {DATA_KINDS[stage.data.source]}")
    return cls


def check_frozen_start(recipe: Recipe) -> None:
    """A first stage that keeps the policy frozen (a style adapter) must start from a trained model: a freshly
    initialised DiT's output layer is zero, so no gradient reaches the adapter and nothing would train. One-line
    Krea2Error otherwise."""
    first = recipe.stages[0]
    if not recipe.model.init and not get_objective(first.objective.name).trains_policy:
        raise Krea2Error(f"stage {first.name}: objective {first.objective.name} trains against a frozen base, and "
                         "this recipe starts from a fresh model (whose zero output layer passes no gradient); set "
                         "[model] init = CHECKPOINT, or train the base in an earlier stage")


def build_stage(ctx: Context, stage: StageConfig, init: DiT, data_size: int | None = None) -> StageRuntime:
    """The objective by name, the model set (placed and parallelised) and one AdamW per declared optimiser."""
    cfg = init.cfg
    objective_cls = stage_objective(stage)
    with torch.random.fork_rng(devices=[]):  # the objective's own modules start from the stage's seed alone
        torch.manual_seed(stage.seed)
        objective = objective_cls(stage.objective, objective_env(ctx, cfg, stage, data_size))
    pcfg = stage.parallel(ctx.recipe.parallel)
    parallel_on = ctx.dist.world_size > 1 or pcfg.activation_checkpoint != "none" or pcfg.compile
    transforms = []
    lora = objective_cls.lora_config(stage.objective, stage.lora)
    if lora is not None:
        if pcfg.tp > 1 and lora.dropout > 0:
            raise Krea2Error(f"stage {stage.name}: LoRA dropout with tensor parallel (tp={pcfg.tp}) would draw "
                             "different masks on TP peers; set [stages.lora] dropout = 0 or tp = 1")
        if not objective_cls.trains_policy and (stage.ema or stage.pma_k):
            raise Krea2Error(f"stage {stage.name}: EMA/PMA would average the {objective_cls.name} objective's LoRA "
                             "but not its own modules, a mismatched pair; set ema = 0 and pma_k = 0")
        copies = tuple(name for name, role in objective_cls.roles.items() if role.init == "policy")
        transforms.append(lora_transform(lora, copies))
    mset = build_model_set(init, objective, ctx.dist.device, ctx.mesh,
                           pcfg.resolve(ctx.dist.world_size) if parallel_on else None, stage.ema, transforms)
    optimizers, specs = build_optimizers(objective, mset.models, stage)
    return StageRuntime(objective, mset, optimizers,
                        TrainerContext(stage, optimizers, specs, mset.ema, mset.policy, ctx.dist.device,
                                       ctx.autoencoder, objective.spike_test))


def train_step(rt: StageRuntime, batch, step: int, generator: torch.Generator) -> dict:
    """One step of the stage: the schedule's LRs, then the objective's own step (torchtitan's `train_step`)."""
    rt.tctx.begin(step)
    return rt.objective.step(rt.mset.models, batch, step, generator, rt.tctx)


def train_stage(ctx: Context, stage: StageConfig, init: DiT, resume: bool) -> DiT:
    """Run one stage from `init`; writes <out>/<stage>/final (the stage's output) and returns the model."""
    sdir = stage_dir(ctx, stage)
    state_dir, final_dir = sdir / "state", sdir / "final"
    main = ctx.dist.is_main
    cfg = init.cfg
    if cfg.channels != ctx.autoencoder.channels:
        raise Krea2Error(f"model has {cfg.channels} channels but the autoencoder {ctx.recipe.autoencoder} has "
                         f"{ctx.autoencoder.channels}")
    if main:  # a kill inside the last save's publish step leaves the complete state beside its name
        ckpt.recover_checkpoint(state_dir)
    barrier()
    if state_dir.exists() and not resume:
        raise Krea2Error(f"{sdir} already holds a run; pass --resume to continue it or choose another --out")
    data = build_data(stage.data, stage.seed, ctx.text_encoder, ctx.autoencoder, cfg.patch,
                      cache_dir=ctx.out / "cache", progress=ctx.progress and main,
                      **stage_objective(stage).data_options(stage.objective))
    rt = build_stage(ctx, stage, init, len(data))
    model, mset, tctx, opt_list = rt.mset.policy, rt.mset, rt.tctx, rt.opt_list
    objective = rt.objective

    start = 0
    if resume and ckpt.is_checkpoint(state_dir):
        extra = ckpt.load_training_state(state_dir, mset.state, opt_list)
        start = int(extra["step"])
        tctx.load_state_dict(extra.get("guards", {}))
        torch.set_rng_state(extra["torch_rng"])
        if main:
            print(f"[{stage.name}] resuming at step {start}")

    native = getattr(data, "native", stage.data.native)  # pools know their images' side; [data] size otherwise
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
    pma_dir = sdir / "pma"
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step", disable=not (ctx.progress and main),
               dynamic_ncols=True)
    t_last, samples_seen, preview = time.perf_counter(), 0, None
    monitor = HealthMonitor(HealthConfig(port=metrics_port()), writer=writer, rank=ctx.dist.rank,
                            local_rank=ctx.dist.local_rank, tensorboard_skip=("loss", "grad_norm"))
    peak = peak_flops(torch.cuda.get_device_name()) if ctx.dist.device.type == "cuda" else None
    # a collective stalled past the process-group timeout: dump stacks and exit non-zero so the launcher restarts
    watchdog = Watchdog(ctx.recipe.parallel.timeout_s, sdir / f"hang-rank{ctx.dist.rank}.txt").start() \
        if ctx.dist.world_size > 1 else None
    for step in range(start, stage.steps):
        t_step = time.perf_counter()
        weights = objective.batch_weights()
        batch = data.batch(step, stage.batch_size, dp_rank, dp_size, device=ctx.dist.device,
                           **({} if weights is None else {"weights": weights}))
        generator = torch.Generator(device=ctx.dist.device).manual_seed(hash((stage.seed, step, dp_rank)) % 2**63)
        metrics = train_step(rt, batch, step, generator)
        loss_value = parallel.all_reduce_mean(metrics["loss"])
        grad_norm = tctx.grad_norms.get("policy", 0.0)
        if tctx.bad:
            reason = "; ".join(tctx.bad)
            monitor.record_bad_step(step, reason)
            rolled = tctx.rollback and ckpt.is_checkpoint(state_dir)
            if rolled:  # weights back; data moves past the bad batch
                ckpt.load_training_state(state_dir, mset.state, opt_list)
                for g in tctx.guards.values():
                    g.reset_after_rollback()
            if main:
                tqdm.write(f"[{stage.name}] step {step}: {reason}; {'rolled back' if rolled else 'step skipped'}")
        dt_step = time.perf_counter() - t_step
        n_img, n_txt = token_count(batch)
        tokens = batch.size * (n_img + n_txt) * dp_size
        flops = dit_train_flops(cfg, n_img, n_txt) * stage.batch_size
        monitor.log_step(step + 1, loss=loss_value, grad_norm=grad_norm, step_time_s=dt_step,
                         tokens_per_s=tokens / dt_step,
                         mfu=None if peak is None else flops / dt_step / (peak * ctx.dist.world_size))
        if watchdog is not None:
            watchdog.kick(f"step {step + 1}")
        samples_seen += stage.batch_size
        done = step + 1
        if main:
            with open(sdir / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_value}) + "\n")
            bar.set_postfix({objective.guard_metric.split("/")[-1]: f"{float(metrics[objective.guard_metric]):.4f}",
                             "lr": f"{wsd_lr(step, stage):.2e}"})
            bar.update(1)
            if done % stage.log_every == 0 or done == stage.steps:
                dt = time.perf_counter() - t_last
                writer.add_scalar("train/loss", loss_value, done)
                for name, norm in tctx.grad_norms.items():
                    writer.add_scalar("train/grad_norm" + ("" if name == "policy" else f"/{name}"), norm, done)
                writer.add_scalar("train/lr", wsd_lr(step, stage), done)
                writer.add_scalar("train/samples_per_s", samples_seen / max(dt, 1e-9), done)
                for k, v in metrics.items():
                    if k != "loss":
                        writer.add_scalar(k, float(v), done)
                t_last, samples_seen = time.perf_counter(), 0
            if stage.sample_every and (done % stage.sample_every == 0 or done == stage.steps):
                grid = sample_grid(ctx, model, native)
                (sdir / "samples").mkdir(exist_ok=True)
                grid.save(sdir / "samples" / f"step_{done:07d}.png")
                writer.add_image("samples", np.asarray(grid), done, dataformats="HWC")
                if stage.lora is not None and stage.lora.preview:
                    from krea2.train.lora import LoRAPreview

                    preview = preview or LoRAPreview(stage.lora.preview, ctx.dist.device)
                    grid = preview.grid(model, ctx.recipe.sample_prompts or SAMPLE_PROMPTS, native)
                    grid.save(sdir / "samples" / f"step_{done:07d}_{stage.lora.preview.replace('/', '_')}.png")
                    writer.add_image("samples/preview", np.asarray(grid), done, dataformats="HWC")
        if stage.pma_k and done % stage.pma_every == 0 and done > stage.steps - stage.pma_k * stage.pma_every:
            sd = ckpt.full_state_dict(model)
            if main:
                from safetensors.torch import save_file

                pma_dir.mkdir(exist_ok=True)
                save_file(sd, str(pma_dir / f"step_{done:07d}.safetensors"))
        if done % stage.save_every == 0 or done == stage.steps:
            ckpt.save_training_state(state_dir, mset.state, opt_list, {
                "step": done, "guards": tctx.state_dict(), "torch_rng": torch.get_rng_state(), "stage": stage.name})
    bar.close()
    monitor.close()
    if watchdog is not None:
        watchdog.stop()

    # the stage's output: PMA merge of the last k snapshots, else EMA, else the raw weights
    sd = ckpt.full_state_dict(model)
    shadows = mset.ema.shadows() if mset.ema is not None else None  # a collective: every rank gathers
    objective.export(sdir, write=main)
    if main:
        # an objective that freezes the policy keeps its adapters beside the base (a style stage's reference LoRA,
        # run in the reference passes only): its output is the base unchanged (the LoRA folded at strength 0)
        initial = initial_factors(mset.policy)
        release = (lambda d: fold_lora(d, stage.lora.scaling, initial, float(objective.trains_policy))) \
            if stage.lora is not None else (lambda d: d)
        write_output(ctx, cfg, sdir / "last", release(sd), native)
        if stage.pma_k:
            from safetensors.torch import load_file

            snaps = sorted(pma_dir.glob("step_*.safetensors"))[-stage.pma_k:]
            sd = merge_state_dicts([load_file(str(p)) for p in snaps])
        elif shadows is not None:
            sd = {**sd, **shadows}
        if stage.lora is not None:
            save_adapters(sdir / "lora.safetensors", sd, stage.lora, initial)
        write_output(ctx, cfg, final_dir, release(sd), native)
        writer.close()
    barrier()
    return load_dit(final_dir / "model.safetensors", cfg, dtype=torch.float32)


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
    m = recipe.model
    if m.init:
        info = resolve_checkpoint(m.init)
        return info.model or infer_config(read_shapes(info.model_path))
    return get_config(m.preset) if m.preset else get_config(m.fields())


def initial_model(ctx: Context) -> DiT:
    if ctx.recipe.model.init:
        info = resolve_checkpoint(ctx.recipe.model.init)
        return load_master_weights(info.model_path, info.model)
    torch.manual_seed(ctx.recipe.stages[0].seed)
    model = init_weights(DiT(recipe_model_config(ctx.recipe)))
    if ctx.recipe.model.transfer:
        moved, kept = transfer_weights(model, ctx.recipe.model.transfer)
        if ctx.progress and ctx.dist.is_main:
            print(f"transfer from {ctx.recipe.model.transfer}: {moved} tensors copied, {len(kept)} kept from scratch "
                  f"({', '.join(kept[:6])}{', ...' if len(kept) > 6 else ''})")
    return model


def transfer_weights(model: DiT, spec: str) -> tuple[int, list[str]]:
    """Copy a checkpoint's tensors into `model` where name and shape match; returns (copied, names left as init).

    Raises Krea2Error when nothing matches (a different model family: the transfer would be a silent no-op)."""
    info = resolve_checkpoint(spec)
    src = load_master_weights(info.model_path, info.model).state_dict()
    own = model.state_dict()
    fits = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise Krea2Error(f"transfer = {spec!r}: no tensor of that checkpoint fits this model (names and shapes "
                         "differ everywhere); pick a checkpoint of the same width and depth")
    model.load_state_dict(fits, strict=False)
    return len(fits), sorted(k for k in own if k not in fits)


NEUTRAL_KEYS = {"steps", "save_every", "log_every", "sample_every"}  # may change between runs of one folder


def recipe_differences(old, new, path: str = "") -> list[str]:
    """Dotted keys where two recipe dicts differ, ignoring a stage's schedule-neutral keys (steps, save/log/sample
    intervals): a longer or more often saved run continues the same one."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) if not (k in NEUTRAL_KEYS and ".stages." in f".{path}.")
                for d in recipe_differences(old.get(k), new.get(k), f"{path}.{k}" if path else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in recipe_differences(a, b, f"{path}.{i}")]
    return [] if old == new else [path]


def check_same_recipe(file: Path, recorded: dict) -> None:
    """An output folder belongs to one recipe: another one must not continue it or be taken for done there."""
    if not file.is_file():
        return
    diff = recipe_differences(json.loads(file.read_text()), recorded)
    if diff:
        raise Krea2Error(f"{file.parent} holds a run of a different recipe (differs in {', '.join(diff[:5])}); "
                         "choose another --out, or restore those settings to continue it")


def train_recipe(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run every stage in order; each starts from the previous stage's output. Returns <out>/final."""

    out = Path(out)
    dist = parallel.init_distributed(recipe.parallel.timeout_s)
    mesh = parallel.build_mesh(recipe.parallel.resolve(dist.world_size), dist.world_size) if dist.world_size > 1 \
        else None
    recorded = json.loads(json.dumps(recipe.to_dict(), default=str))
    check_same_recipe(out / "recipe.json", recorded)
    check_frozen_start(recipe)
    barrier()  # every rank compared before rank 0 records the recipe
    recorded_now = not (out / "recipe.json").is_file()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "recipe.json.tmp"
        tmp.write_text(json.dumps(recorded, indent=1) + "\n")
        tmp.replace(out / "recipe.json")
    try:
        return run_stages(recipe, out, dist, mesh, resume, progress)
    except Krea2Error:
        # a run that failed before any stage saved state leaves no record behind: fixing the recipe and running
        # again with the same --out must not be refused as "a different recipe"
        if dist.is_main and recorded_now and not any((out / s.name / "state").exists() for s in recipe.stages):
            (out / "recipe.json").unlink(missing_ok=True)
        raise


def run_stages(recipe: Recipe, out: Path, dist, mesh, resume: bool, progress: bool) -> Path:
    """train_recipe's work once the recipe is recorded: every stage in order, then <out>/final."""
    from krea2.models.autoencoders import load_autoencoder
    from krea2.models.text_encoders import load_text_encoder

    ctx = Context(recipe, out, load_text_encoder(recipe.text_encoder, device=dist.device),
                  load_autoencoder(recipe.autoencoder, device=dist.device), dist, mesh, progress)
    model = initial_model(ctx).to(dist.device)
    te, ae, cfg = ctx.text_encoder, ctx.autoencoder, model.cfg
    if (te.n_layers, te.dim) != (cfg.txtlayers, cfg.txtdim) or ae.channels != cfg.channels:
        raise Krea2Error(f"the model takes {cfg.txtlayers} text layers x {cfg.txtdim} and {cfg.channels} channels, but "
                         f"text encoder {recipe.text_encoder} gives {te.n_layers} x {te.dim} and autoencoder "
                         f"{recipe.autoencoder} {ae.channels}; set [encoders] to the model's (or leave it out with "
                         "init to use the checkpoint's)")
    for stage in recipe.stages:
        final = stage_dir(ctx, stage) / "final"
        if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
            if dist.is_main:
                print(f"[{stage.name}] done earlier; using {final}")
            model = load_dit(final / "model.safetensors", read_checkpoint_dir(final).model, dtype=torch.float32)
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


def check_pairs_file(path: str, source: str, stage: str) -> None:
    """--validate: a pairs file (or folder of them) has the columns its source reads, from the Parquet schemas only;
    one-line Krea2Error naming the stage otherwise."""
    import pyarrow.parquet as pq

    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    need = {"caption", "winner", "loser"} | ({"reference"} if source == "style_pairs" else set())
    if not files:
        raise Krea2Error(f"stage {stage}: no pairs at {path}; make them with `krea2 pairs`")
    for f in files:
        try:
            missing = need - set(pq.read_schema(f).names)
        except (OSError, ValueError) as e:
            raise Krea2Error(f"stage {stage}: {f} is not a readable pairs file ({str(e).splitlines()[0][:100]}); "
                             "make it again with `krea2 pairs`") from None
        if missing:
            make = "krea2 pairs --kind style" if source == "style_pairs" else "krea2 pairs"
            raise Krea2Error(f"stage {stage}: {f} lacks column(s) {sorted(missing)} that data source {source} "
                             f"reads; make it with `{make}`")


def validate_recipe(recipe: Recipe, check_paths: bool = True) -> str:
    """Build every stage on the meta device (model, optimiser groups, schedule, data shapes) without running it.
    check_paths: also require every stage's data path to exist (off for recipes whose data earlier steps make)."""
    cfg = recipe_model_config(recipe)
    with torch.device("meta"):
        model = DiT(cfg)
    groups = param_groups([model], 0.1)
    lines = [f"recipe {recipe.name}: {model.num_params():,} parameters, text encoder {recipe.text_encoder}, "
             f"autoencoder {recipe.autoencoder}, {len(groups[0]['params'])}+{len(groups[1]['params'])} tensors "
             "with/without weight decay"]
    # spatial compression by kind, without loading the autoencoder (validation stays instant): identity 1, the world
    # autoencoder 4, the released VAEs (qwen-image, flux2) 8
    compression = {"identity": 1, "world": 4}.get((recipe.autoencoder or "").partition(":")[0], 8)
    if recipe.model.transfer and check_paths:
        resolve_checkpoint(recipe.model.transfer)  # a missing transfer checkpoint fails here, not at train time
    check_frozen_start(recipe)
    for s in recipe.stages:
        unit = compression * cfg.patch
        bad = [r for r in s.data.resolutions if r % unit]
        if bad:
            raise Krea2Error(f"stage {s.name}: size(s) {bad} are not multiples of the token size {unit} px")
        objective = stage_objective(s)
        if check_paths:  # a learnt reward's model (NAME:FOLDER) is loaded here, not after the policy is built
            from krea2.rewards import get_reward

            try:
                for name in getattr(s.objective, "rewards", None) or {}:
                    get_reward(name)
                getattr(s.objective, "check_files", lambda model: None)(cfg)  # files the objective starts from
            except Krea2Error as e:
                raise Krea2Error(f"stage {s.name}: {e}") from None
            if s.data.source in ("pairs", "style_pairs") and Path(s.data.path).exists():
                check_pairs_file(s.data.path, s.data.source, s.name)
            if s.data.path and not Path(s.data.path).exists():
                make = {"pairs": "krea2 pairs", "style_pairs": "krea2 pairs --kind style",
                        "rows": "krea2 curate export"}.get(s.data.source)
                raise Krea2Error(f"stage {s.name}: data path {s.data.path} does not exist (source {s.data.source})"
                                 + (f"; make it with `{make}`" if make else ""))
        try:  # the objective's own checks against the architecture, where it has any
            getattr(s.objective, "check", lambda model, steps: None)(cfg, s.steps)
        except ValueError as e:
            raise Krea2Error(f"stage {s.name}: {e}") from None
        s.parallel(recipe.parallel)
        lora = objective.lora_config(s.objective, s.lora)
        if lora is not None:
            try:
                targets = lora_targets(model, lora.targets)
            except ValueError as e:
                raise Krea2Error(f"stage {s.name}: {e}") from None
            n_lora = len(targets)
            if lora.weights and check_paths:
                try:
                    initial_adapters(lora, targets)
                except Krea2Error as e:
                    raise Krea2Error(f"stage {s.name}: {e}") from None
        tokens = "/".join(str((r // unit) ** 2) for r in s.data.resolutions)
        px = "/".join(str(r) for r in s.data.resolutions)
        lrs = [wsd_lr(k, s) for k in (0, s.warmup, s.steps - 1)]
        irepa = getattr(s.objective, "irepa", None)
        extra = (f", iREPA on block {irepa.layer} until step {irepa.until or s.steps} (teacher {irepa.teacher})"
                 if irepa is not None else "")
        roles = "".join(f", {name} ({'trainable' if r.trainable else 'frozen'} copy of {r.init})"
                        for name, r in objective.roles.items())
        lines.append(f"  {s.name}: {objective.name}, {s.steps} steps x {s.batch_size}, {px}px = {tokens} tokens, "
                     f"{s.precision}, lr {lrs[0]:.2e} -> {lrs[1]:.2e} -> {lrs[2]:.2e}, data {s.data.source}"
                     f"{roles}{extra}"
                     + (f", LoRA rank {lora.rank} on {n_lora} Linears" if lora is not None else ""))
    return "\n".join(lines)
