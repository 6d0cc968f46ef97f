"""The one authoritative build of llmkernels._C.

C++ CPU sources (csrc/**/*.cpp) always compile. CUDA sources (csrc/**/*.cu) compile whenever a CUDA
toolkit is found (CUDA_HOME, nvcc on PATH or /usr/local/cuda): the decision never depends on a GPU being
present, so a GPU-less machine still compiles (and so checks) every kernel.

Knobs (environment):
  LLMKERNELS_BUILD_CUDA=0     build the CPU backend only
  TORCH_CUDA_ARCH_LIST        CUDA targets (default "8.0;9.0a")
  MAX_JOBS                    parallel compile jobs (ninja)
  LLMKERNELS_DEBUG=1          -O0 -g host code, -lineinfo device code
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scripts.build_config import ROOT, cxx_flags, cxx_runtime_link_args, find_cuda_home, nvcc_flags, sources  # noqa: E402


def build_extensions():
    import torch  # setup.py needs torch already installed: pip install --no-build-isolation -e .
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("LLMKERNELS_BUILD_CUDA", "1") != "0"
    cuda_home = find_cuda_home() if want_cuda else None
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

    debug = os.environ.get("LLMKERNELS_DEBUG") == "1"
    src = sources("*.cpp")
    if with_cuda:
        src += sources("*.cu")
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags(debug, with_cuda=True), "nvcc": nvcc_flags(debug)}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags(debug)}
    ext = ext_cls(
        name="llmkernels._C",
        sources=src,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp", *cxx_runtime_link_args()],
        py_limited_api=True,
    )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    print(f"llmkernels: building {len(src)} sources, CUDA {'on: ' + cuda_home + ' ' + archs if with_cuda else 'off'}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    name="llmkernels",
    version="0.1.0",
    description=(
        "Fused kernels for LLM inference: flash attention, sliding-window attention, ternary linear, selective scan"
    ),
    # every package under llmkernels/ (a hand-kept list left llmkernels.models out of wheels: the demo failed)
    packages=find_packages(include=["llmkernels", "llmkernels.*"]),
    package_data={"llmkernels": ["data/*", "*.json"], "llmkernels.triton": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "hf": ["transformers"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["llmkernels=llmkernels.__main__:main"]},
)
