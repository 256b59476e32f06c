"""Optional dependencies: probe once, import lazily, explain what to install when something is missing.

Policy (fastenc/ARCHITECTURE.md, principle 4): a fast path chosen automatically that is unavailable falls back with
one warning (`warn_once`); a fast path the user asked for explicitly raises `MissingDependency` with the install
hint.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

_INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn (needs a CUDA toolchain); or set model.attn_impl=sdpa",
    "deepspeed": "pip install deepspeed -c .ci/constraints.txt (or `make setup`)",
    "triton": "triton ships with the CUDA build of torch; or pick impl='reference'",
    "nvidia.dali": "pip install nvidia-dali-cuda130 numba (or `make setup`); or set data.backend=torch",
    "numba": "pip install numba (or `make setup`): DALI-cpu runs its multi-crop kernel with it; or data.backend=torch",
    "sentencepiece": "pip install sentencepiece (or `make setup`)",
    "tensorboard": "pip install tensorboard (or `make setup`)",
    "matplotlib": "pip install matplotlib (or `make setup`)",
    "open_clip": "pip install open_clip_torch (benchmark environment only)",
    "webdataset": "pip install webdataset (or `make setup`)",
    "transformers": "pip install transformers -c .ci/constraints.txt (or `make setup`)",
    "fastenc._C": ("build fastenc's native extension (needs a C++ compiler): `python setup.py build_ext --inplace` "
                   "(or `make setup`); or pick impl='chunked'"),
}


class MissingDependency(ImportError):
    """An optional dependency that the requested feature needs is not installed."""


@functools.lru_cache(maxsize=None)
def is_available(module: str) -> bool:
    """True if `module` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str = ""):
    """Import and return `module`, or raise MissingDependency naming the feature and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = _INSTALL_HINTS.get(module, f"pip install {module}")
        what = f" for {feature}" if feature else ""
        raise MissingDependency(f"'{module}' is required{what} but could not be imported ({e}). Install: {hint}") from e


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a UserWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def cuda_available() -> bool:
    """Whether torch sees a GPU (the default of every --device flag); False without torch."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
