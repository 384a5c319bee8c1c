import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker, world_eval


def as_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) in [-1, 1], as Pipeline.generate returns them (to_pil inverts it)."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


class PerfectWorldPipe:
    """Stands in for a model that has learned the world: draws a scene satisfying each prompt."""

    resolution = 32

    def __init__(self, scenes_by_prompt):
        self.scenes = scenes_by_prompt

    def sampling_config(self, **overrides):
        from krea2.sampling import SamplingConfig

        return SamplingConfig(**{k: v for k, v in overrides.items() if v is not None})

    def generate(self, prompts, sampling=None, seed=0, width=None, height=None):
        return as_tensor([world.render(self.scenes[p], width, seed + i) for i, p in enumerate(prompts)])


def _prompt_scenes(n_per_tag=3, seed=0):
    rng = np.random.default_rng(seed)
    records, scenes = [], {}
    for tag in world.TAGS:
        for _ in range(n_per_tag):
            scene = world.sample_scene_for_tag(rng, tag)
            rec = world.scene_to_prompt_record(scene, tag, rng)
            records.append(rec)
            scenes[rec["prompt"]] = scene
    return records, scenes


def test_shipped_prompt_files_are_valid_regenerable_and_cover_all_tags(tmp_path):
    for name, (n_per_tag, seed) in world_eval.PROMPT_SETS.items():
        path = world_eval.prompts_path(name)
        records = checker.load_prompts(path)
        assert {r["tag"] for r in records} == set(world.TAGS)
        assert all(sum(r["tag"] == t for r in records) == n_per_tag for t in world.TAGS)
        fresh = world_eval.write_prompts(tmp_path / f"{name}.jsonl", n_per_tag, seed)
        assert fresh.read_text() == path.read_text(), "rerun scripts/make_world_prompts.py"
    assert 200 <= len(checker.load_prompts(world_eval.prompts_path("world_eval"))) <= 400


def test_perfect_model_scores_one_and_report_has_grid(tmp_path):
    records, scenes = _prompt_scenes()
    report, images = world_eval.evaluate_pipeline(PerfectWorldPipe(scenes), records, images_per_prompt=2, seed=5,
                                                  with_fid=False)
    assert report["overall"] == 1.0 and set(report["per_tag"]) == set(world.TAGS)
    assert report["n_images"] == 2 * len(records) and [r["seed"] for r in report["images"][:3]] == [5, 6, 7]
    out, grid = world_eval.write_report(report, images, tmp_path / "r" / "report.json", cols=9)
    assert json.loads(out.read_text())["overall"] == 1.0
    assert Image.open(grid).size[0] > 9 * 64
    assert world_eval.format_summary(report)[-1] == "overall 1.0000"


def test_blank_model_scores_zero_and_bad_size_fails_early():
    records, _ = _prompt_scenes(1)

    class Blank(PerfectWorldPipe):
        def generate(self, prompts, sampling=None, seed=0, width=None, height=None):
            return torch.zeros(len(prompts), 3, width, width)

    report, _ = world_eval.evaluate_pipeline(Blank({}), records, with_fid=False)
    assert report["overall"] == 0.0
    with pytest.raises(Krea2Error, match="--size 40"):
        world_eval.evaluate_pipeline(Blank({}), records, size=40, with_fid=False)


@pytest.mark.slow
def test_cli_world_end_to_end_on_a_tiny_random_checkpoint(tmp_path):
    from krea2.eval.cli import app
    from krea2.models.checkpoint import save_random_checkpoint

    ckpt = save_random_checkpoint(tmp_path / "ckpt", preset="tiny-world")
    prompts = tmp_path / "p.jsonl"
    lines = world_eval.prompts_path("world_eval_small").read_text().splitlines()[:3]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["world", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out",
                                      str(out), "--steps", "1", "--seed", "3"])  # 2 images per prompt by default
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("overall ")
    report = json.loads(out.read_text())
    assert report["n_images"] == 6 and set(report["per_tag"]) == {"single_object", "two_object", "counting"}
    assert float(last.split()[1]) == pytest.approx(report["overall"], abs=1e-4)
    assert report["fid"] is not None and report["fid"] > 0
    assert out.with_suffix(".png").is_file()


def test_cli_names_bad_prompt_file(tmp_path):
    from krea2.eval.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a circle", "tag": "nope", "objects": [{"shape": "circle"}]}\n')
    result = CliRunner().invoke(app, ["world", "--prompts", str(bad)])
    assert isinstance(result.exception, Krea2Error)
    assert "unknown tag 'nope'" in str(result.exception) and "line 1" in str(result.exception)
