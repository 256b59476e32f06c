"""Shared test configuration.

Tiers (markers): default = fast CPU tests (`make test`); `slow` = minutes-long CPU tests (`make test-slow`);
`gpu` = needs CUDA, skipped cleanly without it; `distributed` = spawns several gloo ranks (still CPU).
"""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running CPU test, excluded from the default tier")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "distributed: spawns several gloo processes")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
