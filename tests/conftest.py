from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "configs" / "plans"
MODELS = ROOT / "configs" / "models"


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_collection_modifyitems(items) -> None:
    """Tests under tests/integration (servers on loopback, worker processes, Flower) are marked
    ``integration``: ``-m "not integration"`` runs the unit tests alone."""
    for item in items:
        if (ROOT / "tests" / "integration") in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
