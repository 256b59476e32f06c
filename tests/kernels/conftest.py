"""Kernel tests: on CUDA when there is a GPU, else on CPU under the Triton interpreter.

TRITON_INTERPRET is read when triton decorates a kernel, i.e. when a fastenc.kernels module is first imported, so it
is set here, at conftest import, before pytest imports any test module of this folder (setdefault: an explicit
TRITON_INTERPRET=0/1 from the caller wins). The interpreter runs the same kernel code on numpy, one program at a time:
slow, so CPU shapes stay small; `gpu`-marked tests repeat the comparisons at larger shapes on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the default-tier kernel tests put their tensors: compiled kernels on CUDA, else the interpreter."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


class _RecordAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """numel of every tensor a torch op allocates while active. Not counted: outputs that are one of the op's own
    arguments (in-place ops, and the interpreter's `set_`, which re-points its argument copies at new storage),
    views, and uint8 tensors (the Triton interpreter's byte copies of its arguments' storages, its stand-in for
    device memory, not something the kernels allocate)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            arg_ids = {id(a) for a in torch.utils._pytree.tree_leaves((args, kwargs))}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in arg_ids and t.dtype != torch.uint8:
                    self.sizes.append(t.numel())
        return out


@pytest.fixture
def allocations():
    """allocations(thunk) -> numel of every tensor torch ops allocate while thunk() runs (forward + backward)."""

    def record(thunk):
        with _RecordAllocations() as mode:
            thunk()
        return mode.sizes

    return record


@pytest.fixture
def memory_probe(allocations):
    """probe(fn, *inputs) -> (largest tensor saved for backward, largest tensor any op allocates in forward +
    backward), in elements, with every input a fresh leaf that requires grad."""

    def probe(fn, *inputs):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        saved = [0]

        def pack(t):
            saved[0] = max(saved[0], t.numel())
            return t

        def run():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = fn(*leaves)
            loss.backward()

        largest_created = max(allocations(run))
        return saved[0], largest_created

    return probe
