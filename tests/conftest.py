"""Shared test configuration.

Tiers (markers): default = fast CPU tests (`make test`); `slow` = minutes-long CPU tests (`make test-slow`);
`gpu` = needs CUDA, skipped cleanly without it; `distributed` = spawns several gloo ranks (still CPU).
"""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()  # safe without a GPU: no CUDA context is created


# Without a GPU, Triton kernels run on CPU tensors under the interpreter (tests/kernels, and impl="triton" in
# tests/losses). TRITON_INTERPRET is read when triton decorates a kernel, i.e. when a fastenc.kernels module is
# first imported, so it is set here, before any test module loads (an explicit TRITON_INTERPRET from the caller wins).
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running CPU test, excluded from the default tier")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "distributed: spawns several gloo processes")


def pytest_collection_modifyitems(config, items):
    import torch

    # A plain `pytest tests` stays in the fast tier: slow tests run only when the marker expression names them
    # (`-m slow`, as `make test-slow` does, or `-m "slow or not slow"`).
    run_slow = "slow" in (config.getoption("-m") or "") and "not slow" not in (config.getoption("-m") or "")
    run_slow = run_slow or "slow or" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow test: run with -m slow (make test-slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
