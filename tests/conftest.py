import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(os.environ.get("KREA2_REFERENCE_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" /
                                    "reference" / "fixtures")).resolve()
SHARED_REFERENCE = REFERENCE_DIR.parent


def fixture_dirs() -> list[Path]:
    if not REFERENCE_DIR.is_dir():
        return []
    return sorted(p for p in REFERENCE_DIR.iterdir() if (p / "config.json").is_file())


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cli_error(monkeypatch, capsys):
    """`cli_error(*args)` runs `krea2 ARGS` as the console script does when it fails; returns (exit code, stderr)."""
    import sys

    from krea2 import cli

    cli._mount()

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["krea2", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code, capsys.readouterr().err

    return run
