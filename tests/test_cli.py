"""The `krea2` command line end to end on tiny random checkpoints: generate, export, released files, error exits.

Commands run in-process (typer's CliRunner, or `krea2.cli.main` with sys.argv patched for the error path, which is
what prints `error: ...` and exits 2); one subprocess checks the installed entry point's error handling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models.checkpoint import resolve_checkpoint, save_random_checkpoint
from krea2.models.dit import PRESETS, DiT, DiTConfig
from krea2.models.loading import load_dit, save_dit
from krea2.sampling import joint_inputs

cli._mount()
FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # tiny-world: patch 2 on pixels (identity autoencoder), so one token is 2 px; minilm text encoder
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def invoke(*args: str):
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """krea2.cli.main as the console script runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["krea2", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def test_generate_writes_images_and_seeds_are_per_image(ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    invoke("generate", "a red square", "a blue circle", "--checkpoint", ckpt, "--seed", 5, "--out", a, *FAST)
    invoke("generate", "a red square", "a blue circle", "--checkpoint", ckpt, "--seed", 5, "--out", b, *FAST)
    files = sorted(p.name for p in a.iterdir())
    assert files == ["0000.png", "0001.png", "grid.png"]
    assert Image.open(a / "0000.png").size == (32, 32)  # the checkpoint's resolution
    for name in files:  # same seed, same images
        assert np.array_equal(pixels(a / name), pixels(b / name))
    assert not np.array_equal(pixels(a / "0000.png"), pixels(a / "0001.png"))

    # image i uses seed + i: prompt 1 alone with seed 6 is image 1 of the batch (padding to the batch's longest
    # caption is masked, so only float rounding may differ: at most one grey level)
    c = tmp_path / "c"
    invoke("generate", "a blue circle", "--checkpoint", ckpt, "--seed", 6, "--out", c, *FAST)
    assert sorted(p.name for p in c.iterdir()) == ["0000.png"]
    assert np.abs(pixels(c / "0000.png") - pixels(a / "0001.png")).max() <= 1
    d = tmp_path / "d"
    invoke("generate", "a blue circle", "--checkpoint", ckpt, "--seed", 7, "--out", d, *FAST)
    assert np.abs(pixels(d / "0000.png") - pixels(a / "0001.png")).max() > 1


def test_sizes_snap_up_to_the_token_size(ckpt, tmp_path):
    res = invoke("generate", "x", "--checkpoint", ckpt, "--width", 30, "--height", 20, "--out", tmp_path / "a", *FAST)
    assert Image.open(tmp_path / "a" / "0000.png").size == (30, 20)
    assert "note:" not in res.output
    res = invoke("generate", "x", "--checkpoint", ckpt, "--width", 31, "--height", 20, "--out", tmp_path / "b", *FAST)
    assert Image.open(tmp_path / "b" / "0000.png").size == (32, 20)
    assert "note: width 31 is not a multiple of 2; using 32" in res.output


def test_errors_exit_2_with_one_line(ckpt, tmp_path, monkeypatch, capsys):
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    wrong = tmp_path / "wrong"
    save_random_checkpoint(wrong)
    wider = DiTConfig(**{**PRESETS["tiny-world"].to_dict(), "features": 128})
    save_dit(DiT(wider), wrong / "model.safetensors")  # config.json still says tiny-world (64 wide)
    cases = {
        "no prompts": (["generate", "--checkpoint", ckpt], "no prompts"),
        "missing checkpoint": (["generate", "x", "--checkpoint", tmp_path / "nope.safetensors"], "not found"),
        "missing folder": (["generate", "x", "--checkpoint", tmp_path / "nope"], "not found"),
        "pickle": (["generate", "x", "--checkpoint", pt], "not a safetensors file"),
        "wrong shape": (["generate", "x", "--checkpoint", wrong], "wrong shape"),
        "bad export format": (["export", ckpt, tmp_path / "o", "--to", "onnx"], "unknown export format"),
    }
    for name, (args, needle) in cases.items():
        code, err = run_main(monkeypatch, capsys, *args)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert "Traceback" not in err


def test_commands_are_mounted_once_however_often_main_runs(monkeypatch, capsys):
    from krea2 import cli

    run_main(monkeypatch, capsys, "generate", "--bogus")
    commands, groups = len(cli.app.registered_commands), len(cli.app.registered_groups)
    for _ in range(3):
        code, err = run_main(monkeypatch, capsys, "generate", "--bogus")
        assert code == 2 and "No such option" in err
    # each mount used to add every command again, and typer rebuilds them all per call: O(calls) per call
    assert (len(cli.app.registered_commands), len(cli.app.registered_groups)) == (commands, groups)
    assert len({c.callback for c in cli.app.registered_commands}) == commands


def test_error_exit_through_the_installed_script(tmp_path):
    exe = Path(sys.executable).with_name("krea2")
    res = subprocess.run([str(exe), "generate", "x", "--checkpoint", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: checkpoint not found") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_export_diffusers_loads_with_equal_outputs(ckpt, tmp_path):
    from diffusers import Krea2Transformer2DModel

    invoke("export", ckpt, tmp_path / "tf", "--to", "diffusers")
    tf = Krea2Transformer2DModel.from_pretrained(tmp_path / "tf").eval()
    ours = load_dit(ckpt / "model.safetensors")
    cfg = ours.cfg
    torch.manual_seed(0)
    txtmask = torch.ones(2, 5, dtype=torch.bool)
    txtmask[1, 3:] = False
    pos, mask = joint_inputs(txtmask, 4, 3)
    img, ctx, t = torch.randn(2, 12, cfg.token_dim), torch.randn(2, 5, cfg.txtlayers, cfg.txtdim), torch.rand(2)
    with torch.no_grad():
        a = ours(img, ctx, t, pos, mask)
        b = tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
    assert a.abs().max() > 0 and (a - b).abs().max() < 1e-5


def test_released_layout_file_via_krea2_raw(ckpt, tmp_path, monkeypatch):
    # a released file is bare tensors: no config.json, the architecture comes from the shapes (patch 2)
    raw = tmp_path / "krea-2-raw.safetensors"
    save_dit(load_dit(ckpt / "model.safetensors"), raw)
    monkeypatch.setenv("KREA2_RAW", str(raw))
    info = resolve_checkpoint("raw")
    assert info.model_path == raw and info.model is None
    assert (info.text_encoder, info.autoencoder) == ("qwen3-vl", "qwen-image")
    assert load_dit(info.model_path, info.model).cfg == load_dit(ckpt / "model.safetensors").cfg
    # the released encoder/VAE cannot run here: override them with the tiny compatible ones
    out = tmp_path / "out"
    invoke("generate", "x", "--checkpoint", "raw", "--text-encoder", "minilm", "--vae", "identity", "--width", 16,
           "--height", 16, "--out", out, *FAST)
    assert Image.open(out / "0000.png").size == (16, 16)


def test_raw_without_env_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("KREA2_RAW", raising=False)
    code, err = run_main(monkeypatch, capsys, "generate", "x", "--checkpoint", "raw")
    assert code == 2 and err.startswith("error: --checkpoint raw needs the released file: set KREA2_RAW")


def test_export_krea2_folder_in_bf16(ckpt, tmp_path):
    from safetensors.torch import load_file

    invoke("export", ckpt, tmp_path / "bf16", "--to", "krea2", "--dtype", "bf16")
    src, out = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert set(src) == set(out) and all(v.dtype == torch.bfloat16 for v in out.values())
    assert all(torch.equal(src[k].to(torch.bfloat16), out[k]) for k in src)
    from krea2.models.checkpoint import read_checkpoint_dir

    a, b = read_checkpoint_dir(ckpt), read_checkpoint_dir(tmp_path / "bf16")
    assert (a.model, a.text_encoder, a.autoencoder, a.sampling, a.resolution) == \
        (b.model, b.text_encoder, b.autoencoder, b.sampling, b.resolution)
    # an existing folder is only replaced when asked
    res = CliRunner().invoke(cli.app, ["export", str(ckpt), str(tmp_path / "bf16"), "--to", "krea2"])
    assert isinstance(res.exception, Krea2Error) and "already exists" in str(res.exception)
    invoke("export", ckpt, tmp_path / "bf16", "--to", "krea2", "--overwrite")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["first.weight"].dtype == torch.float32


def test_shipped_world_checkpoint_loads():
    info = resolve_checkpoint("world")
    assert info.model.patch == 4 and info.text_encoder.startswith("minilm") and info.autoencoder == "identity"
    assert info.model_path.stat().st_size < 20 * 2**20  # bf16, <= 20 MB as shipped
