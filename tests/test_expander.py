"""The prompt expander (krea2.expander): grammar, rewards and gates, TRL stages, loading, CLI, eval."""

import json

import numpy as np
import pytest
import torch

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker
from krea2.eval.world_eval import prompts_path
from krea2.expander import data, grammar, rewards
from krea2.expander.model import Expander, build_model, build_tokenizer, load_expander, save_expander


def _user(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "tag"}


# ------------------------------------------------------------------------------------------------------ grammar
@pytest.mark.parametrize("name", ["world_eval", "world_eval_small"])
def test_parser_reads_every_eval_prompt_into_its_record(name):
    for rec in checker.load_prompts(prompts_path(name)):
        assert grammar.prompt_record(rec["prompt"]) == _user(rec), rec["prompt"]


def test_every_cascade_caption_is_faithful_to_what_it_states():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = world.sample_scene(rng)
        caps = world.captions(scene, rng)
        full = {"prompt": "", **world.scene_to_record(scene)}
        assert rewards.text_faithful(caps["long"], full), caps["long"]  # the long caption names everything
        for kind in ("medium", "short"):
            assert rewards.text_faithful(caps[kind], grammar.prompt_record(caps[kind])), caps[kind]
            assert grammar.parse(caps[kind]).n_objects == len(scene.objects)
            assert not grammar.parse(caps[kind]).unknown


def test_expansions_at_every_level_keep_the_requirements_and_decide_what_the_level_says():
    rng = np.random.default_rng(0)
    for rec in checker.load_prompts(prompts_path("world_eval_small")):
        scene = grammar.complete_scene(rec, rng)
        assert checker.matches(grammar.scene_detection(scene), rec)
        for level in ("low", "medium", "high"):
            text = grammar.expansion_text(scene, rec, level, rng)
            assert rewards.text_faithful(text, _user(rec)), (level, text)
            parsed = grammar.parse(text)
            assert parsed.background == scene.background and parsed.style == scene.style
            said = {a for p in parsed.phrases for a in ("color", "size", "position") if getattr(p, a)}
            fixed = {a for o in rec["objects"] for a in o if a in ("color", "size", "position")}
            assert said <= set(grammar.DECIDES[level]) | fixed, (level, text)


def test_text_faithfulness_catches_each_kind_of_unfaithful_expansion():
    rec = grammar.prompt_record("a green square to the right of a red circle")
    good = "a large green square on the right and a small red circle in the center, on a white background"
    assert rewards.text_faithful(good, rec)
    for bad in ("a large blue square on the right and a small red circle in the center",  # attribute changed
                "a large green square on the right",  # object dropped
                "a green square on the right, a red circle in the center and a blue triangle at the top",  # added
                "a green square on the left and a red circle in the center"):  # relation broken
        assert not rewards.text_faithful(bad, rec), bad
    # content the parser cannot place is never dropped silently: the constraint gate refuses it
    for stray in ("a green square to the right of a red circle and squares", "a green square on the right and a red "
                  "circle at the top left", "a green square to the right of a red circle and 2 triangles"):
        assert grammar.parse(stray).unknown and not rewards.verified(stray, rec), stray
    assert rewards.text_requirements(good, rec) == {"object count": True, "object 0": True, "object 1": True,
                                                     "relation 0": True}


def test_prompt_record_refuses_what_names_nothing_and_complete_scene_what_cannot_exist():
    with pytest.raises(Krea2Error, match="names no object"):
        grammar.prompt_record("a dog on a beach")
    with pytest.raises(Krea2Error, match="cannot place: dog"):  # outside the grammar: nothing to check against
        grammar.prompt_record("a red circle and a dog")
    with pytest.raises(Krea2Error, match="two backgrounds"):
        grammar.prompt_record("a circle on a white background on a black background")
    with pytest.raises(Krea2Error, match="1 to 4 objects"):
        grammar.complete_scene(grammar.prompt_record("four circles and two squares"), np.random.default_rng(0))
    with pytest.raises(Krea2Error, match="unknown creativity"):
        grammar.check_level("extreme")


def test_sft_pairs_are_in_format_faithful_and_cover_the_levels():
    pairs = data.sft_pairs(60, seed=1)
    assert {p["prompt"].split(":")[0] for p in pairs} == {"expand low", "expand medium", "expand high"}
    for p in pairs:
        assert rewards.format_ok(p["completion"])
        prompt = p["prompt"].split(": ", 1)[1].strip()
        caption = data.split_completion(p["completion"])
        assert rewards.text_faithful(caption, grammar.prompt_record(prompt)), p
        assert rewards.constraint_ok(grammar.parse(caption))


# ------------------------------------------------------------------------------------------------------ rewards
class _FakePipe:
    """Draws the perfect render of what a caption says (complete_scene of its record, seed-deterministic)."""

    def generate(self, texts, seeds):
        out = []
        for t, s in zip(texts, seeds):
            scene = grammar.complete_scene(grammar.prompt_record(t), np.random.default_rng(s))
            out.append(torch.from_numpy(world.render(scene, 32, s)).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)


def _completion(caption: str, prompt: str) -> str:
    return f"{grammar.intent_text(grammar.prompt_record(prompt))} | caption: {caption}"


def test_each_reward_gives_one_value_per_completion_and_gates_zero_every_term():
    judge = rewards.ExpansionRewards(pipeline=_FakePipe())
    prompt = data.model_input("a red circle", "medium")
    record = json.dumps(grammar.prompt_record("a red circle"))
    comps = [_completion("a large red circle on a white background, in flat style", "a red circle"),
             _completion("a small red circle on a black background, in striped style", "a red circle"),
             _completion("a large blue circle on a white background", "a red circle"),  # unfaithful, in format
             _completion("a red circle and a dog on a white background", "a red circle"),  # new subject: gated
             "a red circle on a white background"]  # no intent: format gate
    args = ([prompt] * 5, comps, [record] * 5)
    values = {f.__name__: f(*args) for f in judge.reward_funcs()}
    assert set(values) == {"text_faithfulness", "image_faithfulness", "image_diversity"}
    for v in values.values():
        assert len(v) == 5 and all(isinstance(x, float) for x in v)
    assert values["text_faithfulness"][:3] == [1.0, 1.0, 0.5]
    for v in values.values():
        assert v[3] == 0.0 and v[4] == 0.0  # gated: the floor in every term
    assert values["image_faithfulness"][:2] == [1.0, 1.0] and values["image_faithfulness"][2] < 1.0
    assert values["image_diversity"][0] > 0


def test_identical_completions_have_zero_diversity():
    judge = rewards.ExpansionRewards(pipeline=_FakePipe())
    comp = _completion("a large red circle in the center on a white background, in flat style", "a red circle")
    record = json.dumps(grammar.prompt_record("a red circle"))
    div = judge.image_diversity(["p"] * 4, [comp] * 4, [record] * 4)
    assert div == [0.0] * 4
    feats = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [9.0, 9.0]])
    got = rewards.group_diversity(feats, ["a", "a", "b", "b"], [True, True, True, False])
    assert got.tolist() == [5.0, 5.0, 0.0, 0.0]  # a lone valid member of a group has no spread


# ------------------------------------------------------------------------------------------ model, TRL stages
def _tiny_expander(tmp_path, hidden=32):
    pairs = data.sft_pairs(90, seed=0)
    tok = build_tokenizer([p["prompt"] + p["completion"] for p in pairs], vocab_size=300)
    model = build_model(tok, hidden=hidden, layers=1, heads=2, kv_heads=1)
    return save_expander(Expander(model, tok, "world", max_new_tokens=24), tmp_path / "tiny", {"stage": "test"})


def test_tokenizer_round_trips_any_text_and_expander_saves_and_loads(tmp_path):
    path = _tiny_expander(tmp_path)
    lm = load_expander(str(path))
    assert lm.kind == "world"
    text = "expand medium: A Dog, ünïcode & \"quoted text\"\n"
    assert lm.tokenizer.decode(lm.tokenizer(text)["input_ids"]) == text
    a = lm.completions("a red circle", "high", n=2, seed=5)
    assert a == lm.completions("a red circle", "high", n=2, seed=5) and len(a) == 2
    assert lm.expand("a red circle", "raw", n=3) == ["a red circle"] * 3
    assert lm.caption_of("no format at all", "a red circle") == "a red circle"  # the intent is never lost
    # an untrained model writes nothing faithful: the guarded expander resamples, then keeps the prompt
    assert lm.expand("two red circles", "high", n=3, seed=1, verify=True) == ["two red circles"] * 3


def test_a_local_chat_model_expands_with_the_system_prompt(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pairs = data.sft_pairs(30, seed=0)
    tok = build_tokenizer([p["prompt"] + p["completion"] for p in pairs], vocab_size=280)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    lm = load_expander(f"hf:{tmp_path / 'chat'}")
    lm.max_new_tokens = 12
    assert lm.kind == "chat"
    assert "Keep any text in quotes verbatim" in lm._inputs("a cat", "low")
    out = lm.expand("a cat", "low", n=2, seed=0)
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)


def test_missing_expanders_are_one_line_errors(tmp_path):
    with pytest.raises(Krea2Error, match="not found"):
        load_expander(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Krea2Error, match="cannot load expander"):
        load_expander(str(tmp_path / "empty"))


class _LengthJudge(rewards.ExpansionRewards):
    """The reward functions of ExpansionRewards with terms an untrained model can move (its completions' lengths):
    a few SFT steps do not reach the format gate, so the real terms would all be 0 and carry no gradient."""

    def judge(self, prompts, completions, record):
        n = np.array([len(c) for c in completions], float)
        return {"gate": np.ones(len(n)), "text": n, "image": -n, "diversity": n % 7}

    def image_scores(self, texts, records, seeds):
        return np.array([len(t) % 3 for t in texts], float)


@pytest.mark.slow
def test_sft_then_a_two_step_grpo_run_change_the_weights(tmp_path):
    from safetensors.torch import load_file

    from krea2.expander.train import GRPOSettings, SFTSettings, train_grpo, train_sft

    sft = train_sft(tmp_path / "sft", SFTSettings(steps=3, pairs=64, batch=8, hidden=32, layers=1, vocab=300))
    lm = load_expander(str(sft))
    assert lm.kind == "world" and json.loads((sft / "expander.json").read_text())["stage"] == "sft"
    before = load_file(sft / "model.safetensors")
    final = train_grpo(str(sft), tmp_path / "rl", GRPOSettings(steps=2, prompts=6, group=2, batch=4),
                       judge=_LengthJudge())
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pool = [json.loads(x) for x in (tmp_path / "rl" / "prompt_pool.jsonl").read_text().splitlines()]
    assert sorted({p["kind"] for p in pool}) == ["failure", "hard", "real"] and len(pool) == 6
    with pytest.raises(Krea2Error, match="--resume"):
        train_grpo(str(sft), tmp_path / "rl", GRPOSettings(steps=2, prompts=6, group=2, batch=4))


# ---------------------------------------------------------------------------------------------------- CLI, eval
def test_expand_command_raw_and_errors(capsys, monkeypatch, cli_error, tmp_path):
    import sys

    from krea2 import cli

    monkeypatch.setattr(sys, "argv", ["krea2", "expand", "a red circle", "--creativity", "raw", "-n", "2"])
    cli.main()
    assert capsys.readouterr().out.splitlines() == ["a red circle", "a red circle"]
    code, err = cli_error("expand", "a red circle", "--creativity", "wild")
    assert code == 2 and "unknown creativity" in err and err.count("\n") == 1
    code, err = cli_error("expand", "a red circle", "--expander", tmp_path / "none")
    assert code == 2 and "not found" in err and err.count("\n") == 1
    code, err = cli_error("generate", "a red circle", "--expand", "wild", "--out", tmp_path / "o")
    assert code == 2 and "unknown creativity" in err


def test_expand_command_prints_world_expansions(capsys, monkeypatch, tmp_path):
    import sys

    from krea2 import cli

    path = _tiny_expander(tmp_path)
    monkeypatch.setattr(sys, "argv", ["krea2", "expand", "a red circle", "--expander", str(path), "-n", "3",
                                      "--intent"])
    cli.main()
    assert len(capsys.readouterr().out.splitlines()) == 3


class _OracleExpander:
    """Expands like the SFT targets (complete_scene + expansion_text); `break_color` makes it unfaithful."""

    def __init__(self, break_color=False):
        self.break_color = break_color

    def expand_many(self, prompts, creativity, seed, verify=False):
        rng = np.random.default_rng(seed)
        out = []
        for prompt in prompts:
            rec = grammar.prompt_record(prompt)
            text = grammar.expansion_text(grammar.complete_scene(rec, rng), rec, creativity, rng)
            out.append(text.replace("red", "blue") if self.break_color else text)
        return out


def test_eval_expander_reports_faithfulness_diversity_and_scores(tmp_path):
    from krea2.eval.expander_eval import evaluate_expander, format_summary
    from krea2.pipeline import load_pipeline

    records = [{"prompt": "a red circle", "tag": "colors", "objects": [{"shape": "circle", "color": "red"}]},
               {"prompt": "two squares", "tag": "counting", "objects": [{"shape": "square", "count": 2}]}]
    pipe = load_pipeline("world-turbo")
    report, raw, expanded = evaluate_expander(pipe, _OracleExpander(), records, "high", n=2)
    assert report["text_faithfulness"] == 1.0 and len(raw) == len(expanded) == 4
    assert report["diversity"]["ratio"] == pytest.approx(report["diversity"]["expanded"] /
                                                         report["diversity"]["unexpanded"])
    assert format_summary(report)[-1].startswith("faithfulness ")
    bad, _, _ = evaluate_expander(pipe, _OracleExpander(break_color=True), records, "high", n=2)
    assert bad["text_faithfulness"] == 0.5  # the red circle turned blue; the squares stay faithful
    with pytest.raises(Krea2Error, match="at least 2"):
        evaluate_expander(pipe, _OracleExpander(), records, "high", n=1)


def test_the_pipeline_draws_the_expansions():
    from krea2.pipeline import load_pipeline

    pipe = load_pipeline("world-turbo")
    prompts = ["a red circle", "a red circle", "two squares"]
    texts = pipe.expand_prompts(prompts, _OracleExpander(), "high", seed=3)
    assert texts[0] != texts[1]  # two images of one prompt: two expansions
    expected = pipe.generate(texts, seed=3)
    got = pipe.generate(prompts, seed=3, expander=_OracleExpander(), creativity="high")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_generate_with_expand_draws_each_image_from_its_own_expansion(monkeypatch, tmp_path, capsys):
    import sys

    from krea2 import cli

    path = _tiny_expander(tmp_path)
    out = tmp_path / "imgs"
    monkeypatch.setattr(sys, "argv", ["krea2", "generate", "two red circles", "--checkpoint", "world-turbo",
                                      "--expand", "high", "--expander", str(path), "--num-images", "2",
                                      "--out", str(out)])
    cli.main()
    # the untrained expander writes nothing faithful: the guarded expansion keeps the prompt for both images
    assert (out / "prompts.txt").read_text().splitlines() == ["two red circles"] * 2
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "grid.png"]


def test_the_world_expander_ships_and_expands_public_prompts_faithfully():
    lm = load_expander("world")
    from krea2.expander.model import ASSET

    info = json.loads((ASSET / "expander.json").read_text())
    assert lm.kind == "world" and info["stage"] == "grpo"
    records = checker.load_prompts(prompts_path("world_eval_small"))[:9]
    for level in ("low", "medium", "high"):
        texts = lm.expand_many([r["prompt"] for r in records], level, seed=0, verify=True)
        assert texts == lm.expand_many([r["prompt"] for r in records], level, seed=0, verify=True)
        assert all(rewards.text_faithful(t, _user(r)) for t, r in zip(texts, records))
        assert sum(t != r["prompt"] for t, r in zip(texts, records)) >= 6  # expanded, not the fallback
