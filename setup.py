"""Build and install megaq.

    pip install -e .            # CPU-only machine: pure Python, no torch needed at build time
    pip install -e . --no-build-isolation   # GPU machine: also builds the CUDA extension megaq._C

The C++/CUDA extension `megaq._C` (csrc/**/*.cpp + csrc/**/*.cu) is built only where a CUDA build of
PyTorch and nvcc are both importable/found *in the build environment*. pip builds in an isolated
environment without torch unless given `--no-build-isolation`, so a plain `pip install -e .` never
builds it (and never downloads a torch); megaq then compiles it on first use
(megaq.kernels.cuda_ext.load_extension) where CUDA and nvcc exist, or runs without it.

Environment:
    MEGAQ_BUILD_EXT=1     build megaq._C or fail loudly saying why
    MEGAQ_BUILD_EXT=0     never build it
    (unset / "auto")      build it when possible; a failed build prints why and installation continues
    TORCH_CUDA_ARCH_LIST  target architectures (default "8.0;8.6;8.9;9.0a"). The INT4 GEMM needs
                          sm_80+ at run time (native INT4 tensor cores on 8.0/8.6/8.9; emulated on 9.0);
                          the INT8 GEMM (wgmma) needs 9.0a, not plain 9.0, for H100/H200.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0a"


def _version() -> str:
    with open(os.path.join(ROOT, "megaq", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    return match.group(1) if match else "0.0.0"


def _say(msg: str) -> None:
    # pip shows build output only with -v or on failure; stderr is the best we can do.
    print(f"megaq setup: {msg}", file=sys.stderr, flush=True)


def _build_mode() -> str:
    raw = os.environ.get("MEGAQ_BUILD_EXT", "auto").strip().lower()
    if raw in ("1", "on", "true", "yes", "force"):
        return "force"
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("", "auto"):
        return "auto"
    raise SystemExit(f"megaq setup: MEGAQ_BUILD_EXT={raw!r}; allowed: 1 (force), 0 (off), auto")


def _extension_sources() -> list[str]:
    patterns = ("csrc/**/*.cpp", "csrc/**/*.cu")
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _why_no_extension() -> str | None:
    """None when megaq._C can be built here, else the reason."""
    try:
        import torch  # noqa: F401  (only imported when an extension build is considered)
        from torch.utils import cpp_extension
    except Exception as exc:  # ImportError, or a broken torch
        return (f"torch is not importable in the build environment ({exc.__class__.__name__}: "
                f"{exc}); with pip, install torch first and add --no-build-isolation")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"nvcc not found at {nvcc}"
    if not _extension_sources():
        return "no sources under csrc/"
    return None


def _extension_setup() -> dict:
    mode = _build_mode()
    if mode == "off":
        _say("MEGAQ_BUILD_EXT=0: not building the CUDA extension megaq._C")
        return {}
    reason = _why_no_extension()
    if reason is not None:
        if mode == "force":
            raise SystemExit(f"megaq setup: MEGAQ_BUILD_EXT=1 but megaq._C cannot be built: {reason}")
        _say(f"not building the CUDA extension megaq._C: {reason}. megaq works without it "
             "(it is JIT-compiled on first use where CUDA and nvcc exist).")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _say(f"building megaq._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    class OptionalBuildExtension(BuildExtension):
        """A failed build stops the install only when MEGAQ_BUILD_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors, version checks, missing ninja, ...
                if mode == "force":
                    raise
                _say(f"building megaq._C FAILED ({exc.__class__.__name__}: {exc}); installing "
                     "without it. Set MEGAQ_BUILD_EXT=1 to make this an error.")

    import torch

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ext = CUDAExtension(
        name="megaq._C",
        sources=_extension_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        # lets `import megaq._C` find libc10.so & co. even before `import torch`
        extra_link_args=[f"-Wl,-rpath,{torch_lib}"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    name="megaq",
    version=_version(),
    description="GPT pretraining with every linear layer on INT8 / INT4 tensor cores",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megaq", "megaq.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed",
        "sentencepiece",
        "datasets",
        "tensorboard",
        "pybind11",
        "pydantic>=2",
        "numpy",
        "tqdm",
        "safetensors",
        'triton; platform_system=="Linux" and platform_machine=="x86_64"',
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["pytest", "transformers"],
        "plot": ["matplotlib"],
    },
    zip_safe=False,
    **_extension_setup(),
)
