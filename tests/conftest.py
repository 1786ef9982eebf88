from pathlib import Path

import pytest

# Real instrument files live in the shared folder beside the repository (never copied in).
REAL_STM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-stm"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def real_stm_dir() -> Path:
    if not REAL_STM_DIR.is_dir():
        pytest.skip(
            "../shared/data/real-stm not found: real-data tests need the shared folder beside the repo"
        )
    return REAL_STM_DIR
