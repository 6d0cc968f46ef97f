"""Seeds, markers and the Triton interpreter switch.

Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which Triton reads when a
kernel is defined: it is set here, before any llmkernels.triton module is imported.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkernels  # noqa: E402
from llmkernels import _ext  # noqa: E402


def _cuda_skip_reason():
    if not HAS_CUDA:
        return "no CUDA GPU on this machine"
    if not _ext.loaded:
        return f"compiled extension not loaded: {_ext.load_error}"
    if not _ext.cuda_version:
        return "llmkernels was built without CUDA"
    return None


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        default=None,
        help="I/K: run only every K-th collected test starting at the I-th (0-based); "
        "scripts/run_tests_parallel.py uses it to split large files across processes",
    )


def _select_shard(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {shard}: expected I/K with 0 <= I < K")
    kept = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = kept


def pytest_collection_modifyitems(config, items):
    _select_shard(config, items)
    reason = _cuda_skip_reason()
    skip_cuda = pytest.mark.skip(reason=reason) if reason is not None else None
    # `triton_interp` cases feed CPU tensors to Triton, which only the interpreter runs: on a GPU machine
    # (TRITON_INTERPRET unset) their GPU counterparts are the `cuda` cases.
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    skip_interp = pytest.mark.skip(reason="Triton interpreter case: runs only without a GPU (TRITON_INTERPRET=1)")
    for item in items:
        if "cuda" in item.keywords:
            if skip_cuda is not None:
                item.add_marker(skip_cuda)
        elif "triton_interp" in item.keywords and not interp:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test, so cases do not share inputs; stable across runs and processes (crc32, not
    # hash(), which Python salts per process) so a failure reproduces. LLMKERNELS_TEST_SEED draws other inputs.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("LLMKERNELS_TEST_SEED", "0"))
    torch.manual_seed(seed % (2**31))
    yield
    if HAS_CUDA and "cuda" in request.node.keywords:
        # Kernel launches are asynchronous: wait here so a kernel fault is reported by the test that launched
        # it, not by whichever test synchronises next.
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


def pytest_report_header(config):
    return [
        f"llmkernels: extension {llmkernels.extension_status()}, CUDA build '{_ext.cuda_version}', "
        f"CPU ISA '{_ext.cpu_isa}', GPU: {torch.cuda.get_device_name() if HAS_CUDA else 'none'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}",
    ]
