"""The DiT: released layout, diffusers parity, masking invariances, loading errors."""

import json

import pytest
import torch
from conftest import SHARED_REFERENCE, fixture_dirs

from krea2.errors import Krea2Error
from krea2.models.convert import export_diffusers, to_diffusers
from krea2.models.dit import PRESETS, DiT, DiTConfig
from krea2.models.loading import infer_config, load_dit, save_dit
from krea2.sampling import joint_inputs, patchify


def random_model(preset="tiny", seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(preset)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1 or p.shape[0] == 2:
                p.normal_(0, 0.1)  # norms and modulations are zero at init; randomise to exercise them
    return m.eval()


def random_inputs(cfg: DiTConfig, B=2, Lt=5, gh=4, gw=6, pad=(0, 2)):
    img = torch.randn(B, gh * gw, cfg.token_dim)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    for b, n in enumerate(pad):
        if n:
            txtmask[b, -n:] = False
    pos, mask = joint_inputs(txtmask, gh, gw)
    return img, ctx, torch.rand(B), pos, mask, txtmask


@pytest.mark.skipif(not (SHARED_REFERENCE / "krea2-12b-state-dict.json").is_file(),
                    reason="the shared reference (../shared/reference) is not beside this checkout")
def test_released_state_dict_names_and_shapes():
    ref = json.loads((SHARED_REFERENCE / "krea2-12b-state-dict.json").read_text())
    with torch.device("meta"):
        model = DiT("krea2-12b")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    assert sum(v.numel() for v in model.state_dict().values()) == 12_820_073_036


@pytest.mark.parametrize("d", fixture_dirs(), ids=lambda d: d.name)
def test_fixture_config_loads(d):
    cfg = DiTConfig(**json.loads((d / "config.json").read_text())["model"])
    assert infer_config(DiT(cfg).state_dict(), patch=cfg.patch, theta=cfg.theta) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_infer_config_roundtrip(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        sd = DiT(cfg).state_dict()
    assert infer_config(sd, patch=cfg.patch, theta=cfg.theta) == cfg


def test_output_independent_of_masked_text_slots():
    m = random_model()
    img, ctx, t, pos, mask, txtmask = random_inputs(m.cfg, pad=(0, 0))
    with torch.no_grad():
        ref = m(img, ctx, t, pos, mask)
        # append 7 masked text slots full of garbage: valid outputs must not move
        extra = torch.randn(2, 7, *ctx.shape[2:]) * 100
        ctx2 = torch.cat([ctx, extra], 1)
        txt2 = torch.cat([txtmask, torch.zeros(2, 7, dtype=torch.bool)], 1)
        pos2, mask2 = joint_inputs(txt2, 4, 6)
        out = m(img, ctx2, t, pos2, mask2)
    assert (out - ref).abs().max() < 1e-5


def test_padding_to_256_like_the_release_changes_nothing():
    m = random_model()
    img, ctx, t, pos, mask, _ = random_inputs(m.cfg)
    with torch.no_grad():
        ref = m(img, ctx, t, pos, mask)
        # the official forward pads h, pos and mask to a multiple of 256; emulate via extra masked text slots
        Lt, N = ctx.shape[1], img.shape[1]
        n_pad = (-(Lt + N)) % 256
        ctx_p = torch.cat([ctx, torch.zeros(2, n_pad, *ctx.shape[2:])], 1)
        txt_p = torch.cat([mask[:, :Lt], torch.zeros(2, n_pad, dtype=torch.bool)], 1)
        pos_p, mask_p = joint_inputs(txt_p, 4, 6)
        out = m(img, ctx_p, t, pos_p, mask_p)
    assert (out - ref).abs().max() < 1e-5


def test_diffusers_parity():
    m = random_model()
    img, ctx, t, pos, mask, txtmask = random_inputs(m.cfg)
    tf = to_diffusers(m)
    with torch.no_grad():
        ours = m(img, ctx, t, pos, mask)
        theirs = tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
    assert (ours - theirs).abs().max() < 1e-5


def test_export_diffusers_from_pretrained(tmp_path):
    from diffusers import Krea2Transformer2DModel

    m = random_model()
    export_diffusers(m, tmp_path / "tf")
    tf = Krea2Transformer2DModel.from_pretrained(tmp_path / "tf").eval()
    img, ctx, t, pos, mask, txtmask = random_inputs(m.cfg)
    with torch.no_grad():
        assert (m(img, ctx, t, pos, mask) - tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]).abs().max() < 1e-5


def test_save_load_roundtrip_strict(tmp_path):
    m = random_model()
    save_dit(m, tmp_path / "m.safetensors")
    m2 = load_dit(tmp_path / "m.safetensors")  # config inferred from shapes
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_bf16_autocast_close_to_fp32():
    m = random_model("bench")
    img, ctx, t, pos, mask, _ = random_inputs(m.cfg)
    with torch.no_grad():
        ref = m(img, ctx, t, pos, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(img, ctx, t, pos, mask)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_loading_errors(tmp_path):
    with pytest.raises(Krea2Error, match="not found"):
        load_dit(tmp_path / "nope.safetensors")
    pt = tmp_path / "w.ckpt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(Krea2Error, match="not a safetensors file"):
        load_dit(pt)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(Krea2Error, match="not a readable safetensors"):
        load_dit(garbage)
    m = random_model()
    save_dit(m, tmp_path / "m.safetensors")
    with pytest.raises(Krea2Error, match="missing tensor"):
        load_dit(tmp_path / "m.safetensors", cfg=PRESETS["bench"])
    big = DiTConfig(**{**PRESETS["tiny"].to_dict(), "features": 128, "heads": 8})
    with pytest.raises(Krea2Error, match="wrong shape"):
        load_dit(tmp_path / "m.safetensors", cfg=big)


def test_patchify_layout():
    lat = torch.arange(2 * 3 * 4 * 4).float().reshape(2, 3, 4, 4)
    tok = patchify(lat, 2)
    # token 1 = grid (0, 1); feature c*4 + dy*2 + dx
    assert tok[0, 1, 1 * 4 + 1 * 2 + 0] == lat[0, 1, 1, 2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_match_diffusers(precision):
    # the hand-written backward of the fused norm+modulation and the pruned last block must give autograd's gradients
    from krea2.models.convert import to_diffusers_state_dict

    m = random_model().train()
    tf = to_diffusers(m).train()
    img, ctx, t, pos, mask, txtmask = random_inputs(m.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ours = m(img, ctx, t, pos, mask)
        theirs = tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
        ours.float().square().mean().backward()
        theirs.float().square().mean().backward()
    assert ours.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    ga = to_diffusers_state_dict({k: p.grad for k, p in m.named_parameters()})
    gb = {k: p.grad for k, p in tf.named_parameters()}
    assert ga.keys() == gb.keys()
    tol = 1e-5 if precision == "fp32" else 0.1  # bf16: two different rounding paths, relative to the largest entry
    for k in gb:
        assert gb[k].abs().max() > 0, k
        assert (ga[k] - gb[k]).abs().max() <= tol * gb[k].abs().max(), k


def test_return_hidden_is_the_image_tokens_after_block_k():
    m = random_model()
    img, ctx, t, pos, mask, _ = random_inputs(m.cfg)
    N = img.shape[1]
    seen = {}
    hooks = [blk.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out[:, -N:]))
             for i, blk in enumerate(m.blocks)]
    with torch.no_grad():
        ref = m(img, ctx, t, pos, mask)
        for k in range(1, m.cfg.layers + 1):
            out, hidden = m(img, ctx, t, pos, mask, return_hidden=k)
            assert torch.equal(out, ref) and hidden.shape == (2, N, m.cfg.features)
            assert torch.equal(hidden, seen[k - 1])
    for h in hooks:
        h.remove()


def test_bf16_cpu_attention_matches_sdpa():
    from krea2.models.dit import attention

    q, k, v = torch.randn(2, 8, 20, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., 5:9] = False
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)  # the grouped-matmul path
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert (out.float() - ref).abs().max() < 0.05


def test_safetensors_header_length_may_look_like_pickle(tmp_path):
    # the u64 header length is the first thing in the file; a low byte of 0x80 is a valid safetensors file
    from krea2.models.loading import read_safetensors

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (0x80 - len(header))
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert torch.equal(read_safetensors(path)["w"], torch.tensor([1.0, 2.0]))


def test_text_padding_is_dropped_and_outputs_match_diffusers():
    # released layout: prompt tokens, padding, then the 5 suffix tokens; the short caption's padding sits mid-text
    m = random_model()
    img, ctx, t, _, _, _ = random_inputs(m.cfg, Lt=12)
    txtmask = torch.ones(2, 12, dtype=torch.bool)
    txtmask[0, 3:10] = False  # 5 valid
    txtmask[1, 8:9] = False  # 11 valid
    pos, mask = joint_inputs(txtmask, 4, 6)
    lengths = []
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    tf = to_diffusers(m)
    with torch.no_grad():
        ours = m(img, ctx, t, pos, mask)
        theirs = tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
    hook.remove()
    assert lengths == [11 + 24]  # the longest caption's valid tokens + image tokens
    assert (ours - theirs).abs().max() < 1e-5


def test_reference_segment_leaves_the_release_path_unchanged():
    """[text; reference; image]: no reference is the release; a fully masked one changes nothing; one that is
    attended to changes the image tokens and gets gradients."""
    from krea2.sampling import Conditioning, guided_velocity

    torch.manual_seed(0)
    m = DiT("tiny")
    for p in m.parameters():  # zero-initialised gains would hide any effect of the extra tokens
        torch.nn.init.normal_(p, std=0.1)
    B, gh, gw, Lt, Nr = 2, 2, 3, 4, 5
    img = torch.randn(B, gh * gw, m.cfg.token_dim)
    ctx = torch.randn(B, Lt, m.cfg.txtlayers, m.cfg.txtdim)
    txtmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    t = torch.rand(B)
    base = guided_velocity(m, img, t, Conditioning.build(ctx, txtmask, gh, gw), None, 0.0)
    ref = torch.randn(B, Nr, m.cfg.features, requires_grad=True)
    masked = Conditioning.build(ctx, txtmask, gh, gw, reference=ref, refmask=torch.zeros(B, Nr, dtype=torch.bool))
    assert masked.pos.shape == (B, Lt + Nr + gh * gw, 3) and (masked.pos[:, Lt:Lt + Nr, 0] == 1).all()
    torch.testing.assert_close(guided_velocity(m, img, t, masked, None, 0.0), base, atol=1e-6, rtol=0)
    seen = guided_velocity(m, img, t, Conditioning.build(ctx, txtmask, gh, gw, reference=ref), None, 0.0)
    assert (seen - base).abs().max() > 1e-3
    seen.square().sum().backward()
    assert ref.grad is not None and ref.grad.abs().sum() > 0
