"""causal_conv1d_update with causal_conv1d's other states: any state_len >= width - 1 (vLLM keeps width - 1) and
the circular state of cache_seqlens; causal_conv1d_varlen_states, the states after a packed prefill. Checked against
formulations written here in float64, independent of the reference: the state and the new tokens concatenated and
convolved (a shifting state), and position-by-position slot arithmetic (a circular one); and against
causal_conv1d_fn on the whole sequence."""

import pytest
import torch
from utils import assert_close_dtype, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_varlen_states_ref

BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("causal_conv1d_update", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::causal_conv1d_update ({_ext.load_error or 'built without it'})",
)


def _device(backend: str) -> str:
    if backend == "cpu" and not _ext.has_kernel("causal_conv1d_update", "CPU"):
        pytest.skip("no C++ CPU kernel for causal_conv1d_update")
    return "cuda" if backend == "cuda" else "cpu"


def _weights(dim, width, dtype, device, bias=True):
    w = (torch.randn(dim, width, device=device) / width**0.5).to(dtype)
    return w, (torch.randn(dim, device=device).to(dtype) if bias else None)


def _shifting_expected(x, state, w, bias, silu):
    """The state then the new tokens as one float64 sequence, the tokens rounded to the state's dtype (as a step
    stores them); each output convolves the last width - 1 entries before its token and the token unrounded. The new
    state is the sequence's last state_len entries."""
    stored = torch.cat([state.double(), x.to(state.dtype).double()], dim=-1)  # (batch, dim, state_len + seqlen)
    width, first = w.shape[1], state.shape[-1]
    outs = []
    for t in range(x.shape[-1]):
        window = torch.cat([stored[..., first + t - width + 1 : first + t], x[..., t : t + 1].double()], -1)
        outs.append((window * w.double()).sum(-1))
    out = torch.stack(outs, -1)
    if bias is not None:
        out = out + bias.double()[:, None]
    return (torch.nn.functional.silu(out) if silu else out), stored[..., -state.shape[-1] :]


def _circular_expected(x, state, w, bias, silu, lens):
    """Token t of row b is position lens[b] + t: it goes to slot (position mod state_len), rounded to the state's
    dtype, and its window reads the slots of the width - 1 positions before it; one position at a time, float64."""
    stored = state.double().clone()
    batch, dim, n = x.shape
    L, width = state.shape[-1], w.shape[1]
    out = torch.empty(batch, dim, n, dtype=torch.float64)
    for b in range(batch):
        for t in range(n):
            pos = int(lens[b]) + t
            window = [stored[b, :, (pos - k) % L] for k in range(width - 1, 0, -1)] + [x[b, :, t].double()]
            out[b, :, t] = (torch.stack(window, -1) * w.double()).sum(-1)
            stored[b, :, pos % L] = x[b, :, t].to(state.dtype).double()
    if bias is not None:
        out = out + bias.double()[:, None]
    return (torch.nn.functional.silu(out) if silu else out), stored


def _check(out, state, want_out, want_state, dtype, state_dtype):
    assert out.dtype == dtype
    assert_close_dtype(out, want_out, dtype)
    # The state holds inputs, rounded to its dtype only.
    torch.testing.assert_close(state.double(), want_state.to(state_dtype).double(), rtol=0, atol=0)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", [-1, 0, 3, 40])  # state_len = width + extra
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shifting_state_of_any_length(backend, width, extra, dtype, state_dtype):
    device = _device(backend)
    batch, dim, n = 2, 37, 5
    x = torch.randn(batch, dim, n, device=device).to(dtype)
    state = torch.randn(batch, dim, width + extra, device=device).to(state_dtype)
    w, bias = _weights(dim, width, dtype, device, bias=width != 3)
    want_out, want_state = _shifting_expected(x.cpu(), state.cpu(), w.cpu(), None if bias is None else bias.cpu(),
                                              width != 2)  # fmt: skip
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, "silu" if width != 2 else None)
        one = llmkernels.causal_conv1d_update(x[:, :, 0], state.clone(), w, bias, None)
    _check(out.cpu(), state.cpu(), want_out, want_state, dtype, state_dtype)
    assert one.shape == (batch, dim)


@pytest.mark.parametrize("state_len", [3, 4, 7])  # >= width - 1 for every width
@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_circular_state(backend, width, state_dtype, lens_dtype, state_len):
    device = _device(backend)
    batch, dim, n = 5, 19, 6  # n past state_len: the slots wrap within the call
    x = torch.randn(batch, dim, n, device=device)
    state = torch.randn(batch, dim, state_len, device=device).to(state_dtype)
    lens = torch.tensor([0, 1, state_len - 1, 2 * state_len + 1, -2], dtype=lens_dtype, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    want_out, want_state = _circular_expected(x.cpu(), state.cpu(), w.cpu(), bias.cpu(), True, lens.cpu())
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, "silu", cache_seqlens=lens)
    _check(out.cpu(), state.cpu(), want_out, want_state, torch.float32, state_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_circular_decode_equals_the_whole_sequence(backend):
    """Prefill nothing, then decode a sequence token by token into a circular state (cache_seqlens = t): the outputs
    are causal_conv1d_fn's on the whole sequence, for rows that started at different positions too."""
    device = _device(backend)
    batch, dim, seqlen, width, state_len = 3, 24, 23, 4, 5
    x = torch.randn(batch, dim, seqlen, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    state = torch.zeros(batch, dim, state_len, device=device)
    with llmkernels.use_backend(backend):
        steps = [
            llmkernels.causal_conv1d_update(x[:, :, t], state, w, bias, "silu",
                                            cache_seqlens=torch.full((batch,), t, dtype=torch.int32, device=device))
            for t in range(seqlen)
        ]  # fmt: skip
    want = causal_conv1d_ref(x.double(), w.double(), bias.double(), activation="silu")
    assert_close_dtype(torch.stack(steps, -1).cpu(), want.cpu(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_circular_state_in_a_pool(backend):
    """cache_seqlens with conv_state_indices: the lengths follow x's rows, the indices pick the pool's; a pad slot's
    row is left out (its output 0, no state changes)."""
    device = _device(backend)
    dim, width, state_len = 11, 4, 6
    pool = torch.randn(5, dim, state_len, device=device)
    indices = torch.tensor([3, -1, 0], dtype=torch.int32, device=device)
    lens = torch.tensor([9, 4, 2], dtype=torch.int32, device=device)
    x = torch.randn(3, dim, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    live = [0, 2]
    want_out, want_rows = _circular_expected(x[live, :, None].cpu(), pool[[3, 0]].cpu(), w.cpu(), bias.cpu(), False,
                                             lens[live].cpu())  # fmt: skip
    want_pool = pool.cpu().double().clone()
    want_pool[[3, 0]] = want_rows
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, pool, w, bias, None, cache_seqlens=lens, conv_state_indices=indices)
    assert_close_dtype(out[live].cpu(), want_out[..., 0], torch.float32)
    assert (out[1] == 0).all()
    torch.testing.assert_close(pool.cpu().double(), want_pool, rtol=0, atol=0)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channel_last", "cache_slice"])
@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_state_is_updated_where_it_lies(backend, circular, layout, state_dtype):
    """causal_conv1d's / vLLM's channel-last conv state ((batch, state_len, dim) memory) and a slice of a larger
    cache: the update lands in the caller's tensor."""
    device = _device(backend)
    batch, dim, width, state_len = 3, 10, 4, 5
    if layout == "channel_last":
        state = torch.randn(batch, state_len, dim, device=device).to(state_dtype).transpose(1, 2)
    else:
        state = torch.randn(2 * batch, dim + 2, state_len + 1, device=device).to(state_dtype)
        state = state[::2, 1 : dim + 1, :state_len]
    assert not state.is_contiguous()
    x = torch.randn(batch, dim, 2, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    lens = torch.tensor([0, 7, 3], dtype=torch.int32, device=device) if circular else None
    if circular:
        want_out, want_state = _circular_expected(x.cpu(), state.cpu(), w.cpu(), bias.cpu(), True, lens.cpu())
    else:
        want_out, want_state = _shifting_expected(x.cpu(), state.cpu(), w.cpu(), bias.cpu(), True)
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, "silu", cache_seqlens=lens)
    _check(out.cpu(), state.cpu(), want_out, want_state, torch.float32, state_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_last_pool(backend):
    """A channel-last pool of states stepped through conv_state_indices: only the indexed rows change."""
    device = _device(backend)
    dim, width, state_len = 12, 3, 2
    pool = torch.randn(6, state_len, dim, device=device).transpose(1, 2)
    before = pool.clone()
    indices = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    x = torch.randn(3, dim, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    want_out, want_rows = _shifting_expected(x[[0, 2], :, None].cpu(), before[[4, 1]].cpu(), w.cpu(), bias.cpu(),
                                             False)  # fmt: skip
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, pool, w, bias, conv_state_indices=indices)
    assert_close_dtype(out[[0, 2]].cpu(), want_out[..., 0], torch.float32)
    assert (out[1] == 0).all()
    want_pool = before.cpu().double()
    want_pool[[4, 1]] = want_rows
    torch.testing.assert_close(pool.cpu().double(), want_pool, rtol=0, atol=0)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_several_tokens_in_a_pool_with_a_pad_slot(backend, circular):
    """A (batch, dim, seqlen) x against a pool: the pad slot's row is 0 for every token, the other rows step."""
    device = _device(backend)
    dim, width, state_len, n = 9, 4, 5, 4
    pool = torch.randn(4, dim, state_len, device=device)
    before = pool.clone()
    indices = torch.tensor([2, -1, 0], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 8, 2**63 - 2], dtype=torch.int64, device=device) if circular else None
    x = torch.randn(3, dim, n, device=device)
    w, bias = _weights(dim, width, torch.float32, device)
    live = [0, 2]
    if circular:
        want_out, want_rows = _circular_expected(x[live].cpu(), before[[2, 0]].cpu(), w.cpu(), bias.cpu(), True,
                                                 [3, 2**63 - 2])  # fmt: skip
    else:
        want_out, want_rows = _shifting_expected(x[live].cpu(), before[[2, 0]].cpu(), w.cpu(), bias.cpu(), True)
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, pool, w, bias, "silu", cache_seqlens=lens, conv_state_indices=indices)
    assert_close_dtype(out[live].cpu(), want_out, torch.float32)
    assert (out[1] == 0).all()
    want_pool = before.cpu().double()
    want_pool[[2, 0]] = want_rows
    torch.testing.assert_close(pool.cpu().double(), want_pool, rtol=0, atol=0)


@needs_ext
def test_strided_state_compiles_with_dynamic_shapes():
    x = torch.randn(2, 8)
    w, bias = _weights(8, 4, torch.float32, "cpu")
    state = torch.randn(2, 3, 8).transpose(1, 2)
    want_out, want_state = _shifting_expected(x[..., None], state, w, bias, True)
    fn = torch.compile(llmkernels.causal_conv1d_update, fullgraph=True, dynamic=True, backend="aot_eager")
    out = fn(x, state, w, bias, "silu")
    _check(out[..., None], state, want_out, want_state, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_tokens_past_int32_lengths(backend):
    """Token t of a (batch, dim, seqlen) x is at cache_seqlens + t: counted in int64, so int32 lengths at INT32_MAX
    go on to 2^31 (the slot of 2^31 mod state_len), not wrap to -2^31."""
    device = _device(backend)
    x = torch.randn(1, 4, 3, device=device)
    state = torch.randn(1, 4, 5, device=device)
    w, bias = _weights(4, 3, torch.float32, device)
    lens = torch.tensor([2**31 - 1], dtype=torch.int32, device=device)
    want_out, want_state = _circular_expected(x.cpu(), state.cpu(), w.cpu(), bias.cpu(), False, lens.cpu().long())
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, cache_seqlens=lens)
    _check(out.cpu(), state.cpu(), want_out, want_state, torch.float32, torch.float32)


@needs_ext
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_state(state_dtype):
    """A state longer than the CPU host's per-item buffer (2048 floats): one channel per item, through a heap copy
    when the state is not fp32."""
    x = torch.randn(2, 3, 2)
    state = torch.randn(2, 3, 2100).to(state_dtype)
    w, bias = _weights(3, 4, torch.float32, "cpu")
    want_out, want_state = _shifting_expected(x, state, w, bias, True)
    with llmkernels.use_backend("cpu"):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, "silu")
    _check(out, state, want_out, want_state, torch.float32, state_dtype)
    lens = torch.tensor([5000, 7], dtype=torch.int64)
    want_out, want_state = _circular_expected(x, state, w, bias, False, lens)
    with llmkernels.use_backend("cpu"):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, None, cache_seqlens=lens)
    _check(out, state, want_out, want_state, torch.float32, state_dtype)


def check_states_cpu():
    for width in (2, 3, 4):
        for extra in (-1, 0, 3):
            test_shifting_state_of_any_length("cpu", width, extra, torch.bfloat16, torch.float32)
        test_circular_state("cpu", width, torch.bfloat16, torch.int32, 4)


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_cpu_instruction_sets(isa):
    run_with_cpu_isa(isa, "import test_conv1d_update_states as t\nt.check_states_cpu()\n", "selective_scan")


@needs_ext
def test_opcheck_and_compile():
    x = torch.randn(3, 8)
    w, bias = _weights(8, 4, torch.float32, "cpu")
    lens = torch.tensor([3, 0, 11], dtype=torch.int32)
    for state_len, cache_seqlens in ((3, None), (6, None), (5, lens)):
        state = torch.randn(3, 8, state_len)
        torch.library.opcheck(torch.ops.llmkernels.causal_conv1d_update.default,
                              [x, state, w, bias, True, None, cache_seqlens])  # fmt: skip
    fn = torch.compile(llmkernels.causal_conv1d_update, fullgraph=True, backend="aot_eager")
    state = torch.randn(3, 8, 5)
    want_out, want_state = _circular_expected(x[..., None], state, w, bias, True, lens)
    out = fn(x, state, w, bias, "silu", cache_seqlens=lens)
    _check(out[..., None], state, want_out, want_state, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")])
def test_bad_arguments_are_named(backend):
    _device(backend)
    x = torch.randn(2, 8)
    w, bias = _weights(8, 4, torch.float32, "cpu")
    state = torch.randn(2, 8, 4)
    with llmkernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"conv_state must have shape \(2, 8, state_len\) with state_len >= "):
            llmkernels.causal_conv1d_update(x, torch.randn(2, 8, 2), w, bias)
        with pytest.raises(TypeError, match="cache_seqlens must have dtype in"):
            llmkernels.causal_conv1d_update(x, state, w, bias, cache_seqlens=torch.zeros(2))
        with pytest.raises(ValueError, match="cache_seqlens must have shape"):
            llmkernels.causal_conv1d_update(x, state, w, bias, cache_seqlens=torch.zeros(3, dtype=torch.int32))
        with pytest.raises(ValueError, match="cache_seqlens must have 1 dim"):
            llmkernels.causal_conv1d_update(x, state, w, bias, cache_seqlens=torch.zeros(2, 1, dtype=torch.int32))


@needs_ext
def test_the_cpu_op_names_bad_arguments():
    """The C++ op, called directly (no Python checks first)."""
    op = torch.ops.llmkernels.causal_conv1d_update
    x = torch.randn(2, 8)
    w = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="conv_state must have shape .*state_len >= width - 1 = 3"):
        op(x, torch.randn(2, 8, 2), w, None, False)
    with pytest.raises(RuntimeError, match="cache_seqlens must have dtype int32 or int64"):
        op(x, torch.randn(2, 8, 4), w, None, False, None, torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"cache_seqlens must have shape \(2\)"):
        op(x, torch.randn(2, 8, 4), w, None, False, None, torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lens", [[5, 0, 1, 9, 3], [0], [2, 2]], ids=str)
@pytest.mark.parametrize("state_len", [0, 1, 3, 4, 12])
def test_varlen_states(state_len, lens, dtype):
    """causal_conv1d_varlen_states against the reference's loop, and its states continue each packed sequence: a
    prefill with causal_conv1d_fn (seq_idx) then decode steps give the outputs of the whole sequences."""
    dim = 6
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    x = torch.randn(int(cu[-1]), dim + 3).to(dtype)[:, 1 : dim + 1]  # a slice of a wider projection, as Mamba's
    got = llmkernels.causal_conv1d_varlen_states(x, cu, state_len)
    want = causal_conv1d_varlen_states_ref(x, cu, state_len)
    assert got.shape == (len(lens), dim, state_len) and got.dtype == dtype
    assert torch.equal(got, want)
    assert got.transpose(1, 2).is_contiguous()  # causal_conv1d's layout
    assert torch.equal(llmkernels.causal_conv1d_varlen_states(x, cu.long(), state_len), want)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")])
def test_varlen_states_continue_a_packed_prefill(backend):
    _device(backend)
    dim, width, lens, steps = 8, 4, [7, 1, 0, 12], 3
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    seqs = [torch.randn(dim, n + steps) for n in lens]
    packed = torch.cat([s[:, :n] for s, n in zip(seqs, lens)], dim=1)  # (dim, total)
    w, bias = _weights(dim, width, torch.float32, "cpu")
    state = llmkernels.causal_conv1d_varlen_states(packed.t(), cu, width).contiguous()
    with llmkernels.use_backend(backend):
        outs = llmkernels.causal_conv1d_update(torch.stack([s[:, n:] for s, n in zip(seqs, lens)]), state, w, bias,
                                               "silu")  # fmt: skip
    for b, (s, n) in enumerate(zip(seqs, lens)):
        want = causal_conv1d_ref(s[None].double(), w.double(), bias.double(), activation="silu")[0, :, n:]
        assert_close_dtype(outs[b], want, torch.float32)


def test_varlen_states_bad_arguments_are_named():
    x = torch.randn(5, 3)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    fn = llmkernels.causal_conv1d_varlen_states
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing offsets in \\[0, 5\\]"):
        fn(x, torch.tensor([0, 3, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fn(x, torch.tensor([0, 6], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype in"):
        fn(x, cu.float(), 4)
    with pytest.raises(ValueError, match="cu_seqlens must hold batch \\+ 1 offsets"):
        fn(x, cu[:0], 4)
    with pytest.raises(ValueError, match="state_len must be an int >= 0"):
        fn(x, cu, -1)
    with pytest.raises(ValueError, match="state_len must be an int >= 0"):
        fn(x, cu, 2.0)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        fn(x[None], cu, 4)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fn(x.long(), cu, 4)


def test_varlen_states_compile():
    x = torch.randn(9, 4)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    fn = torch.compile(llmkernels.causal_conv1d_varlen_states, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x, cu, 3), causal_conv1d_varlen_states_ref(x, cu, 3))
