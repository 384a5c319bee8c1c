"""Weight-only fp8 / int8 quantisation (krea2.models.quantize): error bounds, the quantised DiT, ComfyUI scaled-fp8
files both ways, quantising while loading, and the command line's one-line errors. All on the tiny preset, float32.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models.checkpoint import save_random_checkpoint
from krea2.models.dit import DiT
from krea2.models.loading import load_dit, save_dit
from krea2.models.quantize import (
    FORMATS,
    MARKER,
    QUANTIZED_MODULES,
    QuantLinear,
    dequantize_weight,
    quantize_dit,
    quantize_weight,
    quantized_format,
    save_fp8,
    save_quantized,
)
from krea2.sampling import joint_inputs

cli._mount()
FP8 = torch.float8_e4m3fn
# relative L2 of the tiny DiT's output against float32, 2x what was measured (fp8 0.030 per row, 0.032 per tensor;
# int8 0.0052 per row, 0.0047 per tensor; bf16 activations add up to 0.003); dropped scales give ~1
TOLERANCE = {"fp8": 0.06, "int8": 0.01}


def tiny_model(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT("tiny").eval()
    with torch.no_grad():  # zero gains/modulations make every output alike; perturb them (as save_random_checkpoint)
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("mod.lin") or "modulation" in name:
                p.normal_(0, 0.02)
        for block in model.blocks:  # gates of order 1, as trained: the blocks then make 72% of the output (1.7%
            block.mod.lin.normal_(0, 1.0)  # at 0.02), so their quantisation error is not diluted away
    return model


def inputs(cfg, B=2, Lt=5, gh=4, gw=3):
    g = torch.Generator().manual_seed(1)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 3:] = False
    pos, mask = joint_inputs(txtmask, gh, gw)
    img = torch.randn(B, gh * gw, cfg.token_dim, generator=g)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim, generator=g)
    return img, ctx, torch.rand(B, generator=g), pos, mask


@torch.no_grad()
def run(model, x):
    img, ctx, t, pos, mask = x
    dtype = model.first.weight.dtype
    return model(img.to(dtype), ctx.to(dtype), t, pos, mask).float()


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bytes of an 8-bit tensor, for exact comparisons (torch.equal has no fp8 kernel)."""
    return t.view(torch.uint8) if t.dtype in (FP8, torch.float8_e5m2) else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def quantized_names(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


# ---- the numbers ---------------------------------------------------------------------------------------------------


def weight_matrix() -> torch.Tensor:
    """Rows spanning four decades, one outlier, one all-zero row, a subnormal-range tail."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 10 ** torch.linspace(-3, 1, 64)[:, None]
    w[5, 7] = 40.0
    w[9] = 0
    w[10, :8] = torch.tensor([1e-6, -1e-6, 3e-4, 0, 2e-7, -5e-5, 1e-3, 0.5])
    return w


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_dequantize_error_bounds(fmt, per_row):
    w = weight_matrix()
    q, s = quantize_weight(w, fmt, per_row)
    qdtype, qmax = FORMATS[fmt]
    assert q.dtype == qdtype and q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == ((64, 1) if per_row else ())
    codes = q.float()
    assert torch.isfinite(codes).all() and codes.abs().max() == qmax  # full range used, nothing past it (NaN)
    if per_row:  # every non-zero row reaches the largest code: its own scale
        nonzero = w.abs().amax(1) > 0
        assert (codes.abs().amax(1)[nonzero] == qmax).all() and (codes[9] == 0).all()
    d = dequantize_weight(q, s)
    err = (d - w).abs()
    if fmt == "int8":  # round to nearest on a uniform grid of step `scale`
        bound = (s / 2).expand_as(w)
    else:  # e4m3: 3 mantissa bits, half an ulp is 2^-4 relative; subnormal spacing 2^-9 (of the scale) below 2^-6
        bound = torch.maximum(w.abs() * 2**-4, (s * 2**-10).expand_as(w))
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), float((err - bound).max())
    if per_row:  # per-row scales keep every Gaussian row accurate relative to itself, whatever its magnitude
        gaussian = [i for i in range(64) if i not in (5, 9, 10)]
        row_err = (err.norm(dim=1) / w.norm(dim=1))[gaussian]
        assert row_err.max() < (0.04 if fmt == "fp8" else 0.01)
    else:  # one scale for the tensor: the smallest rows lose precision (why per-row is the default); int8 drowns
        q_row, s_row = quantize_weight(w, fmt, per_row=True)
        row_err = float((dequantize_weight(q_row, s_row)[0] - w[0]).norm() / w[0].norm())
        assert float(err[0].norm() / w[0].norm()) > (0.5 if fmt == "int8" else 1.5 * row_err)
    # the activation dtypes: the codes are exact in each, fp16 stays accurate with scales below its normal range
    for dtype in (torch.bfloat16, torch.float16):
        assert dequantize_weight(q, s, dtype).dtype == dtype
        assert rel(dequantize_weight(q, s, dtype)[11:].float(), d[11:]) < 4e-3


def test_quantlinear_matches_its_dequantised_linear_and_keeps_its_storage():
    lin = nn.Linear(96, 48, bias=True)
    ql = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(3, 7, 96)
    ref = nn.functional.linear(x, dequantize_weight(ql.weight, ql.scale_weight), lin.bias)
    torch.testing.assert_close(ql(x), ref, rtol=0, atol=1e-6)
    assert rel(ql(x), lin(x)) < 0.01
    assert same(ql.bias.data, lin.bias.data) and not ql.bias.requires_grad
    assert [n for n, _ in ql.named_parameters()] == ["bias"]  # the codes and the scale are buffers
    assert sorted(ql.state_dict()) == ["bias", "scale_weight", "weight"]
    codes = ql.weight.clone()
    ql.to(torch.bfloat16)  # Module.to(dtype) would cast floating buffers (fp8 too): codes and scale must stay
    assert same(ql.weight, codes) and ql.scale_weight.dtype == torch.float32 and ql.bias.dtype == torch.bfloat16
    assert ql(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype is the compute dtype
        assert ql(x).dtype == torch.bfloat16
    f = QuantLinear.from_linear(lin, "fp8", per_row=False).half()
    assert f.weight.dtype == FP8 and f.scale_weight.shape == ()


# ---- the quantised DiT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_tiny_dit_is_close_and_the_rest_untouched(fmt):
    model = tiny_model()
    x = inputs(model.cfg)
    ref = run(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_dit(copy.deepcopy(model), fmt)
    cfg = model.cfg
    names = quantized_names(q)
    # the blocks' and text-fusion blocks' attention (wq wk wv gate wo) and MLP (gate up down) Linears, nothing else
    assert len(names) == 8 * (cfg.layers + 2 * cfg.txtblocks)
    assert all(QUANTIZED_MODULES.fullmatch(n) for n in names)
    linears = sorted(n for n, m in q.named_modules() if isinstance(m, nn.Linear))
    assert linears == ["first", "last.linear", "tmlp.0", "tmlp.2", "tproj.1", "txtfusion.projector", "txtmlp.1",
                       "txtmlp.3"]
    for k, v in q.state_dict().items():
        module = k.rpartition(".")[0]
        if module in names and k.endswith(("weight", "scale_weight")):
            assert v.dtype == (FP8 if fmt == "fp8" else torch.int8) or k.endswith("scale_weight")
        else:  # norms, modulations, embeddings, projector, last layer: bit-identical, same dtype
            assert same(v, before[k]), k
    assert quantized_format(q) == fmt and quantized_format(model) is None
    err = rel(run(q, x), ref)
    assert 0 < err < TOLERANCE[fmt], err
    # per tensor is allowed the same budget; bf16 activations add bf16's own rounding
    assert rel(run(quantize_dit(copy.deepcopy(model), fmt, per_row=False), x), ref) < TOLERANCE[fmt]
    assert rel(run(copy.deepcopy(q).to(torch.bfloat16), x), ref) < TOLERANCE[fmt] + 0.005
    # the scales matter: a model whose scales are dropped is nowhere near
    broken = copy.deepcopy(q)
    for m in broken.modules():
        if isinstance(m, QuantLinear):
            m.scale_weight = torch.ones_like(m.scale_weight)
    assert rel(run(broken, x), ref) > 0.5


def test_pipeline_refuses_loras_on_a_quantized_dit():
    from krea2.pipeline import Pipeline

    pipe = Pipeline(quantize_dit(tiny_model(), "fp8"), None, None, None, 32)
    with pytest.raises(Krea2Error, match="fp8-quantised"):
        pipe.load_lora("nope.safetensors")
    # merging would add ΔW to the stored 8-bit values without their scales: refused where the rule lives
    from krea2.models.lora import LoRA, LoRAModule, lora_modules, merge_lora

    name, (out_f, in_f) = next(iter(lora_modules(tiny_model()).items()))
    lora = LoRA({name: LoRAModule(torch.zeros(2, in_f), torch.zeros(out_f, 2), 2.0)})
    with pytest.raises(Krea2Error, match="int8-quantised"):
        merge_lora(quantize_dit(tiny_model(), "int8"), lora)


# ---- files ---------------------------------------------------------------------------------------------------------


def comfy_file(model: DiT, path, prefix: str, scale_name: str, per_row: bool):
    """A scaled-fp8 file written the way ComfyUI tools write them, without our writer: fp8 block weights with a
    float32 scale each (scalar, or one per row), a `scale_input` on some layers, an fp8 `tproj` too (tools quantise
    more than we do), the rest in bf16, the marker as community converters write it (two elements).
    Returns {module: (codes, scale)}."""
    sd, written = {}, {}
    lins = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for k, v in model.state_dict().items():
        module = k.rpartition(".")[0]
        if k.endswith(".weight") and module in lins and (QUANTIZED_MODULES.fullmatch(module) or module == "tproj.1"):
            amax = v.abs().amax(1) if per_row else v.abs().amax()
            scale = (amax / 448).float()
            codes = (v / (scale[:, None] if per_row else scale)).clamp(-448, 448).to(FP8)
            sd[prefix + k], sd[f"{prefix}{module}.{scale_name}"] = codes, scale
            written[module] = (codes, scale)
            if module.endswith("attn.wq"):
                sd[f"{prefix}{module}.scale_input"] = torch.ones(())
        else:
            sd[prefix + k] = v.to(torch.bfloat16)
    sd[prefix + MARKER] = torch.empty(2, dtype=FP8)
    save_file(sd, str(path))
    return written


@pytest.mark.parametrize("prefix,scale_name,per_row", [
    ("model.diffusion_model.", "scale_weight", False),  # ComfyUI's own layout: scalar scale_weight
    ("diffusion_model.", "weight_scale", True),  # per-row weight_scale (out,), the newer files' name
])
def test_comfyui_scaled_fp8_file_loads_and_matches(tmp_path, prefix, scale_name, per_row):
    model = tiny_model()
    path = tmp_path / "krea2-fp8-scaled.safetensors"
    written = comfy_file(model, path, prefix, scale_name, per_row)
    loaded = load_dit(path, dtype=torch.float32)  # architecture read off the shapes, as for a released file
    assert quantized_names(loaded) == sorted(written)
    for name, (codes, scale) in written.items():
        m = loaded.get_submodule(name)
        assert same(m.weight, codes)  # the file's bytes, not widened
        assert torch.equal(m.scale_weight, scale.reshape(-1, 1) if per_row else scale)
    # the reference: a float32 DiT holding the file's dequantised weights (ComfyUI's weight.to(dtype) * scale)
    sd = {k: v.float() for k, v in load_dit_plain_tensors(path, prefix).items()}
    for name, (codes, scale) in written.items():
        sd[f"{name}.weight"] = codes.float() * (scale[:, None] if per_row else scale)
    ref = DiT(model.cfg).eval()
    ref.load_state_dict(sd)
    x = inputs(model.cfg)
    torch.testing.assert_close(run(loaded, x), run(ref, x), rtol=0, atol=1e-5)
    assert rel(run(loaded, x), run(model, x)) < TOLERANCE["fp8"]  # with bf16 rest and fp8 tproj: 0.030-0.032


def load_dit_plain_tensors(path, prefix) -> dict[str, torch.Tensor]:
    """The file's tensors that are not scales or markers, prefix removed."""
    with safe_open(str(path), "pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys()
                if not k.endswith(("scale_weight", "weight_scale", "scale_input")) and not k.endswith(MARKER)}


@pytest.mark.parametrize("per_row", [False, True])
def test_our_fp8_file_round_trips(tmp_path, per_row):
    model = tiny_model()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_fp8(model, a, per_row=per_row)
    with safe_open(str(a), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(MARKER).dtype == FP8 and f.get_tensor(MARKER).numel() == 0
        assert f.get_tensor("blocks.0.attn.wq.weight").dtype == FP8
        assert f.get_tensor("blocks.0.attn.wq.scale_weight").shape == ((64, 1) if per_row else ())
        assert f.get_tensor("tproj.1.weight").dtype == torch.float32  # kept as stored
        assert "per " + ("row" if per_row else "tensor") in f.metadata()["quantization"]
    assert keys == set(model.state_dict()) | {f"{n}.scale_weight" for n in quantized_names(
        quantize_dit(copy.deepcopy(model), "fp8"))} | {MARKER}
    loaded = load_dit(a)
    expected = quantize_dit(copy.deepcopy(model), "fp8", per_row)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for k, v in expected.state_dict().items():
        assert same(loaded.state_dict()[k], v), k
    x = inputs(model.cfg)
    assert torch.equal(run(loaded, x), run(expected, x))
    save_fp8(loaded, b)  # a quantised model is written as it is: byte-identical tensors
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        assert all(same(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    save_quantized(model, tmp_path / "i8.safetensors", "int8", per_row=True)  # our int8 files: same names, no marker
    i8 = load_dit(tmp_path / "i8.safetensors")
    assert quantized_format(i8) == "int8"
    with safe_open(str(tmp_path / "i8.safetensors"), "pt") as f:
        assert MARKER not in f.keys()
    with pytest.raises(Krea2Error, match="int8-quantised; cannot write it as fp8"):
        save_fp8(i8, b)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_while_loading_equals_quantizing_in_memory(tmp_path, fmt):
    model = tiny_model()
    path = tmp_path / "model.safetensors"
    save_dit(model, path, dtype=torch.bfloat16)
    streamed = load_dit(path, quantize=fmt)
    in_memory = quantize_dit(load_dit(path), fmt)
    assert streamed.state_dict().keys() == in_memory.state_dict().keys()
    for k, v in in_memory.state_dict().items():
        assert same(streamed.state_dict()[k], v), k
    assert load_dit(path, dtype=torch.float32, quantize=fmt).first.weight.dtype == torch.float32
    save_fp8(model, tmp_path / "fp8.safetensors")
    if fmt == "int8":
        with pytest.raises(Krea2Error, match="already fp8-quantised"):
            load_dit(tmp_path / "fp8.safetensors", quantize="int8")
    else:
        assert quantized_format(load_dit(tmp_path / "fp8.safetensors", quantize="fp8")) == "fp8"
    with pytest.raises(Krea2Error, match="unknown quantisation 'fp4'"):
        load_dit(path, quantize="fp4")


def test_bad_scaled_files_are_one_line_errors(tmp_path):
    model = tiny_model()
    base = {k: v for k, v in model.state_dict().items()}
    w = base["blocks.0.attn.wq.weight"]
    cases = {
        "per row": ({"blocks.0.attn.wq.weight": w.to(FP8), "blocks.0.attn.wq.scale_weight": torch.ones(3)},
                    "has shape (3,)"),
        "int8 without scale": ({"blocks.0.attn.wq.weight": w.to(torch.int8)}, "without a scale_weight"),
        "scale of a float weight": ({"blocks.0.attn.wq.scale_weight": torch.ones(())}, "but stores its weight in"),
        "not a Linear": ({"blocks.0.prenorm.scale": base["blocks.0.prenorm.scale"],
                          "blocks.0.attn.wq.weight": w.to(FP8), "blocks.0.mod.scale_weight": torch.ones(())},
                         "not a Linear layer"),
    }
    for name, (changes, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({**base, **changes}, str(path))
        with pytest.raises(Krea2Error, match=re.escape(needle)) as e:
            load_dit(path)
        assert "\n" not in str(e.value), name
    plain = tmp_path / "plain-fp8.safetensors"  # an unscaled fp8 cast (ComfyUI's plain fp8 files): scale 1
    save_file({**base, "blocks.0.attn.wq.weight": w.to(FP8)}, str(plain))
    m = load_dit(plain)
    assert quantized_names(m) == ["blocks.0.attn.wq"] and float(m.blocks[0].attn.wq.scale_weight) == 1.0


# ---- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_generate_and_export_quantized(ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "fp8"
    res = runner.invoke(cli.app, ["export", str(ckpt), str(out), "--to", "krea2", "--dtype", "fp8"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((out / "config.json").read_text())["model"] == json.loads((ckpt / "config.json").read_text())[
        "model"]
    assert quantized_format(load_dit(out / "model.safetensors")) == "fp8"
    for args in (["--checkpoint", str(out)], ["--checkpoint", str(ckpt), "--quantize", "int8"]):
        res = runner.invoke(cli.app, ["generate", "a red square", *args, "--steps", "2", "--out", str(tmp_path / "g")])
        assert res.exit_code == 0, (res.output, res.exception)
        assert (tmp_path / "g" / "0000.png").is_file()


def test_bad_quantize_options_exit_2_with_one_line(ckpt, tmp_path, cli_error):
    lora = tmp_path / "l.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    cases = {
        "bad value": (["generate", "x", "--checkpoint", ckpt, "--quantize", "fp4"], "unknown --quantize 'fp4'"),
        "with a lora": (["generate", "x", "--checkpoint", ckpt, "--quantize", "fp8", "--lora", lora],
                        "cannot be combined with --quantize"),
        "fp8 diffusers": (["export", ckpt, tmp_path / "d", "--to", "diffusers", "--dtype", "fp8"], "--to krea2 only"),
    }
    for name, (args, needle) in cases.items():
        code, err = cli_error(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert "Traceback" not in err


def test_training_from_an_8bit_checkpoint_gets_trainable_fp32_weights(tmp_path):
    from krea2.models.dit import DiT
    from krea2.models.quantize import quantize_dit, save_fp8
    from krea2.train.models import load_master_weights

    save_fp8(quantize_dit(DiT("tiny-world"), "fp8"), tmp_path / "m.safetensors")
    model = load_master_weights(tmp_path / "m.safetensors")
    wq = model.blocks[0].attn.wq
    assert type(wq) is torch.nn.Linear and wq.weight.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())  # every layer trains, none is a frozen 8-bit buffer
