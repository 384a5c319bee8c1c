"""Rewards: the world checker as (images, records) -> (B,) scores, and the registry."""

import numpy as np
import pytest
import torch

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker
from krea2.rewards import REWARDS, get_reward, is_known, requirement_results, world_rubric, world_strict


def as_images(arrays) -> torch.Tensor:
    """(S, S, 3) uint8 renders -> (B, 3, S, S) in [-1, 1], as a decoder would hand them to a reward."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def tag_prompts(n_per_tag=4, size=32, seed=0):
    """An eval prompt record per scene made for its tag, and the scene's render (which passes it)."""
    rng = np.random.default_rng(seed)
    records, renders = [], []
    for tag in world.TAGS:
        for i in range(n_per_tag):
            scene = world.sample_scene_for_tag(rng, tag)
            records.append(world.scene_to_prompt_record(scene, tag, rng))
            renders.append(world.render(scene, size, i))
    return records, renders


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_renders_score_one_on_both(size):
    examples = list(world.world_examples(24, size, seed=size))
    scene_records = [e.meta["scene"] for e in examples]
    prompt_records, renders = tag_prompts(size=size)
    for records, images in ((scene_records, as_images([e.image for e in examples])),
                            (prompt_records, as_images(renders))):
        for name in ("world_rubric", "world_strict"):
            r = get_reward(name)(images, records)
            assert r.shape == (len(records),) and r.dtype == torch.float32
            assert (r == 1.0).all(), (name, r)


def test_a_blank_image_scores_zero_strict_and_below_one_rubric():
    records, _ = tag_prompts(n_per_tag=2)
    scenes = [e.meta["scene"] for e in world.world_examples(6, 32, seed=1)]
    records += scenes + [{**s, "background": "gray"} for s in scenes]  # a met background alone is not enough
    blank = torch.zeros(len(records), 3, 32, 32)  # mid-grey
    assert (world_strict(blank, records) == 0).all()
    rubric = world_rubric(blank, records)
    assert (rubric < 1).all() and (rubric >= 0).all()
    assert (rubric[-6:] > 0).all()  # the gray background is met


def test_an_image_meeting_part_of_a_two_object_prompt_gets_partial_credit():
    record = {"prompt": "a circle and a square", "tag": "two_object",
              "objects": [{"shape": "circle"}, {"shape": "square"}]}
    half = world.Scene("white", "flat", [world.WorldObject("circle", "red", "large", "left"),
                                         world.WorldObject("triangle", "blue", "large", "right")])
    both = world.Scene("white", "flat", [world.WorldObject("circle", "red", "large", "left"),
                                         world.WorldObject("square", "blue", "large", "right")])
    images = as_images([world.render(half, 32, 0), world.render(both, 32, 0)])
    rubric = world_rubric(images, [record, record])
    assert 0 < rubric[0] < 1 and rubric[1] == 1
    assert rubric[0] == pytest.approx(2 / 3)  # object count and the circle: met; the square: not
    assert world_strict(images, [record, record]).tolist() == [0.0, 1.0]
    met = requirement_results(checker.detect(world.render(half, 32, 0)), record)
    assert met == {"object count": True, "object 0": True, "object 1": False}


def test_a_wrong_relation_costs_only_the_relation():
    scene = world.Scene("black", "outline", [world.WorldObject("circle", "red", "small", "left"),
                                             world.WorldObject("square", "blue", "large", "right")])
    record = {"prompt": "", "tag": "position",
              "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
              "relations": [{"a": 0, "b": 1, "relation": "right of"}], "style": "outline"}
    image = as_images([world.render(scene, 64, 3)])
    assert world_rubric(image, [record]).item() == pytest.approx(4 / 5)
    assert world_strict(image, [record]).item() == 0
    counting = {"prompt": "", "tag": "counting", "objects": [{"shape": "circle", "count": 3}]}
    assert requirement_results(checker.detect(world.render(scene, 64, 3)), counting) == \
        {"object count": False, "object 0#1": True, "object 0#2": False, "object 0#3": False}


def test_rubric_is_one_exactly_when_strict_passes():
    # matched and mismatched (image, prompt) pairs across tags: full rubric credit is the checker's pass, no more
    records, renders = tag_prompts(n_per_tag=6, seed=2)
    rng = np.random.default_rng(3)
    shuffled = [records[i] for i in rng.permutation(len(records))]
    images = as_images(renders + renders)
    both = records + shuffled
    strict, rubric = world_strict(images, both), world_rubric(images, both)
    assert torch.equal(strict == 1, rubric == 1)
    assert 0 < strict[len(records):].mean() < 1 and (rubric[len(records):] > 0).any()


def test_registry_names_and_errors():
    assert set(REWARDS) == {"world_rubric", "world_strict", "world_artifacts", "world_aesthetic"}
    assert is_known("world_aesthetic:runs/aes") and not is_known("world_rubric:runs/aes")
    assert not is_known("world_aesthetic:") and not is_known("aesthetic")
    with pytest.raises(Krea2Error, match="unknown reward 'aesthetic'.*world_artifacts.*world_strict") as e:
        get_reward("aesthetic")
    assert "\n" not in str(e.value)
    with pytest.raises(Krea2Error, match="one record per image"):
        world_strict(torch.zeros(2, 3, 32, 32), [{"objects": [{"shape": "circle"}]}])
    with pytest.raises(Krea2Error, match=r"\(B, 3, H, W\)"):
        world_rubric(torch.zeros(2, 32, 32), [{"objects": [{"shape": "circle"}]}] * 2)


def test_artifact_reward_counts_fragments_and_broken_shapes():
    import numpy as np

    from krea2.data.world import world_examples
    from krea2.rewards import get_reward

    exs = list(world_examples(48, 32, 3))
    ims = torch.from_numpy(np.stack([e.image for e in exs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    recs = [e.meta["scene"] for e in exs]
    reward = get_reward("world_artifacts")
    assert reward(ims, recs).mean() > 0.95  # ground truth is clean (the checker's rare misreads aside)
    noisy = (ims + torch.randn(ims.shape, generator=torch.Generator().manual_seed(0)) * 0.3).clamp(-1, 1)
    assert reward(noisy, recs).mean() < 0.3  # speckle breaks into fragments
    one = [{"objects": [{"shape": "circle"}]}]
    two_objects = next(i for i, r in enumerate(recs) if len(r["objects"]) == 2)
    assert reward(ims[two_objects:two_objects + 1], one).item() == 0.5  # one object more than asked


def test_aesthetic_reward_separates_renders_from_a_models_samples(tmp_path):
    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.rewards.aesthetic import AestheticConfig, train_aesthetic

    ckpt = save_random_checkpoint(tmp_path / "rand", resolution=16)
    cfg = AestheticConfig(images=40, steps=150, width=8, lr=3e-3)
    rep = train_aesthetic(str(ckpt), tmp_path / "aes", cfg, progress=False)
    # held-out scenes: a random model's samples are noise, easy to tell from renders
    assert rep["holdout_accuracy"] >= 0.8 and rep["holdout_reward_renders"] > rep["holdout_reward_samples"] + 0.3
    assert (tmp_path / "aes" / "tb").is_dir() and rep["resolution"] == 16
    assert not list(tmp_path.glob(".aes*"))  # the temporary TensorBoard folder went in with the publish
    reward = get_reward(f"world_aesthetic:{tmp_path / 'aes'}")
    fresh = as_images([e.image for e in world.world_examples(8, 16, seed=999)])
    noise = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = reward(fresh, [{}] * 8)
    assert r.shape == (8,) and r.dtype == torch.float32 and ((r > 0) & (r < 1)).all()
    assert r.mean() > reward(noise, [{}] * 8).mean() + 0.3
    with pytest.raises(Krea2Error, match="already exists"):  # never overwritten unasked
        train_aesthetic(str(ckpt), tmp_path / "aes", cfg, progress=False)
    with pytest.raises(Krea2Error, match="no aesthetic.safetensors"):
        get_reward(f"world_aesthetic:{tmp_path}")
    (tmp_path / "aes" / "aesthetic.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Krea2Error, match="is not a krea2 aesthetic classifier") as e:
        get_reward(f"world_aesthetic:{tmp_path / 'aes'}")
    assert "\n" not in str(e.value)


def test_the_shipped_aesthetic_reward_prefers_renders_to_the_base_models_samples():
    from krea2.pipeline import load_pipeline

    reward = get_reward("world_aesthetic")
    exs = list(world.world_examples(16, 32, seed=4242))
    renders = as_images([e.image for e in exs])
    pipe = load_pipeline("world")
    samples = pipe.generate([e.captions["short"] for e in exs], pipe.sampling_config(guidance=0.0, steps=8))
    assert reward(renders, [{}] * 16).mean() > reward(samples, [{}] * 16).mean() + 0.3

