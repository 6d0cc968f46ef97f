"""Compiler flags and source lists shared by setup.py (the real build) and scripts/dev_build.py."""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_cuda_home() -> str | None:
    """CUDA toolkit location from CUDA_HOME / CUDA_PATH / /usr/local/cuda / nvcc on PATH; never from a GPU.

    A candidate must hold both bin/nvcc and include/cuda.h: an nvcc on PATH may be a wrapper script (e.g.
    /usr/local/bin/nvcc exec'ing the real one), whose parent folder is no toolkit.
    """
    import shutil

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and all(os.path.exists(os.path.join(home, *f)) for f in (("bin", "nvcc"), ("include", "cuda.h"))):
            return home
    return None


def cxx_runtime_link_args() -> list[str]:
    """Link the C++ runtime that torch itself loaded (Linux): the extension must share torch's libstdc++.

    A compiler whose library path holds libstdc++.a ahead of (or without) libstdc++.so links a private, static
    copy of the C++ runtime into _C.so (the GPU machine's /opt/gcc wrapper does). Two runtimes in one process
    break as soon as a C++ error message formats a number: the private copy's locale was never set up, and
    every TORCH_CHECK with a number in it segfaulted instead of raising. Naming torch's libstdc++.so.6 as a link
    input makes the linker resolve the runtime there (recorded as DT_NEEDED libstdc++.so.6, as usual), so
    nothing is left for the static archive. Call after `import torch`.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in loaded if os.path.isfile(p))[:1]


def sources(pattern: str, subdir: str = "") -> list[str]:
    """Files under csrc/<subdir> matching pattern, relative to the repository root, sorted."""
    base = os.path.join(ROOT, "csrc", subdir)
    found = glob.glob(os.path.join(base, "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found)


def cxx_flags(debug: bool = False, with_cuda: bool = False) -> list[str]:
    flags = ["-O0" if debug else "-O3", "-std=c++20", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    if debug:
        flags.append("-g")
    if with_cuda:
        flags.append("-DLLMKERNELS_WITH_CUDA=1")
    return flags


def nvcc_flags(debug: bool = False) -> list[str]:
    flags = [
        "-O3",
        "-std=c++20",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__",
        "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "-DLLMKERNELS_WITH_CUDA=1",
        "-Xptxas=-warn-spills",
    ]
    if debug:
        flags.append("-lineinfo")
    return flags


def cmake_config(with_cuda: bool) -> str:
    """`key=value;value` lines for CMakeLists.txt: the same sources and flags setup.py uses."""
    from torch.utils import cpp_extension

    device = "cuda" if with_cuda else "cpu"
    cpp = [os.path.join(ROOT, s) for s in sources("*.cpp")]
    cu = [os.path.join(ROOT, s) for s in sources("*.cu")] if with_cuda else []
    libs = ["c10", "torch", "torch_cpu", "torch_python"] + (["c10_cuda", "torch_cuda"] if with_cuda else [])
    lines = {
        "CPP_SOURCES": cpp,
        "CU_SOURCES": cu,
        "INCLUDE_DIRS": cpp_extension.include_paths(device_type=device) + [os.path.join(ROOT, "csrc")],
        "LIBRARY_DIRS": cpp_extension.library_paths(device_type=device),
        "LIBRARIES": libs,
        "CXX_FLAGS": cxx_flags(with_cuda=with_cuda),
        "CUDA_FLAGS": nvcc_flags() if with_cuda else [],
    }
    return "\n".join(f"{k}={'|'.join(v)}" for k, v in lines.items())


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--cmake"]:
        print(cmake_config(with_cuda=sys.argv[2:3] == ["cuda"]))
