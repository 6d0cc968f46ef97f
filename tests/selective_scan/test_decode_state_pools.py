"""Decode steps against pools of state rows (continuous batching): selective_state_update(state_batch_indices=...)
(mamba_ssm's) and causal_conv1d_update(conv_state_indices=...) (causal_conv1d's), each batch row stepping the
state row its index names.

What they must equal, independently of the kernels: the plain step (no indices) on the named rows gathered into a
batch, scattered back; every other row untouched (bitwise). Every backend: the reference, the C++ CPU kernels, the
CUDA C++ kernels and (the scan step) Triton (interpreter here, compiled on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch
from scan_cases import UPDATE_BACKEND_DEVICES, needs_update_kernel, triton_interp, update_inputs
from utils import assert_close_dtype

import llmkernels
from llmkernels.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from llmkernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref

needs_ext = needs_update_kernel
BACKEND_DEVICES = UPDATE_BACKEND_DEVICES

# (pool rows, batch, dim, dstate, ngroups, x dtype, state dtype): the CPU kernel's in-place fp32 path and its
# converted one (bf16 state, dstate 33), a dim that its 256-channel items split across threads, one row.
CASES = [
    (7, 3, 8, 16, None, torch.float32, torch.float32),
    (5, 2, 70, 33, 2, torch.bfloat16, torch.bfloat16),
    (9, 4, 1500, 16, 3, torch.float32, torch.float32),
    (3, 1, 4, 5, None, torch.float16, torch.float32),
]


def _pool_inputs(case, device, index_dtype=torch.int32):
    rows, batch, dim, dstate, ngroups, dtype, state_dtype = case
    kw = update_inputs(batch, dim, dstate, ngroups, dtype, state_dtype, device)
    kw["state"] = torch.randn(rows, dim, dstate, device=device).to(state_dtype)
    indices = torch.randperm(rows, device=device)[:batch].to(index_dtype)
    return kw, indices


def _expected(kw, indices):
    """The plain step on the named rows, gathered; the pool afterwards."""
    rows = indices.long()
    picked = kw["state"][rows].clone()
    y = selective_state_update_ref(**{**kw, "state": picked})
    pool = kw["state"].clone()
    pool[rows] = picked
    return y, pool


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"pool{c[0]}-b{c[1]}-d{c[2]}-n{c[3]}-{str(c[6])[6:]}")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_steps_only_the_named_rows(backend, device, case):
    if backend == "triton" and device == "cpu" and case[2] > 100:
        pytest.skip("the interpreter: small shapes only")
    kw, indices = _pool_inputs(case, device)
    want_y, want_pool = _expected(kw, indices)
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw, state_batch_indices=indices)
    assert_close_dtype(y, want_y)
    unnamed = torch.ones(kw["state"].shape[0], dtype=torch.bool, device=device)
    unnamed[indices.long()] = False
    assert torch.equal(kw["state"][unnamed], want_pool[unnamed]), "a row no index names changed"
    assert_close_dtype(kw["state"], want_pool)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_int64_indices_and_identity_indices(backend, device):
    """torch.long indices (as index tensors usually are) are taken; indices 0..batch-1 equal no indices."""
    case = (3, 3, 8, 16, 2, torch.float32, torch.float32)
    kw, _ = _pool_inputs(case, device)
    plain = {**kw, "state": kw["state"].clone()}
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw, state_batch_indices=torch.arange(3, device=device))
        y_plain = llmkernels.selective_state_update(**plain)
    assert torch.equal(y, y_plain) and torch.equal(kw["state"], plain["state"])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_requests_in_pool_slots_decode_as_their_own_scans(backend, device):
    """Two requests living in slots 4 and 1 of a six-row pool, then one of them alone: each request's outputs and
    final state equal selective_scan_fn over its own tokens from its own initial state."""
    dim, dstate, steps = 6, 16, 5
    scan = [update_inputs(1, dim, dstate, None, torch.float32, None, device) for _ in range(2)]
    A, D, dt_bias = scan[0]["A"], scan[0]["D"], scan[0]["dt_bias"]
    tokens = [{k: torch.randn(steps, dim, device=device) for k in ("x", "z")} for _ in range(2)]
    for t in tokens:
        t["dt"] = 0.5 * torch.rand(steps, dim, device=device)
        t["B"], t["C"] = torch.randn(steps, dstate, device=device), torch.randn(steps, dstate, device=device)
    pool = torch.randn(6, dim, dstate, device=device)
    init = [pool[4].clone(), pool[1].clone()]
    slots = [4, 1]
    ys = [[], []]
    with llmkernels.use_backend(backend):
        for t in range(steps):
            live = [0, 1] if t < 3 else [1]  # request 0 finishes after three tokens
            batch = {k: torch.stack([tokens[r][k][t] for r in live]) for k in ("x", "z", "dt", "B", "C")}
            y = llmkernels.selective_state_update(
                pool, A=A, D=D, dt_bias=dt_bias, dt_softplus=True, **batch,
                state_batch_indices=torch.tensor([slots[r] for r in live], dtype=torch.int32, device=device),
            )  # fmt: skip
            for i, r in enumerate(live):
                ys[r].append(y[i])
    for r, n in ((0, 3), (1, steps)):
        seq = {k: v[:n].T[None] for k, v in tokens[r].items()}  # (1, dim or dstate, n)
        out, last = selective_scan_ref(seq["x"], seq["dt"], A, seq["B"], seq["C"], D, seq["z"], dt_bias, True,
                                       return_last_state=True, initial_state=init[r][None])  # fmt: skip
        torch.testing.assert_close(torch.stack(ys[r], dim=1), out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[slots[r]], last[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
@pytest.mark.parametrize("indices,match", [([5, 0, 7], "state_batch_indices must be below 7"),
                                           ([5, 0, 2**32 + 1], "state_batch_indices must be below 7"),
                                           ([2, 0, 2], "state_batch_indices must be distinct")],
                         ids=["past-the-pool", "past-int32", "repeated"])  # fmt: skip
def test_bad_index_values_are_refused_before_the_state_changes(backend, indices, match):
    kw, _ = _pool_inputs(CASES[0], "cpu")
    before = kw["state"].clone()
    with llmkernels.use_backend(backend), pytest.raises((ValueError, RuntimeError), match=match):
        llmkernels.selective_state_update(**kw, state_batch_indices=torch.tensor(indices))  # (int64: narrowed)
    assert torch.equal(kw["state"], before)


def _pad_slot_indices(rows, device, past_the_pool):
    """Batch rows 0 and 2 live in pool rows 4 and 1; row 1 is a pad slot (-1, or past the pool on a GPU, which
    cannot check without a sync and leaves such a row out too)."""
    return torch.tensor([4, rows + 3 if past_the_pool else -1, 1], dtype=torch.int64, device=device)


@pytest.mark.parametrize("past_the_pool", [False, pytest.param(True, marks=pytest.mark.cuda)], ids=["-1", "past"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_pad_slots_are_left_out(backend, device, past_the_pool):
    if past_the_pool and device != "cuda":
        pytest.skip("the CPU kernel and the reference refuse an index past the pool")
    kw, _ = _pool_inputs((6, 3, 8, 16, 2, torch.float32, torch.float32), device)
    indices = _pad_slot_indices(6, device, past_the_pool)
    live = torch.tensor([0, 2], device=device)
    want_y, want_pool = _expected({**kw, **{k: kw[k][live] for k in ("x", "dt", "B", "C", "z")}}, indices[live])
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw, state_batch_indices=indices)
    assert_close_dtype(y[live], want_y)
    assert (y[1] == 0).all()
    assert torch.equal(kw["state"][[0, 2, 3, 5]], want_pool[[0, 2, 3, 5]]), "a pad slot changed a pool row"
    assert_close_dtype(kw["state"], want_pool)


@pytest.mark.parametrize("indices,error,match", [
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "state_batch_indices must have dtype in"),
    (torch.tensor([0, 1], dtype=torch.int32), ValueError, "state_batch_indices must have shape"),
    (torch.tensor([[0, 1, 2]], dtype=torch.int32), ValueError, "state_batch_indices must have 1 dimensions"),
    ([0, 1, 2], TypeError, "state_batch_indices must be a torch.Tensor"),
])  # fmt: skip
def test_bad_index_argument_is_named(indices, error, match):
    kw, _ = _pool_inputs(CASES[0], "cpu")
    with pytest.raises(error, match=match):
        llmkernels.selective_state_update(**kw, state_batch_indices=indices)


def test_the_pool_must_match_the_channels():
    kw, indices = _pool_inputs(CASES[0], "cpu")
    with pytest.raises(ValueError, match="state must have shape"):
        llmkernels.selective_state_update(**{**kw, "state": kw["state"][:, :4]}, state_batch_indices=indices)


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------
@needs_ext
def test_opcheck():
    kw, indices = _pool_inputs(CASES[0], "cpu")
    torch.library.opcheck(torch.ops.llmkernels.selective_state_update.default, [*kw.values(), indices])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=[triton_interp, pytest.mark.triton_interp]),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])  # fmt: skip
def test_opcheck_triton(device):
    from llmkernels.triton.selective_scan import selective_state_update_triton

    kw, indices = _pool_inputs(CASES[0], device)
    checks = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if device == "cuda":  # (the interpreter cannot launch on the aot_dispatch test's functional tensors)
        checks.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(selective_state_update_triton, [*kw.values(), indices], test_utils=checks)


@needs_ext
def test_torch_compile_fullgraph():
    kw, indices = _pool_inputs(CASES[0], "cpu")
    want_y, want_pool = _expected(kw, indices)
    fn = torch.compile(llmkernels.selective_state_update, fullgraph=True, backend="aot_eager")
    y = fn(**kw, state_batch_indices=indices)
    assert_close_dtype(y, want_y)
    assert_close_dtype(kw["state"], want_pool)


# ---------------------------------------------------------------------------------------------------
# causal_conv1d_update(conv_state_indices=...)
# ---------------------------------------------------------------------------------------------------
CONV_BACKEND_DEVICES = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=needs_ext),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]
# (pool rows, batch, dim, width, x dtype, state dtype): in place (fp32 state) and converted, 512-channel items
# and (3 x 3000 channels) the threaded split on the CPU.
CONV_CASES = [
    (6, 3, 8, 4, torch.float32, torch.float32),
    (4, 2, 5, 2, torch.bfloat16, torch.bfloat16),
    (5, 3, 3000, 3, torch.float32, torch.float32),
]


def _conv_pool(case, device):
    rows, batch, dim, width, dtype, state_dtype = case
    kw = dict(
        x=torch.randn(batch, dim, device=device).to(dtype),
        conv_state=torch.randn(rows, dim, width, device=device).to(state_dtype),
        weight=torch.randn(dim, width, device=device),
        bias=torch.randn(dim, device=device),
        activation="silu",
    )
    return kw, torch.randperm(rows, device=device)[:batch].to(torch.int32)  # fmt: skip


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"pool{c[0]}-b{c[1]}-d{c[2]}-w{c[3]}-{str(c[5])[6:]}")
@pytest.mark.parametrize("backend,device", CONV_BACKEND_DEVICES)
def test_conv_steps_only_the_named_rows(backend, device, case):
    kw, indices = _conv_pool(case, device)
    picked = kw["conv_state"][indices.long()].clone()
    want_y = causal_conv1d_update_ref(**{**kw, "conv_state": picked})
    want_pool = kw["conv_state"].clone()
    want_pool[indices.long()] = picked
    with llmkernels.use_backend(backend):
        y = llmkernels.causal_conv1d_update(**kw, conv_state_indices=indices)
    assert_close_dtype(y, want_y)
    unnamed = torch.ones(kw["conv_state"].shape[0], dtype=torch.bool, device=device)
    unnamed[indices.long()] = False
    assert torch.equal(kw["conv_state"][unnamed], want_pool[unnamed]), "a row no index names changed"
    assert_close_dtype(kw["conv_state"], want_pool)


@pytest.mark.parametrize("backend,device", CONV_BACKEND_DEVICES)
def test_conv_requests_in_pool_slots_equal_their_own_convolutions(backend, device):
    """Two requests in slots 3 and 0 of a five-row pool (zero states: fresh requests), stepped token by token,
    give each its own causal convolution; int64 indices."""
    dim, width, steps = 6, 4, 7
    weight, bias = torch.randn(dim, width, device=device), torch.randn(dim, device=device)
    seqs = torch.randn(2, dim, steps, device=device)
    pool = torch.randn(5, dim, width, device=device)
    pool[[3, 0]] = 0.0
    outs = []
    with llmkernels.use_backend(backend):
        for t in range(steps):
            outs.append(
                llmkernels.causal_conv1d_update(
                    seqs[:, :, t], pool, weight, bias, "silu", conv_state_indices=torch.tensor([3, 0], device=device)
                )
            )
    want = causal_conv1d_ref(seqs, weight, bias, "silu")
    torch.testing.assert_close(torch.stack(outs, dim=-1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
@pytest.mark.parametrize("indices,match", [([1, 6, 0], "conv_state_indices must be below 6"),
                                           ([1, 1, 0], "conv_state_indices must be distinct")],
                         ids=["past-the-pool", "repeated"])  # fmt: skip
def test_conv_bad_index_values_are_refused_before_the_state_changes(backend, indices, match):
    kw, _ = _conv_pool(CONV_CASES[0], "cpu")
    before = kw["conv_state"].clone()
    with llmkernels.use_backend(backend), pytest.raises((ValueError, RuntimeError), match=match):
        llmkernels.causal_conv1d_update(**kw, conv_state_indices=torch.tensor(indices, dtype=torch.int32))
    assert torch.equal(kw["conv_state"], before)


@pytest.mark.parametrize("past_the_pool", [False, pytest.param(True, marks=pytest.mark.cuda)], ids=["-1", "past"])
@pytest.mark.parametrize("backend,device", CONV_BACKEND_DEVICES)
def test_conv_pad_slots_are_left_out(backend, device, past_the_pool):
    if past_the_pool and device != "cuda":
        pytest.skip("the CPU kernel and the reference refuse an index past the pool")
    kw, _ = _conv_pool((6, 3, 8, 4, torch.float32, torch.float32), device)
    indices = _pad_slot_indices(6, device, past_the_pool)
    live = torch.tensor([0, 2], device=device)
    want_pool = kw["conv_state"].clone()
    picked = want_pool[indices[live]]
    want_y = causal_conv1d_update_ref(**{**kw, "x": kw["x"][live], "conv_state": picked})
    want_pool[indices[live]] = picked
    with llmkernels.use_backend(backend):
        y = llmkernels.causal_conv1d_update(**kw, conv_state_indices=indices)
    assert_close_dtype(y[live], want_y)
    assert (y[1] == 0).all()
    assert torch.equal(kw["conv_state"], want_pool) or torch.allclose(kw["conv_state"], want_pool)
    assert torch.equal(kw["conv_state"][[0, 2, 3, 5]], want_pool[[0, 2, 3, 5]]), "a pad slot changed a pool row"


def test_conv_bad_index_argument_is_named():
    kw, _ = _conv_pool(CONV_CASES[0], "cpu")
    with pytest.raises(TypeError, match="conv_state_indices must have dtype in"):
        llmkernels.causal_conv1d_update(**kw, conv_state_indices=torch.zeros(3))
    with pytest.raises(ValueError, match="conv_state_indices must have shape"):
        llmkernels.causal_conv1d_update(**kw, conv_state_indices=torch.zeros(2, dtype=torch.int32))


@needs_ext
def test_conv_opcheck_and_compile():
    kw, indices = _conv_pool(CONV_CASES[0], "cpu")
    args = [kw["x"], kw["conv_state"], kw["weight"], kw["bias"], True, indices]
    torch.library.opcheck(torch.ops.llmkernels.causal_conv1d_update.default, args)
    state_ref = kw["conv_state"].clone()
    fn = torch.compile(llmkernels.causal_conv1d_update, fullgraph=True, backend="aot_eager")
    y = fn(**kw, conv_state_indices=indices)
    want = causal_conv1d_update_ref(**{**kw, "conv_state": state_ref}, conv_state_indices=indices)
    assert_close_dtype(y, want)
    assert_close_dtype(kw["conv_state"], state_ref)


@needs_ext
def test_the_cpu_ops_name_the_indices():
    """The C++ ops, called directly (no Python checks first), name the argument in their errors."""
    kw, indices = _pool_inputs(CASES[0], "cpu")
    args = [kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")]
    with pytest.raises(RuntimeError, match="state_batch_indices must have dtype int32"):
        torch.ops.llmkernels.selective_state_update(*args, indices.long())
    with pytest.raises(RuntimeError, match="state_batch_indices must have shape"):
        torch.ops.llmkernels.selective_state_update(*args, indices[:2])
    ckw, cindices = _conv_pool(CONV_CASES[0], "cpu")
    cargs = [ckw["x"], ckw["conv_state"], ckw["weight"], ckw["bias"], True]
    with pytest.raises(RuntimeError, match="conv_state_indices must have dtype int32"):
        torch.ops.llmkernels.causal_conv1d_update(*cargs, cindices.long())


def test_a_flat_x_is_named_before_the_indices():
    kw, indices = _pool_inputs(CASES[0], "cpu")
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        llmkernels.selective_state_update(**{**kw, "x": kw["x"][0]}, state_batch_indices=indices)
    ckw, cindices = _conv_pool(CONV_CASES[0], "cpu")
    with pytest.raises(ValueError, match=r"x must be \(batch, dim\) or \(batch, dim, seqlen\)"):
        llmkernels.causal_conv1d_update(**{**ckw, "x": ckw["x"][0]}, conv_state_indices=cindices)


@needs_ext
def test_a_backward_through_a_pool_step_is_refused():
    kw, indices = _pool_inputs(CASES[0], "cpu")
    x = kw["x"].requires_grad_()
    y = llmkernels.selective_state_update(**{**kw, "x": x}, state_batch_indices=indices)
    with pytest.raises(RuntimeError, match="selective_state_update is not differentiable.*selective_scan_fn"):
        y.sum().backward()


@triton_interp
@pytest.mark.triton_interp
def test_triton_op_reads_strided_indices_by_row():
    """The Triton op called directly with indices that are a strided column (the public function hands it a
    contiguous copy; the op makes its own)."""
    from llmkernels.triton.selective_scan import selective_state_update_triton

    kw, indices = _pool_inputs(CASES[0], "cpu")
    want_y, want_pool = _expected(kw, indices)
    column = torch.stack([indices, indices.flip(0)], dim=1)[:, 0]
    y = selective_state_update_triton(*[kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias",
                                                        "dt_softplus")], column)  # fmt: skip
    assert_close_dtype(y, want_y)
    assert_close_dtype(kw["state"], want_pool)
