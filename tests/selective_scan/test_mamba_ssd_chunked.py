"""mamba_chunk_scan_combined's chunked routes (ops/mamba_ssd_chunked.py: SSD's chunked matrix products in PyTorch
ops, the GPU's route; triton/mamba_ssd.py: its (Q x Q) tiles fused in a Triton kernel): against the step-by-step
reference in fp64 and fp32, forward, final states and every gradient, across chunk and chunk-group boundaries (both
shrunk so that small sequences cross many), packed sequences, the route's choice and its errors, torch.compile,
opcheck. The cuda cases run the routes on a GPU; the Triton ones run on CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_mamba_chunk_scan import _inputs
from utils import assert_close_dtype

import llmkernels
import llmkernels.ops.mamba_chunk_scan as chunk_scan_op
import llmkernels.ops.mamba_ssd_chunked as chunked
from llmkernels.ops.selective_scan import checked_seq_idx
from llmkernels.reference.mamba_chunk_scan import mamba_chunk_scan_ref, processed_dt

CPU = torch.device("cpu")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
TRITON_DEVICES = [
    pytest.param("cpu", marks=[interp, pytest.mark.triton_interp], id="triton-interp"),
    pytest.param("cuda", marks=pytest.mark.cuda, id="triton-cuda"),
]


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunks of 4 tokens in groups of 3 chunks: a few dozen tokens cross every kind of boundary."""
    monkeypatch.setattr(chunked, "CHUNK", 4)
    monkeypatch.setattr(chunked, "GROUP", 3)


@pytest.fixture
def chunked_route(monkeypatch):
    monkeypatch.setattr(chunk_scan_op, "ROUTE", "chunked")


def _packed(batch, seqlen, cuts_per_row, device="cpu", generator=None):
    """seq_idx with random sequence starts (several per row, some of length 1), renumbered from 0."""
    seq = torch.zeros(batch, seqlen, dtype=torch.int32)
    for b in range(batch):
        for start in torch.randint(1, max(seqlen, 2), (cuts_per_row,), generator=generator).tolist():
            seq[b, start:] += 1
    return seq.to(device)


DT_MODES = {  # (dt_softplus, dt_limit, A sign): the usual; negative dt (no softplus, limit below 0); dt clamped to 0
    "softplus": (True, (0.0, math.inf), -1),  # and to a ceiling; a positive A (growth)
    "negative-dt": (False, (-0.3, 0.5), -1),
    "clamped": (False, (0.0, 0.2), -1),
    "positive-A": (True, (0.0, math.inf), 1),
}


@pytest.mark.parametrize("seqlen", [1, 4, 17, 40])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("d_per_channel", [False, True], ids=["D-head", "D-channel"])
@pytest.mark.parametrize("dt_mode", list(DT_MODES))
def test_fp64_forward_and_final_states_match_the_reference(small_tiles, seqlen, packed, d_per_channel, dt_mode):
    """fp64 in and out: the chunked sums equal the recurrence to rounding (1e-10), for every boundary."""
    torch.manual_seed(seqlen)
    softplus, limit, sign = DT_MODES[dt_mode]
    kw = _inputs(2, seqlen, 6, 4, 3, 8, dtype=torch.float64, d_per_channel=d_per_channel)
    kw["A"] = sign * kw["A"].double().abs() * (0.1 if sign > 0 else 1.0)
    seq_idx = _packed(2, seqlen, 3) if packed else None
    want_y, want_state = mamba_chunk_scan_ref(**kw, dt_softplus=softplus, dt_limit=limit, return_final_states=True,
                                              seq_idx=seq_idx)  # fmt: skip
    dt = processed_dt(kw["dt"], kw["dt_bias"], softplus, limit, torch.float64)
    renumbered = None if seq_idx is None else checked_seq_idx("t", seq_idx, 2, seqlen, CPU)
    y, state = chunked.ssd_chunked(kw["x"], dt, kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["initial_states"],
                                   renumbered, chunk=chunked.CHUNK)  # fmt: skip
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)


def _check_gradients(device, seqlen, packed):
    """Every input's gradient through the public op, with gradients into y and the final states, against autograd of
    the fp64 reference. fp32: the sums run in a different order than the recurrence, so 1e-4 (inputs O(1), states
    O(10))."""
    kw = _inputs(2, seqlen, 4, 8, 2, 16, device=device)
    seq_idx = _packed(2, seqlen, 2, device) if packed else None
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    exact = {k: v.double().cpu().requires_grad_() for k, v in kw.items()}
    y, state = llmkernels.mamba_chunk_scan_combined(**leaves, chunk_size=64, dt_softplus=True, seq_idx=seq_idx,
                                                    return_final_states=True)  # fmt: skip
    want_y, want_state = mamba_chunk_scan_ref(**exact, dt_softplus=True, seq_idx=None if seq_idx is None else
                                              seq_idx.cpu(), return_final_states=True)  # fmt: skip
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double().cpu(), want_state, rtol=1e-4, atol=1e-4)
    dy, dstate = torch.randn_like(y), torch.randn_like(state)
    torch.autograd.backward((y, state), (dy, dstate))
    torch.autograd.backward((want_y, want_state), (dy.double().cpu(), dstate.double().cpu()))
    for k in kw:
        torch.testing.assert_close(leaves[k].grad.double().cpu(), exact[k].grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, k=k: f"d{k}: {m}")  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gradients_match_the_reference(chunked_route, small_tiles, device, packed):
    """The checkpointed forward's autograd backward."""
    torch.manual_seed(1)
    _check_gradients(device, 23, packed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_public_op_at_its_default_tiles(chunked_route, device, dtype):
    """The default 64-token chunks, a length that is not a multiple of them, 16-bit inputs (y in their dtype)."""
    kw = _inputs(2, 150, 4, 16, 1, 32, dtype=dtype, device=device)
    y, state = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=256, dt_softplus=True, dt_limit=(0.0, 1.0),
                                                    return_final_states=True)  # fmt: skip
    ref = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want_y, want_state = mamba_chunk_scan_ref(**ref, dt_softplus=True, dt_limit=(0.0, 1.0), return_final_states=True)
    assert y.dtype == dtype and state.dtype == torch.float32
    assert_close_dtype(y, want_y.to(dtype))
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-3)


def test_varlen_states_on_the_chunked_route(chunked_route):
    kw = _inputs(1, 30, 4, 8, 2, 16)
    seq_idx = torch.tensor([[0] * 7 + [1] * 13 + [2] * 10], dtype=torch.int32)
    cu = torch.tensor([0, 7, 20, 30], dtype=torch.int32)
    got = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=8, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu,
                                               return_final_states=True, return_varlen_states=True)  # fmt: skip
    want = mamba_chunk_scan_ref(**kw, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu, return_final_states=True,
                                return_varlen_states=True)  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_an_inf_initial_state_stays_in_the_first_sequence(chunked_route, small_tiles):
    kw = _inputs(1, 20, 2, 4, 1, 8)
    kw["initial_states"][0, 0, 0, 0] = float("inf")
    seq_idx = torch.tensor([[0] * 6 + [1] * 14], dtype=torch.int32)
    y = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=4, dt_softplus=True, seq_idx=seq_idx)
    assert torch.isfinite(y[0, 6:]).all() and not torch.isfinite(y[0, :6, 0]).all()


def test_the_route(monkeypatch):
    """auto: the scan kernels on the CPU and under a forced backend (the chunked route is a GPU's); a bad value of
    LLMKERNELS_MAMBA2_ROUTE is an error naming it."""
    x = torch.randn(1, 4, 2, 4)
    assert chunk_scan_op._route("f", x) == "scan"
    assert chunk_scan_op._route("f", torch.empty(1, device="meta").expand(1)) == "scan"
    monkeypatch.setattr(chunk_scan_op, "ROUTE", "chunked")
    assert chunk_scan_op._route("f", x) == "chunked"
    monkeypatch.setattr(chunk_scan_op, "ROUTE", "fast")
    with pytest.raises(ValueError, match="LLMKERNELS_MAMBA2_ROUTE"):
        llmkernels.mamba_chunk_scan_combined(**_inputs(1, 4, 2, 4, 1, 8), chunk_size=4)


def test_a_gpu_takes_the_route_measured_fastest(monkeypatch):
    """On CUDA tensors "auto" reads the measured order (bench/make_dispatch_table.py), separately for training and
    inference; without one, the PyTorch chunked route; a Triton route without Triton falls to the next."""
    from types import SimpleNamespace

    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # (only the device type is read)
    orders = {}
    monkeypatch.setattr(chunk_scan_op, "measured_cuda_order", lambda key: tuple(orders.get(key, ())))
    monkeypatch.setattr(chunk_scan_op, "triton_unavailable_reason", lambda device_type: None)
    assert chunk_scan_op._route("f", gpu) == "chunked" and chunk_scan_op._route("f", gpu, training=True) == "chunked"
    orders.update(mamba2_route_inference=["chunked-triton", "chunked", "scan"], mamba2_route_training=["scan"])
    assert chunk_scan_op._route("f", gpu) == "chunked-triton"
    assert chunk_scan_op._route("f", gpu, training=True) == "scan"
    monkeypatch.setattr(chunk_scan_op, "triton_unavailable_reason", lambda device_type: "no triton")
    assert chunk_scan_op._route("f", gpu) == "chunked"
    with llmkernels.use_backend("triton"):
        assert chunk_scan_op._route("f", gpu) == "scan"


@pytest.mark.cuda
def test_a_gpu_takes_the_chunked_route_by_itself(monkeypatch):
    """Without a measured order (a table made from GPU benchmarks may pick another route: the test above)."""
    monkeypatch.setattr(chunk_scan_op, "measured_cuda_order", lambda key: ())
    calls = []
    real = chunked.ssd_chunked
    monkeypatch.setattr(chunk_scan_op, "ssd_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = _inputs(1, 70, 4, 16, 1, 64, dtype=torch.bfloat16, device="cuda")
    y = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=256, dt_softplus=True)
    assert calls == [1]
    ref = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    assert_close_dtype(y, mamba_chunk_scan_ref(**ref, dt_softplus=True).to(torch.bfloat16))
    with llmkernels.use_backend("cuda"):  # a forced backend runs its own scan kernels
        llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=256, dt_softplus=True)
    assert calls == [1]


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(chunked_route, dynamic):
    fn = torch.compile(
        lambda kw: llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True),
        fullgraph=True, dynamic=dynamic, backend="aot_eager",
    )  # fmt: skip
    for seqlen in (17, 70):
        kw = _inputs(2, seqlen, 4, 8, 2, 16)
        torch.testing.assert_close(fn(kw), mamba_chunk_scan_ref(**kw, dt_softplus=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ["scan", "chunked", pytest.param("chunked-triton", marks=[interp,
                                                                                           pytest.mark.triton_interp])])
def test_outputs_are_contiguous_on_every_route(monkeypatch, route):
    """Callers .view mamba_ssm's y (transformers' FalconH1 does; without D and z nothing else would copy it) and keep
    the final states as the cache that selective_state_update then updates in place (it requires them contiguous)."""
    monkeypatch.setattr(chunk_scan_op, "ROUTE", route)
    kw = {k: v for k, v in _inputs(2, 70, 4, 8, 1, 16).items() if k not in ("D", "z")}
    y, state = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, return_final_states=True)
    assert y.is_contiguous() and state.is_contiguous()
    want_y, want_state = mamba_chunk_scan_ref(**kw, return_final_states=True)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_through_the_checkpointed_backward(chunked_route):
    fn = torch.compile(lambda kw: llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    kw = {k: v.requires_grad_() for k, v in _inputs(2, 23, 4, 8, 2, 16).items()}
    fn(kw).sum().backward()
    got = {k: v.grad for k, v in kw.items()}
    exact = {k: v.detach().double().requires_grad_() for k, v in kw.items()}
    mamba_chunk_scan_ref(**exact, dt_softplus=True).sum().backward()
    for k in kw:
        torch.testing.assert_close(got[k].double(), exact[k].grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, k=k: f"d{k}: {m}")  # fmt: skip


@pytest.fixture
def triton_route(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(chunk_scan_op, "ROUTE", "chunked-triton")
    monkeypatch.setattr(chunked, "GROUP", 2)  # the entering states chain over groups of 2 chunks (128 tokens)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", [(2, 17, 4, 8, 2, 16), (1, 1, 2, 4, 1, 8), (2, 150, 6, 20, 3, 40),
                                   (1, 300, 2, 64, 1, 96), (2, 64, 3, 16, 1, 16), (1, 128, 4, 8, 2, 24)],
                         ids=lambda s: "b{}-L{}-h{}-p{}-g{}-n{}".format(*s))  # (64, 128: no padding)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_triton_forward_matches_the_reference(triton_route, device, shape, packed):
    """fp32 against the fp64 reference: headdims and dstates that are not powers of two or block multiples, seqlens
    across the kernel's 64-token chunks and 32-token key blocks, D per head, z, initial and final states. 1e-4: the
    products run in IEEE fp32 in another order than the recurrence; outputs are O(10)."""
    torch.manual_seed(2)
    b, L = shape[:2]
    kw = _inputs(*shape, device=device)
    seq_idx = _packed(b, L, 3, device) if packed else None
    y, state = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=256, dt_softplus=True, seq_idx=seq_idx,
                                                    return_final_states=True)  # fmt: skip
    exact = {k: v.double().cpu() for k, v in kw.items()}
    want_y, want_state = mamba_chunk_scan_ref(**exact, dt_softplus=True, return_final_states=True,
                                              seq_idx=None if seq_idx is None else seq_idx.cpu())  # fmt: skip
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double().cpu(), want_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_16bit_inputs(triton_route, device, dtype):
    """16-bit x, B, C, z; no D; D of (nheads, headdim) in the other call. y in the inputs' dtype, within their
    tolerance of the fp32 reference on the same (rounded) inputs."""
    kw = _inputs(2, 130, 4, 32, 2, 64, dtype=dtype, device=device, d_per_channel=True)
    ref = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for drop in ((), ("D",)):
        args = {k: v for k, v in kw.items() if k not in drop}
        y = llmkernels.mamba_chunk_scan_combined(**args, chunk_size=64, dt_softplus=True)
        want = mamba_chunk_scan_ref(**{k: v for k, v in ref.items() if k not in drop}, dt_softplus=True)
        assert y.dtype == dtype and y.is_contiguous()
        assert_close_dtype(y, want.to(dtype))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_route_gradients(triton_route, device):
    """The Triton forward's backward recomputes through the PyTorch route."""
    torch.manual_seed(3)
    _check_gradients(device, 70, packed=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("wanted", [("x",), ("C", "initial_states"), ("dt", "A")], ids="-".join)
def test_triton_route_gradients_of_some_inputs(triton_route, device, wanted):
    """Only the inputs that require grad get one (the recompute differentiates only those), and they are right."""
    kw = _inputs(1, 40, 2, 8, 1, 16, device=device)
    leaves = {k: v.clone().requires_grad_(k in wanted) for k, v in kw.items()}
    exact = {k: v.double().cpu().requires_grad_(k in wanted) for k, v in kw.items()}
    llmkernels.mamba_chunk_scan_combined(**leaves, chunk_size=64, dt_softplus=True).sum().backward()
    mamba_chunk_scan_ref(**exact, dt_softplus=True).sum().backward()
    for k in kw:
        if k in wanted:
            torch.testing.assert_close(leaves[k].grad.double().cpu(), exact[k].grad, rtol=1e-4, atol=1e-4)
        else:
            assert leaves[k].grad is None


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_inf_initial_state_stays_in_the_first_sequence(triton_route, device):
    kw = _inputs(1, 150, 2, 16, 1, 16, device=device)
    kw["initial_states"][0, 0, 0, 0] = float("inf")
    seq_idx = torch.tensor([[0] * 70 + [1] * 80], dtype=torch.int32, device=device)
    y = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True, seq_idx=seq_idx)
    assert torch.isfinite(y[0, 70:]).all() and not torch.isfinite(y[0, :70, 0]).all()


def _triton_op_args(device):
    from llmkernels.triton import mamba_ssd  # noqa: F401  (registers the op)

    kw = _inputs(2, 20, 4, 16, 2, 16, device=device)
    dt = processed_dt(kw["dt"], kw["dt_bias"], True, (0.0, math.inf), torch.float32)
    return (kw["x"], dt, kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["initial_states"],
            torch.tensor([[0] * 9 + [1] * 11] * 2, dtype=torch.int32, device=device))  # fmt: skip


@interp
@pytest.mark.triton_interp
def test_triton_opcheck_interp():
    # (the interpreter cannot launch on aot_dispatch's functional tensors: test_triton_opcheck_gpu runs that check)
    torch.library.opcheck(torch.ops.llmkernels.ssd_chunked_fwd_triton.default, _triton_op_args("cpu"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip


@pytest.mark.cuda
def test_triton_opcheck_gpu():
    torch.library.opcheck(torch.ops.llmkernels.ssd_chunked_fwd_triton.default, _triton_op_args("cuda"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_route_compiles_fullgraph(triton_route, device):
    backend = "aot_eager" if device == "cpu" else "inductor"  # (interpreted, the op stays opaque to AOT tracing)
    fn = torch.compile(lambda kw: llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True),
                       fullgraph=True, backend=backend)  # fmt: skip
    kw = _inputs(2, 40, 4, 16, 2, 16, device=device)
    torch.testing.assert_close(fn(kw), mamba_chunk_scan_ref(**kw, dt_softplus=True), rtol=1e-4, atol=1e-4)


def test_triton_route_without_triton_support_is_an_error(monkeypatch):
    monkeypatch.setattr(chunk_scan_op, "ROUTE", "chunked-triton")
    monkeypatch.setattr(chunk_scan_op, "triton_unavailable_reason", lambda device_type: "no triton here")
    with pytest.raises(llmkernels.BackendError, match="chunked-triton: no triton here"):
        llmkernels.mamba_chunk_scan_combined(**_inputs(1, 4, 2, 4, 1, 8), chunk_size=4)


ROUTES = ["chunked", pytest.param("chunked-triton", marks=[interp, pytest.mark.triton_interp])]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("with_init", [False, True], ids=["no-init", "init"])
def test_an_empty_sequence(monkeypatch, route, with_init):
    """seqlen 0: y is empty and the final state is the initial one (zeros without), as on the scan route, and its
    gradient reaches initial_states."""
    monkeypatch.setattr(chunk_scan_op, "ROUTE", route)
    kw = _inputs(2, 0, 4, 8, 2, 16)
    if not with_init:
        del kw["initial_states"]
    else:
        kw["initial_states"].requires_grad_()
    y, state = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True, return_final_states=True)
    assert y.shape == (2, 0, 4, 8)
    torch.testing.assert_close(state, kw["initial_states"] if with_init else torch.zeros(2, 4, 8, 16))
    if with_init:
        state.sum().backward()
        torch.testing.assert_close(kw["initial_states"].grad, torch.ones(2, 4, 8, 16))


@pytest.mark.parametrize("route", ROUTES)
def test_autocast_does_not_lower_the_precision(monkeypatch, route):
    """Under bf16 autocast (mixed-precision training) the route's products stay fp32: fp32 inputs give the fp32
    answer (bf16 products of the decay weights and states were off by 0.2 at 1024 tokens)."""
    monkeypatch.setattr(chunk_scan_op, "ROUTE", route)
    kw = _inputs(1, 300, 4, 16, 1, 32)
    want = mamba_chunk_scan_ref(**kw, dt_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ROUTES)
def test_an_inf_initial_state_leaves_the_next_sequence_s_gradients_finite(monkeypatch, small_tiles, route):
    """The scan route restarts a sequence by a select, so nothing of an inf state reaches the next sequence's
    gradients either; the chunked products must not turn it into NaN through a 0 (C's masked rows, the masked
    exponents)."""
    monkeypatch.setattr(chunk_scan_op, "ROUTE", route)
    kw = {k: v.requires_grad_() for k, v in _inputs(1, 150, 2, 16, 1, 16).items()}
    with torch.no_grad():
        kw["initial_states"][0, 0, 0, 0] = float("inf")
    seq_idx = torch.tensor([[0] * 70 + [1] * 80], dtype=torch.int32)
    y = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True, seq_idx=seq_idx)
    y[0, 70:].sum().backward()
    for name in ("x", "dt", "B", "C", "z"):
        assert torch.isfinite(kw[name].grad[0, 70:]).all(), name
