"""Build of the `fastenc` package.

The native extension `fastenc._C` is built from csrc/*.cpp when torch and a C++ compiler are present (it holds the
CPU fast paths of the loss kernels once they exist). It is optional: with no sources, no torch at build time, no
compiler, or a compile error, the install goes on without it and fastenc uses its torch implementations.
Build it in place, then install editable without build isolation (what `make setup` does):
    python setup.py build_ext --inplace && pip install --no-build-isolation --no-deps -e .
The in-place build comes first because setuptools >= 80 turns the editable install of a setup.py project into an
isolated PEP 660 build that cannot see the pinned torch (it would skip fastenc._C).

Versions are pinned in one place, .ci/constraints.txt (a full freeze of a working environment): `make setup`
installs every dependency with it as pip constraints, and the requirements below read their pins from it.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

CONSTRAINTS = os.path.join(HERE, ".ci", "constraints.txt")


def _read_pins(path: str) -> dict:
    """{normalized name: "name==version"} of the constraints file: the one place fastenc's versions are pinned."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return {re.sub(r"[-_.]+", "-", line.split("==", 1)[0].strip()).lower(): line for line in lines if "==" in line}


_PINS = _read_pins(CONSTRAINTS)


def pinned(name: str) -> str:
    """`name` at the version .ci/constraints.txt pins (the bare name where the file is absent, e.g. in an sdist)."""
    return _PINS.get(re.sub(r"[-_.]+", "-", name).lower(), name)


class OptionalBuildExt(build_ext):
    """Compile failures of the optional native extension must never fail the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any toolchain failure means "no native extension"
            print(f"fastenc: skipping optional native extension fastenc._C ({e})", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"fastenc: skipping optional native extension {ext.name} ({e})", file=sys.stderr)


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("FASTENC_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastenc: torch not importable at build time; skipping fastenc._C", file=sys.stderr)
        return [], {}

    class OptionalTorchBuildExt(BuildExtension, OptionalBuildExt):
        pass

    # -fno-trapping-math (as torch's own build): lets GCC turn the kernels' float selects into blends, without which
    # their exp/log loops stay scalar (csrc/losses.cpp).
    ext = CppExtension("fastenc._C", sources, extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalTorchBuildExt}


ext_modules, cmdclass = native_extensions()

setup(
    name="fastenc",
    version="0.1.0",
    description="One engine to train and compare vision encoders (CLIP, SigLIP, DINO) under identical conditions",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastenc", "fastenc.*"]),
    # Versions come from .ci/constraints.txt: pinned() here, and pip's -c for the rest under `make setup`.
    install_requires=[
        pinned("torch"), pinned("torchvision"), pinned("timm"), pinned("safetensors"), pinned("webdataset"),
        pinned("sentencepiece"), "pyyaml>=6", "numpy", "pillow", "tqdm",
    ],
    extras_require={
        "train": [pinned("deepspeed"), "tensorboard", "matplotlib"],
        # DALI decoding/augmentation (data.backend=dali); numba runs its CPU multi-crop kernel.
        "dali": [pinned("nvidia-dali-cuda130"), pinned("numba")],
        "dev": [pinned("deepspeed"), "tensorboard", "matplotlib", pinned("pytest"), pinned("pytest-timeout"),
                pinned("open_clip_torch"), pinned("nvidia-dali-cuda130"), pinned("numba"), pinned("transformers"),
                pinned("pyarrow")],
        "bench": [pinned("open_clip_torch"), "matplotlib"],
        # The vision-language stage: Hugging Face causal LMs and their fast tokenizers; pyarrow reads VMCBench's
        # parquet release (`fastenc eval vqa`).
        "vlm": [pinned("transformers"), pinned("pyarrow")],
    },
    entry_points={"console_scripts": ["fastenc=fastenc.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
