import json

import numpy as np
import pytest

from krea2.data import world
from krea2.data.types import CAPTION_KINDS, Example
from krea2.errors import Krea2Error


def _scenes(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, **kw) for _ in range(n)]


@pytest.mark.parametrize("size", world.SUPPORTED_SIZES)
def test_render_is_deterministic_and_seed_controls_jitter_and_grain(size):
    scene = world.Scene("gray", "grainy", [world.WorldObject("circle", "red", "small", "center")])
    a, b = world.render(scene, size, seed=3), world.render(scene, size, seed=3)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, world.render(scene, size, seed=s)) for s in range(4, 8))


def test_templates_are_all_distinct_at_every_size():
    # two (shape, size, fill kind) that paint the same pixels would make the checker guess
    for size, g in world.GEOMETRIES.items():
        seen = {}
        for shape in world.SHAPES:
            for sz in world.SIZES:
                n = g.side(sz)
                assert n % 2 == 1
                for kind in ("solid", "outline", "striped"):
                    m = world.object_mask(shape, n, kind, g.stroke, g.stripe)
                    key = (m.shape, m.tobytes())
                    assert key not in seen, (size, shape, sz, kind, seen.get(key))
                    seen[key] = (shape, sz, kind)


@pytest.mark.parametrize("size", world.SUPPORTED_SIZES)
def test_objects_stay_in_their_cell_and_same_coloured_objects_never_touch(size):
    b = world.cell_bounds(size)
    for i, scene in enumerate(_scenes(300, seed=size)):
        boxes = world.layout(scene, size, np.random.default_rng(i))
        for o, (top, left, n) in zip(scene.objects, boxes):
            r, c = world.cell_of(o.position)
            assert b[r] <= top and top + n <= b[r + 1] and b[c] <= left and left + n <= b[c + 1]
        for j, (oa, ba) in enumerate(zip(scene.objects, boxes)):
            for ob, bb in list(zip(scene.objects, boxes))[j + 1:]:
                gap_y = max(ba[0], bb[0]) - min(ba[0] + ba[2], bb[0] + bb[2])
                gap_x = max(ba[1], bb[1]) - min(ba[1] + ba[2], bb[1] + bb[2])
                assert max(gap_x, gap_y) >= 0  # never overlap (gap 0 = adjacent pixels)
                if oa.color == ob.color:  # at least one background pixel between them, corners included
                    assert max(gap_x, gap_y) >= 1, (scene, size)


def test_sample_scene_respects_restrictions_and_world_rules():
    scenes = _scenes(400, n_objects=(2, 3), styles=["striped"], backgrounds=["black"], sizes=["large"])
    assert {len(s.objects) for s in scenes} == {2, 3}
    assert {s.style for s in scenes} == {"striped"} and {s.background for s in scenes} == {"black"}
    assert {o.size for s in scenes for o in s.objects} == {"large"}
    for s in scenes:
        world.validate_scene(s)
    assert {o.size for s in _scenes(50, large_only=True) for o in s.objects} == {"large"}
    everything = _scenes(600)
    assert {len(s.objects) for s in everything} == {1, 2, 3, 4}
    assert {s.style for s in everything} == set(world.STYLES)
    assert {o.position for s in everything for o in s.objects} == set(world.POSITIONS)


def test_record_roundtrip_and_bad_records():
    for s in _scenes(50):
        rec = json.loads(json.dumps(world.scene_to_record(s)))
        assert world.record_to_scene(rec) == s
    rec = world.scene_to_record(_scenes(1)[0])
    rec["objects"][0]["shape"] = "hexagon"
    with pytest.raises(Krea2Error, match="unknown shape 'hexagon'"):
        world.record_to_scene(rec)
    with pytest.raises(Krea2Error, match="share a grid cell"):
        world.validate_scene(world.Scene("white", "flat", [world.WorldObject("circle", "red", "small", "top")] * 2))
    with pytest.raises(Krea2Error, match="neighbouring"):
        world.validate_scene(world.Scene("white", "flat", [world.WorldObject("circle", "red", "large", "top"),
                                                           world.WorldObject("square", "red", "large", "center")]))
    with pytest.raises(Krea2Error, match="not supported"):
        world.render(_scenes(1)[0], 20, 0)


def test_captions_name_everything_long_and_vary_in_wording():
    scene = world.Scene("black", "outline", [world.WorldObject("triangle", "purple", "small", "bottom left"),
                                             world.WorldObject("circle", "yellow", "large", "top right")])
    rng = np.random.default_rng(0)
    caps = [world.captions(scene, rng) for _ in range(60)]
    for c in caps:
        assert set(c) == set(CAPTION_KINDS)
        long = c["long"].lower()
        for word in ("black", "outline", "purple", "triangle", "small", "bottom left", "yellow", "large", "top right"):
            assert word in long, (word, long)
        assert len(c["short"]) < len(c["long"])
    for kind in CAPTION_KINDS:
        assert len({c[kind] for c in caps}) >= 3, kind


def test_world_examples_are_reproducible_and_carry_ground_truth():
    a = list(world.world_examples(5, 32, seed=7, styles=["gradient"]))
    b = list(world.world_examples(5, 32, seed=7, styles=["gradient"]))
    assert all(isinstance(e, Example) for e in a)
    assert all(np.array_equal(x.image, y.image) and x.captions == y.captions for x, y in zip(a, b))
    for e in a:
        scene = world.record_to_scene(e.meta["scene"])
        assert scene.style == "gradient"
        assert np.array_equal(e.image, world.render(scene, 32, e.meta["render_seed"]))


def test_prompt_records_match_tags():
    rng = np.random.default_rng(0)
    for tag in world.TAGS:
        rec = world.scene_to_prompt_record(world.sample_scene_for_tag(rng, tag), tag, rng)
        assert rec["tag"] == tag and rec["prompt"] and rec["objects"]
    two = world.Scene("white", "flat", [world.WorldObject("circle", "red", "small", "left"),
                                        world.WorldObject("square", "blue", "large", "right")])
    rec = world.scene_to_prompt_record(two, "position")
    assert rec["prompt"] == "a red circle to the left of a blue square"
    assert rec["relations"] == [{"a": 0, "b": 1, "relation": "left of"}]
    with pytest.raises(Krea2Error, match="does not suit tag 'counting'"):
        world.scene_to_prompt_record(two, "counting")
    with pytest.raises(Krea2Error, match="unknown tag"):
        world.scene_to_prompt_record(two, "vibes")
