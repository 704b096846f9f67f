from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "configs" / "plans"
MODELS = ROOT / "configs" / "models"


@pytest.fixture
def root() -> Path:
    return ROOT
