"""opcheck of the C++ and Triton ops, torch.compile, and argument errors of the public API."""

import pytest
import torch

from llmkernels import RollingKVCache, _ext, sliding_window_attn_with_cache, use_backend
from llmkernels.reference.sliding_window import rolling_window_attn_ref
from tests.utils import poison_

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("rolling_window_attn", "CPU"),
    reason="the loaded build has no CPU rolling_window_attn kernel (extension "
    f"{'loaded' if _ext.loaded else 'not loaded: ' + str(_ext.load_error)})",
)


def op_inputs(dtype=torch.float32, batch=2, chunk=5, window=4, nheads=4, nheads_k=2, head_dim=16):
    q = torch.randn(batch, chunk, nheads, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, chunk, nheads_k, head_dim, dtype=dtype) for _ in range(2))
    k_ring, v_ring = (torch.randn(batch, window, nheads_k, head_dim, dtype=dtype) for _ in range(2))
    seqlens = torch.tensor([0, 7][:batch], dtype=torch.int32)
    return q, k, v, k_ring, v_ring, seqlens


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_rolling_window_attn(dtype):
    torch.library.opcheck(torch.ops.llmkernels.rolling_window_attn.default, (*op_inputs(dtype), 0.25, 0.0))


@needs_ext
def test_opcheck_rolling_cache_append():
    q, k, v, k_ring, v_ring, seqlens = op_inputs(chunk=6)
    torch.library.opcheck(torch.ops.llmkernels.rolling_cache_append.default, (k_ring, v_ring, k, v, seqlens))


@pytest.mark.triton_interp
def test_opcheck_triton_op():
    pytest.importorskip("triton")
    from llmkernels.triton.sliding_window import rolling_window_attn_triton

    args = (*op_inputs(chunk=3), 0.25, 2.0)
    # The CPU interpreter cannot launch on the functional tensors of the aot_dispatch test (it reads raw
    # storages); that check runs on the GPU only (test_opcheck_triton_op_gpu).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.llmkernels.rolling_window_attn_triton.default, args, test_utils=utils)
    torch.testing.assert_close(rolling_window_attn_triton(*args), rolling_window_attn_ref(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.triton_interp
@pytest.mark.parametrize("softcap", [1e5, 1e29])
def test_triton_large_softcap_keeps_the_scores(softcap):
    """A cap far above the scores: tanh(s / cap) cap must stay s (2 sigmoid(2x) - 1 cancels as x -> 0: every score
    was 0 at 1e29, in the interpreter too)."""
    pytest.importorskip("triton")
    from llmkernels.triton.sliding_window import rolling_window_attn_triton

    args = (*op_inputs(chunk=5), 0.25, softcap)
    torch.testing.assert_close(rolling_window_attn_triton(*args), rolling_window_attn_ref(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_opcheck_triton_op_gpu():
    from llmkernels.triton import sliding_window  # noqa: F401  (registers the op)

    args = tuple(t.cuda() for t in op_inputs(torch.bfloat16, chunk=3))
    torch.library.opcheck(torch.ops.llmkernels.rolling_window_attn_triton.default, (*args, 0.25, 0.0))


@pytest.mark.cuda
def test_opcheck_cuda_ops():
    if not _ext.has_kernel("rolling_window_attn", "CUDA"):
        pytest.skip("the loaded build has no CUDA rolling_window_attn kernel")
    q, k, v, k_ring, v_ring, seqlens = (t.cuda() for t in op_inputs(torch.float16, chunk=6))
    args = (q, k, v, k_ring, v_ring, seqlens, 0.25, 0.0)
    torch.library.opcheck(torch.ops.llmkernels.rolling_window_attn.default, args)
    torch.library.opcheck(torch.ops.llmkernels.rolling_cache_append.default, (k_ring, v_ring, k, v, seqlens))


@pytest.mark.cuda
def test_auto_dispatch_on_gpu_sends_long_chunks_to_triton():
    from llmkernels.ops.sliding_window import LONG_CHUNK, rolling_window_attn

    if not _ext.has_kernel("rolling_window_attn", "CUDA"):
        pytest.skip("the loaded build has no CUDA rolling_window_attn kernel")
    for chunk, expected in ((1, "cuda"), (LONG_CHUNK, "triton")):
        args = tuple(t.cuda() for t in op_inputs(torch.bfloat16, chunk=chunk))
        assert rolling_window_attn.choose(*args, 0.25, 0.0) == expected
        with use_backend("cuda"):
            assert rolling_window_attn.choose(*args, 0.25, 0.0) == "cuda"


@needs_ext
def test_compile_fullgraph_smoke():
    # The whole public call compiles in one graph: the backend choice is a dict lookup, the append is a
    # mutating custom op, and the seqlens update an in-place add on a tensor attribute.
    cache = RollingKVCache(2, 4, 2, 16, dtype=torch.float32)
    eager_cache = RollingKVCache(2, 4, 2, 16, dtype=torch.float32)
    fn = torch.compile(sliding_window_attn_with_cache, fullgraph=True, backend="aot_eager")  # cheap: no codegen
    for chunk in (3, 1):
        q, k, v = op_inputs(chunk=chunk)[:3]
        with use_backend("cpu"):
            expected = sliding_window_attn_with_cache(q, k, v, eager_cache)
        torch.testing.assert_close(fn(q, k, v, cache), expected)
    assert cache.seqlens.tolist() == [4, 4]
    torch.testing.assert_close(cache.k, eager_cache.k)


def call(q=None, k=None, v=None, cache=None, **kw):
    base_q, base_k, base_v = op_inputs(batch=2, chunk=3)[:3]
    cache = cache if cache is not None else RollingKVCache(2, 4, 2, 16, dtype=torch.float32)
    return sliding_window_attn_with_cache(
        base_q if q is None else q, base_k if k is None else k, base_v if v is None else v, cache, **kw
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(2, 3, 4)), "q must have 4 dimensions"),
        (dict(q=torch.randn(2, 3, 4, 16, dtype=torch.float64)), "q must have dtype"),
        (dict(k=torch.randn(2, 3, 2, 16, dtype=torch.bfloat16)), "k must have the dtype of q"),
        (dict(v=torch.randn(2, 4, 2, 16)), "v must have shape"),
        (dict(q=torch.randn(2, 3, 3, 16)), "nheads"),
        (dict(q=torch.randn(2, 3, 4, 32)[..., ::2]), "q must be contiguous in its last dimension"),
        (dict(q=torch.randn(2, 0, 4, 16)), "q must hold at least one new token"),
        (dict(cache=RollingKVCache(3, 4, 2, 16, dtype=torch.float32)), "cache has batch_size 3"),
        (dict(cache=RollingKVCache(2, 4, 2, 8, dtype=torch.float32)), "cache has head_dim 8"),
        (dict(cache=RollingKVCache(2, 4, 2, 16, dtype=torch.float16)), "cache.k must have the dtype of q"),
        (dict(cache="not a cache"), "cache must be a llmkernels.RollingKVCache"),
        (dict(softcap=-1.0), "softcap must be finite and >= 0"),
        (dict(softcap=float("inf")), "softcap must be finite and >= 0"),
        (dict(softcap=1e-40), "a number fp32 holds"),  # (0 on the CPU kernels, which flush subnormals: no cap)
        (dict(softmax_scale=float("inf")), "softmax_scale must be a positive, finite"),
        (dict(softmax_scale=0.0), "softmax_scale must be a positive"),
        (dict(softmax_scale=torch.tensor(0.5)), "Python or NumPy number .*, got tensor"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(**kwargs)


def test_cache_constructor_checks():
    with pytest.raises(ValueError, match="window must be a positive int"):
        RollingKVCache(1, 0, 1, 8)
    with pytest.raises(TypeError, match="dtype must be"):
        RollingKVCache(1, 4, 1, 8, dtype=torch.int8)


@needs_ext
def test_cpp_op_checks_name_the_argument():
    q, k, v, k_ring, v_ring, seqlens = op_inputs()
    op = torch.ops.llmkernels.rolling_window_attn
    with pytest.raises(RuntimeError, match="seqlens must have dtype Int"):
        op(q, k, v, k_ring, v_ring, seqlens.long(), 0.25, 0.0)
    with pytest.raises(RuntimeError, match="k_ring must have shape"):
        op(q, k, v, k_ring[:, :, :1].contiguous(), v_ring, seqlens, 0.25, 0.0)
    with pytest.raises(RuntimeError, match="seqlens must be >= 0"):
        op(q, k, v, k_ring, v_ring, -seqlens - 1, 0.25, 0.0)
    with pytest.raises(RuntimeError, match="k must have at least one head"):  # not a division by zero
        no_heads = [t[:, :, :0].contiguous() for t in (k, v, k_ring, v_ring)]
        op(q, *no_heads, seqlens, 0.25, 0.0)
    with pytest.raises(RuntimeError, match="k_ring must be contiguous"):
        strided = torch.randn(2, 2, 4, 16).transpose(1, 2)  # right shape, wrong layout
        torch.ops.llmkernels.rolling_cache_append(strided, v_ring, k, v, seqlens)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_append_writes_exactly_the_expected_slots(device, chunk):
    # Rings poisoned with NaN: the written slots must hold the chunk's last min(S, W) tokens, the rest stay NaN.
    if not _ext.has_kernel("rolling_cache_append", device.upper()):
        pytest.skip(f"the loaded build has no {device} rolling_cache_append kernel")
    window, hk, d = 4, 2, 16
    k, v = (torch.randn(3, chunk, hk, d, dtype=torch.bfloat16, device=device) for _ in range(2))
    seqlens = torch.tensor([0, 2, 9], dtype=torch.int32, device=device)
    k_ring, v_ring = (poison_(torch.empty(3, window, hk, d, dtype=torch.bfloat16, device=device)) for _ in range(2))
    torch.ops.llmkernels.rolling_cache_append(k_ring, v_ring, k, v, seqlens)
    for b, n in enumerate(seqlens.tolist()):
        written = {(n + t) % window: t for t in range(max(0, chunk - window), chunk)}
        for slot in range(window):
            if slot in written:
                assert torch.equal(k_ring[b, slot], k[b, written[slot]])
                assert torch.equal(v_ring[b, slot], v[b, written[slot]])
            else:
                assert torch.isnan(k_ring[b, slot]).all() and torch.isnan(v_ring[b, slot]).all()
