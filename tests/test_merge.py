"""Checkpoint folders (krea2.models.checkpoint): crash-safe writes, and merging by hand-checked numbers.

Merges: weighted average of two tiny random checkpoints, task arithmetic and TIES on hand-built state dicts, the
`krea2 merge` command, and its one-line errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models import checkpoint as ck
from krea2.models.checkpoint import (
    merge_checkpoints,
    merge_state_dicts,
    read_checkpoint_dir,
    save_random_checkpoint,
    write_checkpoint_dir,
)
from krea2.models.loading import load_dit

cli._mount()


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return save_random_checkpoint(root / "a", seed=0), save_random_checkpoint(root / "b", seed=1)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """krea2.cli.main as the console script runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["krea2", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


# ---- writing folders -----------------------------------------------------------------------------------------------


def test_write_refuses_a_non_empty_folder_and_overwrite_replaces_it(two, tmp_path):
    model = load_dit(two[0] / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine to fill
    write_checkpoint_dir(out, model, "minilm", "identity", {"steps": 3}, 32)
    with pytest.raises(Krea2Error, match="already exists and is not empty") as e:
        write_checkpoint_dir(out, model, "minilm", "identity", {"steps": 4}, 32)
    assert "\n" not in str(e.value)
    assert read_checkpoint_dir(out).sampling.steps == 3
    write_checkpoint_dir(out, model, "minilm", "identity", {"steps": 4}, 32, overwrite=True)
    assert read_checkpoint_dir(out).sampling.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left beside it


def test_a_failed_write_leaves_no_folder_and_keeps_the_old_one(two, tmp_path, monkeypatch):
    model = load_dit(two[0] / "model.safetensors")

    def torn(sd, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", torn)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint_dir(tmp_path / "new", model, "minilm", "identity", {}, 32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    old = write_checkpoint_dir(tmp_path / "old", model, "minilm", "identity", {"steps": 3}, 32)
    monkeypatch.setattr(ck, "save_file", torn)
    with pytest.raises(OSError):
        write_checkpoint_dir(old, model, "minilm", "identity", {"steps": 9}, 32, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert read_checkpoint_dir(old).sampling.steps == 3 and load_dit(old / "model.safetensors").cfg == model.cfg


# ---- merging -------------------------------------------------------------------------------------------------------


def test_weighted_average_of_two_checkpoints_and_the_folder_loads(two, tmp_path):
    a, b = two
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out = merge_checkpoints([a, b], tmp_path / "m", weights=[1, 3])  # normalised: 0.25, 0.75
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(sa)
    for k in sa:
        assert merged[k].dtype == torch.float32 and torch.equal(merged[k], 0.25 * sa[k] + 0.75 * sb[k]), k

    cfg, first = json.loads((out / "config.json").read_text()), json.loads((a / "config.json").read_text())
    assert cfg.pop("merge") == {"method": "average", "inputs": [str(a), str(b)], "weights": [0.25, 0.75],
                                "base": None}
    assert cfg == first

    # uniform: Σθ / N, the trainer's PMA average bit for bit
    uniform = merge_state_dicts([sa, sb, sa])
    assert all(torch.equal(uniform[k], sum(sd[k].float() for sd in (sa, sb, sa)) / 3) for k in sa)

    from krea2.pipeline import load_pipeline

    pipe = load_pipeline(str(out))
    images = pipe.generate(["a red circle"], pipe.sampling_config(steps=1))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "s": torch.tensor(0.5)}
    one = {"w": torch.tensor([2.0, 2.0, 1.0]), "s": torch.tensor(1.5)}  # τ1 = [1, 0, -2], 1
    two = {"w": torch.tensor([1.0, 4.0, 3.0]), "s": torch.tensor(0.0)}  # τ2 = [0, 2, 0], -0.5
    out = merge_state_dicts([one, two], weights=[0.5, 2.0], method="task_arithmetic", base=base)
    assert torch.equal(out["w"], torch.tensor([1.5, 6.0, 2.0]))  # base + 0.5 τ1 + 2 τ2: weights not normalised
    assert torch.equal(out["s"], torch.tensor(0.5 + 0.5 - 1.0))
    out = merge_state_dicts([one, two], method="task_arithmetic", base=base)  # default: 1 each
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0, 1.0]))


def test_ties_by_hand():
    base = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, 3.0])
    taus = [torch.tensor([1.0, 4.0, -0.5, 2.0, 0.25, -4.0]),  # top 3: 4, -4, 2
            torch.tensor([1.0, -6.0, 3.0, -0.5, 0.25, 2.0]),  # top 3: -6, 3, 2
            torch.tensor([7.0, 1.5, 0.5, 1.5, -0.25, 1.5])]  # top 3: 7, then 1.5 three times: ties all kept
    sds = [{"w": base + t} for t in taus]
    # trimmed: [0, 4, 0, 2, 0, -4], [0, -6, 3, 0, 0, 2], [7, 1.5, 0, 1.5, 0, 1.5]
    # mass:    [7, -0.5, 3, 3.5, 0, -0.5] -> signs + - + + 0 -  (entries 1 and 5: two positives, yet mass elects -)
    # disjoint mean of the agreeing entries: [7, -6, 3, (2 + 1.5) / 2, 0, -4]
    out = merge_state_dicts(sds, method="ties", base={"w": base}, density=0.5)
    assert torch.equal(out["w"], base + torch.tensor([7.0, -6.0, 3.0, 1.75, 0.0, -4.0]))
    # weights all λ: the paper's θ_init + λ τ_m
    out = merge_state_dicts(sds, weights=[2.0, 2.0, 2.0], method="ties", base={"w": base}, density=0.5)
    assert torch.equal(out["w"], base + torch.tensor([14.0, -12.0, 6.0, 3.5, 0.0, -8.0]))
    # weights scale each trimmed vector before the election: t3 / 2 -> mass [3.5, -1.25, 3, 2.75, 0, -1.25]
    out = merge_state_dicts(sds, weights=[1.0, 1.0, 0.5], method="ties", base={"w": base}, density=0.5)
    assert torch.equal(out["w"], base + torch.tensor([3.5, -6.0, 3.0, 1.375, 0.0, -4.0]))
    # density 1 trims nothing: entry 0 is then the mean of all three (1 + 1 + 7) / 3
    out = merge_state_dicts(sds, method="ties", base={"w": base}, density=1.0)
    assert torch.allclose(out["w"][0], base[0] + 3.0)


def test_merge_state_dict_errors_are_one_line():
    a = {"w": torch.zeros(3), "v": torch.zeros(2)}
    cases = [
        (lambda: merge_state_dicts([a, {"w": torch.zeros(3)}]), "input 1 does not match the first input: 1 missing"),
        (lambda: merge_state_dicts([a, {"w": torch.zeros(4), "v": torch.zeros(2)}]), "w of shape (4,)"),
        (lambda: merge_state_dicts([a, a], weights=[1.0]), "1 weight(s) for 2 checkpoint(s)"),
        (lambda: merge_state_dicts([a, a], weights=[1.0, -1.0]), "sum to 0"),
        (lambda: merge_state_dicts([a], method="ties"), "pass the base"),
        (lambda: merge_state_dicts([a], method="task_arithmetic"), "pass the base"),
        (lambda: merge_state_dicts([a], base=a), "base is only used by"),
        (lambda: merge_state_dicts([a], method="ties", base={"w": torch.zeros(3)}), "the base does not match"),
        (lambda: merge_state_dicts([a], method="ties", base=a, density=0.0), "density must be in (0, 1]"),
        (lambda: merge_state_dicts([a], method="soup"), "unknown merge method 'soup'"),
        (lambda: merge_state_dicts([]), "nothing to merge"),
    ]
    for fn, needle in cases:
        with pytest.raises(Krea2Error) as e:
            fn()
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))


def test_merge_command(two, tmp_path):
    a, b = two
    out = tmp_path / "m"
    runner = CliRunner()
    res = runner.invoke(cli.app, ["merge", str(a), str(b), "--out", str(out), "--weights", "0.5,0.5",
                                  "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    merged = load_file(out / "model.safetensors")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], (0.5 * sa[k] + 0.5 * sb[k]).bfloat16())
               for k in sa)
    # task arithmetic of one fine-tune at weight 1 relative to b gives a back (up to fp32 rounding of a - b + b)
    res = runner.invoke(cli.app, ["merge", str(a), "--base", str(b), "--method", "task_arithmetic", "--out",
                                  str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    merged = load_file(out / "model.safetensors")
    assert all(torch.allclose(merged[k], sa[k], atol=1e-6) for k in sa)
    assert json.loads((out / "config.json").read_text())["merge"]["base"] == str(b)


def test_merge_command_errors_exit_2_with_one_line(two, tmp_path, monkeypatch, capsys):
    a, b = two
    other = save_random_checkpoint(tmp_path / "other", preset="tiny")  # another architecture
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = {
        "no inputs": (["merge", "--out", tmp_path / "o"], "no checkpoints given"),
        "no out": (["merge", a, b], "--out is required"),
        "weights count": (["merge", a, b, "--out", tmp_path / "o", "--weights", "1"], "1 weight(s) for 2"),
        "weights parse": (["merge", a, b, "--out", tmp_path / "o", "--weights", "a,b"], "comma-separated numbers"),
        "no base": (["merge", a, b, "--out", tmp_path / "o", "--method", "ties"], "pass the base"),
        "method": (["merge", a, b, "--out", tmp_path / "o", "--method", "soup"], "unknown merge method"),
        "dtype": (["merge", a, b, "--out", tmp_path / "o", "--dtype", "int8"], "unknown --dtype"),
        "architecture": (["merge", a, other, "--out", tmp_path / "o"], "different architecture"),
        "missing input": (["merge", a, tmp_path / "nope", "--out", tmp_path / "o"], "checkpoint not found"),
        "existing out": (["merge", a, b, "--out", full], "already exists and is not empty"),
    }
    for name, (args, needle) in cases.items():
        code, err = run_main(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
    assert not (tmp_path / "o").exists() and (full / "keep.txt").read_text() == "x"
