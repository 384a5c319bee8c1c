"""DCP training checkpoints: single process, resharding across 1 <-> 2 ranks, async saves, safetensors export."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from test_parallel import GLOBAL_BATCHES, flow_loss, launch, rank_slice

from krea2.errors import Krea2Error
from krea2.models.dit import DiT
from krea2.train.checkpoint import (
    export_safetensors,
    is_checkpoint,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from krea2.train.parallel import ParallelConfig, build_mesh, parallelize_dit


def trained_tiny(steps: int = 2):
    torch.manual_seed(0)
    model = DiT("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in GLOBAL_BATCHES[:steps]:
        flow_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_training_state(model_a, opt_a, model_b, opt_b):
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), n
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_save_load_roundtrip_single_process(tmp_path):
    model, opt = trained_tiny()
    extra = {"step": 2, "rng": torch.get_rng_state(), "data": {"epoch": 0, "index": 8}}
    assert save_training_state(tmp_path / "step-2", model, opt, extra) is None
    assert is_checkpoint(tmp_path / "step-2") and not (tmp_path / "step-2.tmp").exists()
    torch.manual_seed(123)
    model2 = DiT("tiny")
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    got = load_training_state(tmp_path / "step-2", model2, opt2)
    assert got["step"] == 2 and got["data"] == {"epoch": 0, "index": 8} and torch.equal(got["rng"], extra["rng"])
    assert_same_training_state(model, opt, model2, opt2)
    # training continues identically from the restored state
    for m, o in ((model, opt), (model2, opt2)):
        flow_loss(m, GLOBAL_BATCHES[2]).backward()
        o.step()
    assert torch.equal(model.first.weight, model2.first.weight)


def test_model_only_and_bad_dir(tmp_path):
    model, _ = trained_tiny(1)
    save_training_state(tmp_path / "m", model)
    model2 = DiT("tiny")
    assert load_training_state(tmp_path / "m", model2) == {}
    assert torch.equal(model.blocks[1].mlp.down.weight, model2.blocks[1].mlp.down.weight)
    with pytest.raises(Krea2Error, match="not a complete"):
        load_training_state(tmp_path / "missing", model2)


def test_async_save_snapshots_state_at_call_time(tmp_path):
    model, opt = trained_tiny(1)
    want = model.first.weight.detach().clone()
    future = save_training_state(tmp_path / "a", model, opt, {"step": 1}, async_save=True)
    with torch.no_grad():  # training goes on while the save is written
        for p in model.parameters():
            p.add_(1.0)
    assert future.result(timeout=60) == tmp_path / "a"
    model2 = DiT("tiny")
    load_training_state(tmp_path / "a", model2)
    assert torch.equal(model2.first.weight, want)


def test_interrupted_save_is_not_loadable_and_latest_skips_it(tmp_path):
    model, opt = trained_tiny(1)
    save_training_state(tmp_path / "step-1", model, opt, {"step": 1})
    (tmp_path / "step-2.tmp").mkdir()  # a save that crashed half-way
    (tmp_path / "step-2.tmp" / "extra.json").write_text("{")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    save_training_state(tmp_path / "step-2", model, opt, {"step": 2})  # clears the stale temp folder
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_export_loads_in_released_layout(tmp_path):
    model, _ = trained_tiny(1)
    path = export_safetensors(model, tmp_path / "krea2-tiny.safetensors")
    sd = load_file(path)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert "blocks.1.attn.qknorm.qnorm.scale" in sd and "txtfusion.projector.weight" in sd
    fresh = DiT("tiny")
    fresh.load_state_dict(sd, strict=True)  # official names and shapes, nothing missing or extra
    torch.testing.assert_close(fresh.blocks[0].attn.wq.weight, model.blocks[0].attn.wq.weight.bfloat16().float())


# ---------------------------------------------------------------- 2 ranks <-> 1 rank


def _save_on_two(rank, world, ckpt, tp):
    from krea2.train.checkpoint import full_state_dict

    torch.manual_seed(0)
    model = DiT("tiny")
    cfg = ParallelConfig(param_dtype="float32", tp=tp, dp_shard=world // tp)
    parallelize_dit(model, build_mesh(cfg), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in GLOBAL_BATCHES[:2]:
        flow_loss(model, rank_slice(b, rank // tp, world // tp)).backward()
        opt.step()
        opt.zero_grad()
    future = save_training_state(ckpt, model, opt, {"step": 2}, async_save=tp == 1)  # async on the FSDP run
    if future is not None:
        future.result(timeout=60)
    sd = full_state_dict(model)
    if rank == 0:
        torch.save(sd, os.path.join(os.path.dirname(ckpt), "full.pt"))


@pytest.mark.parametrize("tp", [1, 2], ids=["fsdp", "tp"])
def test_save_on_two_ranks_resume_on_one(tmp_path, tp):
    launch(_save_on_two, 2, str(tmp_path / "ckpt"), tp)
    full = torch.load(tmp_path / "full.pt")
    model = DiT("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert load_training_state(tmp_path / "ckpt", model, opt) == {"step": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    st = opt.state_dict()["state"]
    assert len(st) == len(list(model.parameters())) and all(int(s["step"]) == 2 for s in st.values())


def _resume_on_two(rank, world, ckpt, out):
    from krea2.train.checkpoint import full_state_dict

    torch.manual_seed(7)  # a different init: everything must come from the checkpoint
    model = DiT("tiny")
    cfg = ParallelConfig(param_dtype="float32")
    parallelize_dit(model, build_mesh(cfg), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extra = load_training_state(ckpt, model, opt)
    flow_loss(model, rank_slice(GLOBAL_BATCHES[2], rank, world)).backward()
    opt.step()
    sd = full_state_dict(model)
    if rank == 0:
        torch.save({"extra": extra, "state": sd}, out)


def test_save_on_one_rank_resume_on_two(tmp_path):
    model, opt = trained_tiny(2)
    save_training_state(tmp_path / "ckpt", model, opt, {"step": 2})
    launch(_resume_on_two, 2, str(tmp_path / "ckpt"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    assert got["extra"] == {"step": 2}
    flow_loss(model, GLOBAL_BATCHES[2]).backward()  # the same next step in one process
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_kill_between_the_publish_renames_keeps_a_complete_state(tmp_path):
    """Both windows of `_publish`: after the old state moved aside, and after the new one took its name."""
    import shutil

    from krea2.train.checkpoint import is_checkpoint, recover_checkpoint

    model = torch.nn.Linear(3, 2)
    state = tmp_path / "state"
    save_training_state(state, model, extra={"step": 1})
    save_training_state(tmp_path / "newer", model, extra={"step": 2})
    # killed after `state` -> `state.old`, before `state.tmp` -> `state`
    state.rename(tmp_path / "state.old")
    shutil.copytree(tmp_path / "newer", tmp_path / "state.tmp")
    assert not is_checkpoint(state) and recover_checkpoint(state)
    assert load_training_state(state, model)["step"] == 2  # the newer, complete save wins
    # killed while `state.tmp` was still being written: the old one comes back
    state.rename(tmp_path / "state.old")
    (tmp_path / "state.tmp").mkdir()
    assert recover_checkpoint(state) and load_training_state(state, model)["step"] == 2


def test_published_folders_have_the_umask_permissions(tmp_path):
    """safetensors writes 0600 and mkdtemp 0700: a published checkpoint or classifier is readable like any file."""
    import os

    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.models.loading import UMASK

    ckpt = save_random_checkpoint(tmp_path / "rand", resolution=16)
    for f in (ckpt / "model.safetensors", ckpt / "config.json"):
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~UMASK
    assert os.stat(ckpt).st_mode & 0o777 == 0o777 & ~UMASK
