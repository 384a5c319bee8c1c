"""Text encoders: the released Qwen3-VL call on a tiny random Qwen3-VL, MiniLM, hf: specs, caching, errors."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from krea2.errors import Krea2Error
from krea2.models.text_encoders import (
    QWEN3_VL_PREFIX,
    QWEN3_VL_SUFFIX,
    EncodingCache,
    encode_cached,
    load_text_encoder,
    parse_spec,
)

WORDS = ("system user assistant Describe the image by detailing color shape size texture quantity text spatial "
         "relationships of objects and background a red cat on blue mat").split()
RELEASE_TAPS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)


def word_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Words, ',', ':' and newlines are tokens; the chat markers are special tokens, like Qwen's."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "\n", ",", ":"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"[,:]"), behavior="isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>" if pad else None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random Qwen3-VL with the real depth (36 layers) but width 16, saved with a tokenizer."""
    path = tmp_path_factory.mktemp("qwen3vl")
    tokenizer = word_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=36,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_text_encoder(f"qwen3-vl:{qwen_dir}")


def test_parse_spec():
    assert parse_spec("qwen3-vl:/m/Qwen3-VL") == ("qwen3-vl", "/m/Qwen3-VL", {})
    assert parse_spec("hf:/a/b:layers=1+2,max_length=8") == ("hf", "/a/b", {"layers": (1, 2), "max_length": 8})
    assert parse_spec("minilm:max_length=32") == ("minilm", "", {"max_length": 32})
    with pytest.raises(Krea2Error):
        parse_spec("minilm:layer=2")


def test_qwen3_vl_template_layout(qwen):
    tok = qwen.tokenizer
    prefix_ids = tok(QWEN3_VL_PREFIX)["input_ids"]
    suffix_ids = tok(QWEN3_VL_SUFFIX)["input_ids"]
    assert len(prefix_ids) == qwen.drop_leading_tokens == 34 and len(suffix_ids) == qwen.suffix_tokens == 5
    assert qwen.layers == RELEASE_TAPS and (qwen.n_layers, qwen.dim, qwen.max_length) == (12, 16, 512)

    ids, mask = qwen.tokenize(["a red cat", ""])
    assert ids.shape == (2, 512 + 34) and mask.shape == (2, 546)
    cat = tok("a red cat")["input_ids"]
    for row in ids:  # prefix at 0-33, prompt after it, right padding, then the 5 suffix tokens at the very end
        assert row[:34].tolist() == prefix_ids and row[-5:].tolist() == suffix_ids
    assert ids[0, 34:37].tolist() == cat and (ids[0, 37:541] == tok.pad_token_id).all()
    assert mask[0].sum() == 34 + 3 + 5 and mask[1].sum() == 34 + 5

    states, valid = qwen.encode(["a red cat", ""])
    assert states.shape == (2, 512, 12, 16) and states.dtype == torch.float32 and valid.dtype == torch.bool
    assert valid[0, :3].all() and valid[0, -5:].all() and valid[0].sum() == 8  # prompt + suffix only
    assert valid[1, -5:].all() and valid[1].sum() == 5  # the unconditional: 5 suffix tokens
    assert (states[~valid] == 0).all() and (states[valid].abs().sum(-1) > 0).all()


def test_qwen3_vl_equals_release_call(qwen, qwen_dir):
    """The release's conditioner, written out with its constants, on the raw HF model and tokenizer."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(qwen_dir).eval()
    tok = qwen.tokenizer
    prompts = ["a red cat on a blue mat", "shape"]
    body = tok([QWEN3_VL_PREFIX + p for p in prompts], truncation=True, padding="max_length", max_length=541,
               return_tensors="pt")
    suffix = tok([QWEN3_VL_SUFFIX] * 2, return_tensors="pt")
    input_ids = torch.cat([body["input_ids"], suffix["input_ids"]], 1)
    mask = torch.cat([body["attention_mask"], suffix["attention_mask"]], 1)
    # transformers 4.57.1 (release pin) text-only positions: cumsum of the mask, padding at 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[None].expand(3, -1, -1)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    want = torch.stack([out.hidden_states[i] for i in RELEASE_TAPS], dim=2)[:, 34:]
    want_mask = mask[:, 34:].bool()

    states, valid = qwen.encode(prompts)
    assert torch.equal(valid, want_mask)
    torch.testing.assert_close(states[valid], want[want_mask], rtol=0, atol=1e-6)


def test_qwen3_vl_valid_rows_independent_of_padding_and_batch(qwen_dir, qwen):
    short = load_text_encoder(f"qwen3-vl:{qwen_dir}:max_length=16")
    assert short.max_length == 16
    alone, m_alone = qwen.encode(["a red cat"])
    batch, m_batch = short.encode(["a red cat", "the image of a red cat on a blue mat"])
    assert m_alone[0].sum() == m_batch[0].sum() == 8
    # the suffix rows sit 504 slots later in `alone`: equal only if positions ignore the padding, like the release
    torch.testing.assert_close(alone[0][m_alone[0]], batch[0][m_batch[0]], rtol=0, atol=1e-5)


def test_qwen3_vl_truncation_keeps_prefix_and_suffix(qwen_dir):
    enc = load_text_encoder(f"qwen3-vl:{qwen_dir}:max_length=16,layers=35")
    long_prompt = " ".join(WORDS * 3)
    ids, mask = enc.tokenize([long_prompt])
    assert ids.shape == (1, 16 + 34) and mask.all()
    assert ids[0, 34:45].tolist() == enc.tokenizer(long_prompt)["input_ids"][:11]  # 16 - 5 prompt slots survive
    assert ids[0, 45:].tolist() == enc.tokenizer(QWEN3_VL_SUFFIX)["input_ids"]
    states, valid = enc.encode([long_prompt])
    assert states.shape == (1, 16, 1, 16) and valid.all()


def test_layer_taps_are_checked(qwen_dir):
    with pytest.raises(Krea2Error, match="out of range"):
        load_text_encoder(f"qwen3-vl:{qwen_dir}:layers=2+37")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_taps_hidden_states(minilm):
    from transformers import AutoModel

    assert (minilm.n_layers, minilm.dim, minilm.max_length, minilm.layers) == (3, 384, 64, (2, 4, 6))
    states, valid = minilm.encode(["a cat on a mat", ""])
    assert states.shape == (2, 64, 3, 384) and valid.shape == (2, 64)
    assert valid.sum(1).tolist() == [7, 2]  # [CLS] a cat on a mat [SEP]; [CLS] [SEP]
    bert = AutoModel.from_pretrained(minilm.model.name_or_path, local_files_only=True).eval()
    t = minilm.tokenizer(["a cat on a mat"], return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**t, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[0, :7], torch.stack([hidden[i][0] for i in (2, 4, 6)], 1), rtol=0, atol=1e-5)

    small = load_text_encoder("minilm:max_length=8,layers=6")
    ids, _ = small.tokenize(["a cat on a mat in the house at night"])
    assert ids[0, 0] == small.tokenizer.cls_token_id and ids[0, -1] == small.tokenizer.sep_token_id  # truncated
    s, v = small.encode(["a cat on a mat in the house at night"])
    assert s.shape == (1, 8, 1, 384) and v.all()


def test_hf_spec_with_decoder_lm(tmp_path):
    torch.manual_seed(0)
    tok = word_tokenizer(pad=False)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    Qwen3Model(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = load_text_encoder(f"hf:{tmp_path}:layers=1+3,max_length=12")
    assert (enc.n_layers, enc.dim, enc.max_length) == (2, 16, 12)
    alone, m1 = enc.encode(["a red cat"])
    batch, m2 = enc.encode(["a red cat", "the image of a red cat on a blue mat"])
    assert m1[0].sum() == 3 and m1[0, :3].all()
    torch.testing.assert_close(alone[0], batch[0], rtol=0, atol=1e-5)  # right padding leaves causal rows alone
    assert enc.layers == (1, 3) and load_text_encoder(f"hf:{tmp_path}").layers == (2,)


def test_missing_models_give_one_line_errors(tmp_path):
    for spec, hint in [(f"qwen3-vl:{tmp_path}/nope", "KREA2_TEXT_ENCODER"),
                       ("hf:no-such-org/no-such-model", "huggingface-cli download no-such-org/no-such-model")]:
        with pytest.raises(Krea2Error) as e:
            load_text_encoder(spec)
        assert "\n" not in str(e.value) and "huggingface-cli download" in str(e.value) and hint in str(e.value)
    with pytest.raises(Krea2Error, match="cannot load") as e:  # a folder without a model in it
        load_text_encoder(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)
    with pytest.raises(Krea2Error, match="unknown text encoder"):
        load_text_encoder("t5:/x")


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []
        self.max_length, self.identity = encoder.max_length, encoder.identity

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder.encode(prompts)


def test_encode_cached_stores_valid_rows_and_repads(qwen_dir, tmp_path):
    qwen = load_text_encoder(f"qwen3-vl:{qwen_dir}:max_length=16")
    enc = CountingEncoder(qwen)
    cache = EncodingCache(directory=tmp_path / "cache")
    prompts = ["a red cat", "", "a red cat"]
    states, mask = encode_cached(enc, prompts, cache)
    assert enc.calls == [["a red cat", ""]]  # duplicates encoded once
    direct, dmask = qwen.encode(prompts)
    assert states.shape == direct.shape and mask.sum(1).tolist() == dmask.sum(1).tolist() == [8, 5, 8]
    for i in range(3):  # valid rows packed at the front, in order: prompt tokens then suffix tokens
        n = int(dmask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any() and (states[i, n:] == 0).all()
        torch.testing.assert_close(states[i, :n], direct[i][dmask[i]], rtol=0, atol=0)

    again, _ = encode_cached(enc, ["", "a red cat"], cache, length=10)
    assert len(enc.calls) == 1 and again.shape == (2, 10, 12, 16)

    fresh = EncodingCache(directory=tmp_path / "cache", keep_in_memory=False)  # from disk only
    from_disk, disk_mask = encode_cached(enc, prompts, fresh)
    assert len(enc.calls) == 1 and torch.equal(from_disk, states) and torch.equal(disk_mask, mask)

    other = CountingEncoder(qwen)
    other.identity = "another encoder"
    encode_cached(other, ["a red cat"], fresh)
    assert other.calls == [["a red cat"]]  # keys include the encoder: no stale rows from another model
