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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids OpenMP barrier stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
