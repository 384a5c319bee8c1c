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
