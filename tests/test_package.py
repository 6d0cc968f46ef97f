"""The package itself: lean import, backend choice and its error messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

import llmkernels
from llmkernels import _backend


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, llmkernels, llmkernels.nn;"
        "import sys; assert not torch.cuda.is_initialized(), 'CUDA initialised';"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_works_without_extension():
    code = (
        "import llmkernels, torch;"
        "assert not llmkernels._ext.loaded and 'nope.so' in llmkernels._ext.load_error;"
        "q = torch.randn(1, 5, 2, 16); o = llmkernels.flash_attn_func(q, q, q);"
        "assert o.shape == q.shape"
    )
    env = dict(os.environ, LLMKERNELS_EXT_PATH="/nonexistent/nope.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown llmkernels backend 'fast'"):
        with llmkernels.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_says_why():
    q = torch.randn(1, 4, 2, 16)
    with llmkernels.use_backend("cuda"):
        with pytest.raises(llmkernels.BackendError, match="inputs are on cpu"):
            llmkernels.flash_attn_func(q, q, q)


def test_env_backend_is_honoured():
    code = "import llmkernels; assert llmkernels.requested_backend() == 'reference'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, LLMKERNELS_BACKEND="reference"))


def test_use_backend_nests():
    assert llmkernels.requested_backend() in (None, os.environ.get("LLMKERNELS_BACKEND"))
    with llmkernels.use_backend("reference"):
        with llmkernels.use_backend("cpu"):
            assert llmkernels.requested_backend() == "cpu"
        assert llmkernels.requested_backend() == "reference"


def test_every_public_op_has_a_reference_backend():
    assert _backend.REGISTRY, "no ops registered"
    for name, op in _backend.REGISTRY.items():
        assert "reference" in op.impls, f"{name} lacks a reference implementation"


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "llmkernels", "info"], check=True, capture_output=True, text=True)
    assert "flash_attn_func" in out.stdout and "reference" in out.stdout


def test_measured_cuda_orders_follow_the_benchmarks():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.make_dispatch_table import preferred_orders

    rows = [
        {"op": "flash_attn_fwd", "case": c, "impl": f"llmkernels-{impl}", "time_ms": t}
        for c, impl, t in [("a", "cuda", 2.0), ("a", "triton", 1.0), ("b", "cuda", 3.0), ("b", "triton", 2.0)]
    ] + [{"op": "selective_scan_fwd", "case": "a", "impl": "llmkernels-cuda", "time_ms": 1.0},
         {"op": "selective_scan_fwd", "case": "a", "impl": "llmkernels-triton", "time_ms": 5.0}]
    orders = preferred_orders(rows)
    assert orders == {"flash_attn_func": ["triton", "cuda", "reference"],
                      "selective_scan_fn": ["cuda", "triton", "reference"]}
    table = {"H100": orders}
    assert _backend.orders_for_device(table, "NVIDIA H100 80GB HBM3")["flash_attn_func"][0] == "triton"

    from bench.make_dispatch_table import mamba2_routes

    def mamba2(op, case, *impl_ms):
        return [{"op": op, "case": case, "impl": f"llmkernels-{i}", "time_ms": t} for i, t in impl_ms]

    fwd, bwd = "mamba_chunk_scan_combined_fwd", "mamba_chunk_scan_combined_fwd_bwd"
    rows = (mamba2(fwd, "a", ("cuda", 3.0), ("triton", 2.5), ("chunked", 1.0), ("chunked-triton", 0.4))
            + mamba2(fwd, "b", ("cuda", 9.0), ("chunked", 2.0), ("chunked-triton", 0.9))
            + mamba2(bwd, "a", ("cuda", 30.0), ("triton", 2.0), ("chunked", 4.0))
            + mamba2(bwd, "c", ("chunked", 4.0)))  # (one route alone decides nothing)  # fmt: skip
    assert mamba2_routes(rows) == {"mamba2_route_inference": ["chunked-triton", "chunked", "scan"],
                                   "mamba2_route_training": ["scan", "chunked", "chunked-triton"]}  # fmt: skip
    assert _backend.orders_for_device(table, "NVIDIA A10") == {}


def test_a_gpu_without_an_entry_takes_one_of_its_architecture():
    """An H200 (no entry of its own) takes the orders measured on an H100 (the same sm_90), not CUDA-first defaults;
    a name match wins over the architecture; other architectures get none; the capability is no op."""
    table = {"A100": {"_capability": [8, 0], "flash_attn_func": ["cuda", "triton"]},
             "H100": {"_capability": [9, 0], "flash_attn_func": ["triton", "cuda"]}}  # fmt: skip
    h200 = _backend.orders_for_device(table, "NVIDIA H200", (9, 0))
    assert h200 == {"flash_attn_func": ("triton", "cuda")}
    assert _backend.orders_for_device(table, "NVIDIA A100-SXM4-80GB", (9, 0))["flash_attn_func"][0] == "cuda"
    assert _backend.orders_for_device(table, "NVIDIA L4", (8, 9)) == {}
    assert _backend.orders_for_device({"H100": {"flash_attn_func": ["triton"]}}, "NVIDIA H200", (9, 0)) == {}
    committed = json.load(open(_backend.CUDA_DISPATCH_TABLE))  # (the committed H100 entry serves an H200)
    assert _backend.orders_for_device(committed, "NVIDIA H200", (9, 0)) == _backend.orders_for_device(
        committed, "NVIDIA H100 80GB HBM3", (9, 0))  # fmt: skip


def test_measured_orders_are_read_while_compiling(tmp_path, monkeypatch):
    """The first CUDA call may come inside a fullgraph torch.compile: the table file is read at trace time (a
    constant to Dynamo), not traced (Dynamo cannot trace open())."""
    import json

    table = tmp_path / "table.json"
    table.write_text(json.dumps({"H100": {"some_op": ["triton", "cuda"]}}))
    monkeypatch.setattr(_backend, "CUDA_DISPATCH_TABLE", str(table))
    monkeypatch.setattr(_backend, "_measured_orders", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))

    def fn(x):
        return x + 1 if _backend.measured_cuda_order("some_op")[0] == "triton" else x - 1

    torch._dynamo.reset()
    assert torch.compile(fn, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert _backend.measured_cuda_order("other_op") == ()


def test_rocm_gpus_take_no_orders_by_capability(tmp_path, monkeypatch):
    """ROCm reports gfx90a (MI210 / MI250) as capability (9, 0): the H100's measured orders must not reach it."""
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"H100": {"_capability": [9, 0], "some_op": ["triton", "cuda"]}}))
    monkeypatch.setattr(_backend, "CUDA_DISPATCH_TABLE", str(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "AMD Instinct MI250X")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for hip, expected in ((None, ("triton", "cuda")), ("6.2", ())):
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(_backend, "_measured_orders", None)
        assert _backend.measured_cuda_order("some_op") == expected
