"""FSDP2 and tensor parallelism on CPU with gloo: 2 processes must reproduce one process.

Workers are module-level functions run with torch.multiprocessing (spawn); each writes its results with torch.save
and the test compares them with a single-process run of the same global batch.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from krea2.errors import Krea2Error
from krea2.models.dit import DiT
from krea2.train.parallel import (
    ParallelConfig,
    apply_activation_checkpointing,
    build_mesh,
    clip_grad_norm_,
    destroy_distributed,
    init_distributed,
    parallelize_dit,
    rank_slice,
    shard_indices,
)

TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    init_distributed(timeout_s=60)
    try:
        fn(rank, world, *args)
        # Tear down together: a rank that destroys its gloo group while its peer still has collectives in flight
        # can abort ("terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        destroy_distributed()


def launch(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned gloo processes; raises if any fails or it runs too long."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {TIMEOUT_S} s")


def tiny_batch(batch: int, seed: int = 1, n_img: int = 16, n_txt: int = 4) -> dict:
    """A deterministic flow-matching batch for DiT('tiny'): noisy tokens, text states, t, positions, target."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, n_img, 16, generator=g)
    noise = torch.randn(batch, n_img, 16, generator=g)
    t = torch.rand(batch, generator=g)
    side = int(n_img ** 0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    pos = torch.zeros(batch, n_txt + n_img, 3)
    pos[:, n_txt:, 1:] = grid.float()
    mask = torch.ones(batch, n_txt + n_img, dtype=torch.bool)
    mask[0, 2:n_txt] = False  # some text padding, so the masked path runs too
    return {"img": (1 - t[:, None, None]) * x0 + t[:, None, None] * noise,
            "context": torch.randn(batch, n_txt, 3, 32, generator=g), "t": t, "pos": pos, "mask": mask,
            "target": noise - x0}


def flow_loss(model, b: dict) -> torch.Tensor:
    v = model(b["img"], b["context"], b["t"], b["pos"], b["mask"])
    return (v.float() - b["target"]).square().mean()


def train_steps(model, batches, lr: float = 1e-3) -> list[float]:
    """A few AdamW steps with grad clipping; returns the loss averaged over ranks at each step."""
    from krea2.train.parallel import all_reduce_mean, clip_grad_norm_

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for b in batches:
        loss = flow_loss(model, b)
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(all_reduce_mean(loss))
    return losses


GLOBAL_BATCHES = [tiny_batch(4, seed=s) for s in range(3)]


def _fsdp_worker(rank, world, out_dir):
    from krea2.train.checkpoint import full_state_dict

    torch.manual_seed(0)
    model = DiT("tiny")
    cfg = ParallelConfig(param_dtype="float32", activation_checkpoint="selective")
    parallelize_dit(model, build_mesh(cfg), cfg)
    losses = train_steps(model, [rank_slice(b, rank, world) for b in GLOBAL_BATCHES])
    sd = full_state_dict(model)
    if rank == 0:
        torch.save({"losses": losses, "state": sd}, os.path.join(out_dir, "fsdp.pt"))


def test_fsdp2_two_ranks_match_one_process(tmp_path):
    launch(_fsdp_worker, 2, str(tmp_path))
    got = torch.load(tmp_path / "fsdp.pt")
    torch.manual_seed(0)
    model = DiT("tiny")
    want = train_steps(model, GLOBAL_BATCHES)
    assert got["losses"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    ref = model.state_dict()
    assert set(got["state"]) == set(ref)  # gathered under the official names
    for k, v in ref.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def _tp_worker(rank, world, out_dir):
    torch.manual_seed(0)
    model = DiT("tiny")
    cfg = ParallelConfig(dp_shard=1, tp=2, param_dtype="float32")
    parallelize_dit(model, build_mesh(cfg), cfg)
    assert model.blocks[0].attn.wk.weight.to_local().shape[0] == model.cfg.kvheads // 2 * model.cfg.head_dim
    b = GLOBAL_BATCHES[0]  # TP peers see the same samples
    out = model(b["img"], b["context"], b["t"], b["pos"], b["mask"])
    (out.float() - b["target"]).square().mean().backward()
    norm = clip_grad_norm_(model.parameters(), 0.01)  # grads on (dp, tp) and dp-only meshes: one total norm
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"out": out.detach(), "grads": grads, "norm": norm}, os.path.join(out_dir, "tp.pt"))


def test_tensor_parallel_matches_tp1_forward_and_grads(tmp_path):
    launch(_tp_worker, 2, str(tmp_path))
    got = torch.load(tmp_path / "tp.pt")
    torch.manual_seed(0)
    model = DiT("tiny")
    b = GLOBAL_BATCHES[0]
    out = model(b["img"], b["context"], b["t"], b["pos"], b["mask"])
    (out - b["target"]).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert norm > 0.01  # the clip did act
    torch.testing.assert_close(got["norm"], norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        # qknorm scales are shared by heads on both TP ranks: a missing all-reduce would halve them
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def lora_tiny() -> DiT:
    """DiT('tiny') with rank-4 LoRA on every Linear and non-zero B (B = 0 would hide a wrong A gradient)."""
    from krea2.train.lora import LoRAConfig, inject_lora

    torch.manual_seed(0)
    model = inject_lora(DiT("tiny"), LoRAConfig(rank=4, alpha=8.0, targets="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model


def _tp_lora_worker(rank, world, out_dir):
    model = lora_tiny()
    cfg = ParallelConfig(dp_shard=1, tp=2, param_dtype="float32")
    parallelize_dit(model, build_mesh(cfg), cfg)
    wq, wo = model.blocks[0].attn.wq, model.blocks[0].attn.wo
    # the wrapped layers are split like the plain ones: W and B by output rows (wq), W and A by input columns (wo)
    assert wq.base_layer.weight.to_local().shape[0] == wq.base_layer.out_features // 2
    assert wq.lora_B["default"].weight.to_local().shape == (wq.base_layer.out_features // 2, 4)
    assert wo.lora_A["default"].weight.to_local().shape == (4, wo.base_layer.in_features // 2)
    b = GLOBAL_BATCHES[0]
    out = model(b["img"], b["context"], b["t"], b["pos"], b["mask"])
    (out.float() - b["target"]).square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = clip_grad_norm_(trainable, 0.01)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"out": out.detach(), "grads": grads, "norm": norm}, os.path.join(out_dir, "tp_lora.pt"))


def test_tensor_parallel_applies_to_lora_wrapped_layers(tmp_path):
    launch(_tp_lora_worker, 2, str(tmp_path))
    got = torch.load(tmp_path / "tp_lora.pt")
    model = lora_tiny()
    b = GLOBAL_BATCHES[0]
    out = model(b["img"], b["context"], b["t"], b["pos"], b["mask"])
    (out - b["target"]).square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.nn.utils.clip_grad_norm_(trainable.values(), 0.01)
    assert norm > 0.01 and set(got["grads"]) == set(trainable) and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(got["norm"], norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-6)
    for n, p in trainable.items():
        # A of a column-parallel layer sees only its rank's output shard: without the sum over TP it would be half
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_activation_checkpointing_keeps_grads_and_names():
    b = GLOBAL_BATCHES[0]
    grads = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = DiT("tiny")
        for blk in model.blocks:
            apply_activation_checkpointing(blk, mode)
        flow_loss(model, b).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads["full"]) == set(DiT("tiny").state_dict())  # no wrapper prefixes in the names
    for mode in ("selective", "full"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, msg=f"{mode}: {n}")


def test_config_rejects_bad_degrees():
    with pytest.raises(Krea2Error, match="world size"):
        ParallelConfig(tp=2, dp_shard=2).resolve(2)
    with pytest.raises(Krea2Error, match="not divisible"):
        ParallelConfig(tp=3).resolve(4)
    with pytest.raises(Krea2Error, match="activation_checkpoint"):
        ParallelConfig(activation_checkpoint="some")
    assert ParallelConfig(dp_replicate=2).resolve(8).dp_shard == 4


def test_tp_must_divide_heads():
    from krea2.train.parallel import _check_tp_divides

    with pytest.raises(Krea2Error, match="kvheads=2"):
        _check_tp_divides(DiT("tiny"), 4)


def test_shards_are_disjoint_and_deterministic():
    parts = [list(shard_indices(10, r, 3)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # equal length: no rank waits on a missing batch
    b = tiny_batch(4)
    halves = [rank_slice(b, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["img"] for h in halves]), b["img"])
    with pytest.raises(Krea2Error):
        rank_slice(tiny_batch(3), 0, 2)
