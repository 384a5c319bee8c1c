"""Bad sampling input is refused at one place (krea2.limits) before any work: ranges, non-finite numbers, empty
prompts, unbounded sizes, an output path that is a file; negative guidance is the release's "no guidance"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models.checkpoint import save_random_checkpoint
from krea2.pipeline import load_pipeline

cli._mount()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize("args, needle", [
    (["--steps", "-3"], "steps must be between 1 and 1000, got -3"),
    (["--steps", "0"], "steps must be between 1 and 1000, got 0"),
    (["--steps", "100000"], "steps must be between 1 and 1000"),
    (["--cfg", "nan"], "--cfg must be a finite number, got nan"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--mu", "-inf"], "--mu must be a finite number"),
    (["--width", "0"], "--width must be a positive number of pixels, got 0"),
    (["--height", "-8"], "--height must be a positive number of pixels"),
    (["--width", "100000"], "--width 100000 px is over the limit of 4096 px"),
    (["--num-images", "0"], "--num-images must be between 1 and 1024, got 0"),
    (["--num-images", "5000"], "--num-images must be between 1 and 1024"),
])
def test_generate_refuses_out_of_range_options(ckpt, tmp_path, cli_error, args, needle):
    out = tmp_path / "out"
    code, err = cli_error("generate", "a red circle", "--checkpoint", ckpt, "--out", out, *args)
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before any work or output


@pytest.mark.parametrize("prompts, needle", [([""], "prompt 1 is empty"),
                                             (["a red circle", "   "], "prompt 2 is empty")])
def test_empty_prompts_are_refused(ckpt, tmp_path, cli_error, prompts, needle):
    code, err = cli_error("generate", *prompts, "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert code == 2 and needle in err


def test_output_that_is_a_file_is_refused_before_sampling(ckpt, tmp_path, cli_error):
    f = tmp_path / "taken.png"
    f.write_bytes(b"keep me")
    code, err = cli_error("generate", "x", "--checkpoint", ckpt, "--out", f)
    assert code == 2 and "is a file" in err
    assert f.read_bytes() == b"keep me"


def test_limit_override_by_environment(monkeypatch):
    from krea2 import limits

    monkeypatch.setenv("KREA2_MAX_SIDE", "8192")
    limits.check_side(5000, "width")
    monkeypatch.setenv("KREA2_MAX_SIDE", "lots")
    with pytest.raises(Krea2Error, match="KREA2_MAX_SIDE='lots' is not an integer"):
        limits.check_side(5000, "width")


def test_pipeline_checks_its_own_inputs(ckpt):
    pipe = load_pipeline(str(ckpt))
    with pytest.raises(Krea2Error, match="guidance must be a finite number"):
        pipe.sampling_config(guidance=float("nan"))
    with pytest.raises(Krea2Error, match="steps must be between"):
        pipe.generate(["x"], pipe.sampling_config().__class__(steps=0))
    with pytest.raises(Krea2Error, match="over the limit"):
        pipe.generate(["x"], width=10_000)


def test_negative_guidance_is_the_conditional_pass_alone(ckpt):
    """The release treats any g <= 0 as no guidance: g = -1 gives exactly g = 0's images (not a cancelled prompt)."""
    pipe = load_pipeline(str(ckpt))
    base = pipe.sampling_config(steps=2, guidance=0.0)
    neg = pipe.sampling_config(steps=2, guidance=-1.0)
    pos = pipe.sampling_config(steps=2, guidance=2.0)
    a, b = pipe.generate(["a red circle"], base, seed=1), pipe.generate(["a red circle"], neg, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe.generate(["a red circle"], pos, seed=1))


@pytest.mark.parametrize("kind", ["prompts", "recipe"])
def test_files_that_are_not_utf8_text_are_one_line_errors(tmp_path, cli_error, kind):
    bad = tmp_path / ("p.jsonl" if kind == "prompts" else "r.toml")
    bad.write_bytes(b"\xff\xfe" + '{"prompt": "a"}'.encode("utf-16-le"))
    args = (["eval", "world", "--prompts", bad, "--out", tmp_path / "r.json"] if kind == "prompts"
            else ["train", bad, "--out", tmp_path / "run"])
    code, err = cli_error(*args)
    assert code == 2 and "is not UTF-8 text (byte 0: 0xFF)" in err and "Traceback" not in err
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    code, err = cli_error("train", folder, "--out", tmp_path / "run2")
    assert code == 2 and ("is a folder" in err or "not found" in err)


@pytest.mark.parametrize("to", ["diffusers", "krea2"])
def test_export_never_replaces_a_users_files_unasked(ckpt, tmp_path, cli_error, to):
    out = tmp_path / "d"
    out.mkdir()
    (out / "config.json").write_text("mine")
    code, err = cli_error("export", ckpt, out, "--to", to)
    assert code == 2 and "already exists and is not empty" in err and "--overwrite" in err
    assert (out / "config.json").read_text() == "mine"
    code, err = cli_error("export", ckpt, out / "config.json", "--to", to)
    assert code == 2 and "is not a folder" in err
    from typer.testing import CliRunner

    res = CliRunner().invoke(cli.app, ["export", str(ckpt), str(out), "--to", to, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").read_text() != "mine" and not list(tmp_path.glob(".d.*"))  # no temp left


@pytest.mark.parametrize("field, value", [("patch", 4.0), ("layers", "6"), ("bias", 1), ("theta", float("nan")),
                                          ("heads", 0), ("channels", True)])
def test_checkpoint_config_values_are_type_checked_on_load(ckpt, tmp_path, cli_error, field, value):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"][field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli_error("generate", "x", "--checkpoint", bad, "--out", tmp_path / "o")
    assert code == 2 and "not a valid krea2 config" in err and field in err and "Traceback" not in err


def test_database_urls_unsupported_schemes_and_credentials():
    from krea2.data.curation.store import Store, redact, resolve_url

    for url in ("mysql://u:p@localhost/db", "mongodb://x/y", "http://h/db"):
        with pytest.raises(Krea2Error, match="unsupported database URL scheme"):
            resolve_url(url)
    with pytest.raises(Krea2Error) as e:
        resolve_url("mysql://u:s3cret@localhost/db")
    assert "s3cret" not in str(e.value)
    assert redact("postgresql://u:s3cret@127.0.0.1:1/db") == "postgresql://u:***@127.0.0.1:1/db"
    with pytest.raises(Krea2Error) as e:  # nothing listens on port 1: the connection error must not echo the password
        Store("postgresql://u:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize("where, needle", [("nosuchcol = 1", "no such column"), ("1=1; DROP TABLE images", "no ';'"),
                                           ("decode_ok ==== 1", "not a valid condition")])
def test_sql_filters_are_checked_against_the_table(tmp_path, cli_error, where, needle):
    from typer.testing import CliRunner

    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    assert CliRunner().invoke(cli.app, ["curate", "init", "--db", db]).exit_code == 0
    code, err = cli_error("curate", "reset", "decode", "--db", db, "--where", where)
    assert code == 2 and needle in err and "Traceback" not in err


# ---------------------------------------------------------------- E: non-finite numbers; aliases; image decoding


def test_non_finite_weights_are_refused_on_load(ckpt, tmp_path, cli_error):
    from safetensors.torch import load_file, save_file

    for value in (float("nan"), float("inf")):
        bad = tmp_path / f"bad-{value}"
        bad.mkdir()
        (bad / "config.json").write_text((ckpt / "config.json").read_text())
        sd = load_file(ckpt / "model.safetensors")
        sd["blocks.1.attn.wq.weight"][0, 0] = value
        save_file(sd, bad / "model.safetensors")
        for quantize in (None, "fp8"):  # quantising while loading checks each weight as it streams it
            with pytest.raises(Krea2Error, match=r"non-finite weights .* blocks.1.attn.wq.weight"):
                load_pipeline(str(bad), quantize=quantize)
        code, err = cli_error("generate", "a red circle", "--checkpoint", bad, "--out", tmp_path / "o")
        assert code == 2 and "non-finite weights" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    sd = load_file(ckpt / "model.safetensors")  # and a tensor the quantiser keeps in high precision
    kept = next(k for k in sd if not k.startswith(("blocks.", "txtfusion.")) and sd[k].is_floating_point())
    sd[kept].view(-1)[0] = float("nan")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(Krea2Error, match=f"non-finite weights .* {kept}"):
        load_pipeline(str(bad), quantize="int8")


def test_non_finite_samples_are_an_error_not_a_black_image(ckpt):
    pipe = load_pipeline(str(ckpt))
    with torch.no_grad():
        pipe.model.last.linear.weight.fill_(3e38)  # overflows to inf in the first step
    with pytest.raises(Krea2Error, match="non-finite values .* prompt 1"):
        pipe.generate(["a red circle"])


def test_two_keys_for_one_tensor_are_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from krea2.models.loading import load_dit
    from krea2.models.lora import lora_from_state_dict

    sd = load_file(ckpt / "model.safetensors")
    sd["model.diffusion_model.first.weight"] = sd["first.weight"] + 1
    save_file(sd, tmp_path / "mixed.safetensors")
    with pytest.raises(Krea2Error, match="two tensors for first.weight: 'first.weight' and "
                                         "'model.diffusion_model.first.weight'"):
        load_dit(tmp_path / "mixed.safetensors")
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    lora = {"blocks.0.attn.wq.lora_A.weight": a, "blocks.0.attn.wq.lora_B.weight": b,
            "diffusion_model.blocks.0.attn.wq.lora_A.weight": a + 1}
    with pytest.raises(Krea2Error, match="two tensors for blocks.0.attn.wq A"):
        lora_from_state_dict(lora)


def test_exif_orientation_is_applied_on_decode():
    import io

    from PIL import Image

    from krea2.data.curation.checks import load_rgb

    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    rgb, meta = load_rgb(buf.getvalue())
    assert rgb.shape == (40, 20, 3) and (meta["width"], meta["height"]) == (20, 40)  # portrait, as viewed
    assert rgb[:10, :, 0].mean() > 200 and rgb[:10, :, 1].mean() < 60  # the red band is now on top
    assert rgb[-10:, :, 1].mean() > 200


@pytest.mark.parametrize("value,expect", [(200, 1), (32768, 128), (65535, 255)])
def test_16_bit_images_are_scaled_by_their_bit_depth(value, expect):
    import io

    import numpy as np
    from PIL import Image

    from krea2.data.curation.checks import load_rgb

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(buf, format="PNG")  # 16-bit greyscale
    rgb, _ = load_rgb(buf.getvalue())
    assert abs(int(rgb.mean()) - expect) <= 1  # a dark 16-bit image stays dark (was 200 -> 200)
