"""The built extension itself: it must share torch's C++ runtime.

The GPU machine's compiler wrapper linked a private static libstdc++ into _C.so; every C++ argument error whose
message formatted a number then segfaulted the process instead of raising (scripts/build_config.py,
cxx_runtime_link_args). Both tests run the library as the package loads it (LLMKERNELS_EXT_PATH included)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from llmkernels import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded, reason=f"extension not built: {_ext.load_error}")


def _library_path() -> str:
    return os.environ.get("LLMKERNELS_EXT_PATH") or importlib.util.find_spec("llmkernels._C").origin


def test_cpp_error_with_a_number_in_it_raises():
    """In a subprocess, so a crash is this test's failure and not the end of the test run."""
    code = (
        "import torch, llmkernels\n"
        "w, s = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(1)\n"
        "try:\n"
        "    torch.ops.llmkernels.ternary_linear_a8(torch.randn(2, 41), w, s, None, 40)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "x must have in_features = 40 columns, got [2, 41]" in done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None, reason="needs readelf")
def test_extension_needs_the_shared_cpp_runtime():
    dynamic = subprocess.run(["readelf", "-d", _library_path()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), f"no shared libstdc++ among {needed}"
