"""Flash attention benchmarks: llmkernels against PyTorch's SDPA backends and FlexAttention.

    python bench/run.py --op attention [--quick]

GPU prefill (flash_attn_fwd, flash_attn_fwd_bwd): TFLOP/s = 4 * batch * seqlen^2 * nheads * headdim, halved
when causal, times 3.5 for forward + backward (the backward is 2.5 forwards); batch * seqlen = 16k tokens,
nheads * headdim = 2048, bf16. Limit: the tensor-core peak. Peers: SDPA with each backend forced (flash,
efficient, cuDNN; a backend that errors is skipped) and compiled FlexAttention.
GPU decode (flash_attn_decode): one query token per row against a cache of `context` tokens, 32 query heads on
8 KV heads of 128; GB/s = bytes of K, V, q and out moved. Limit: measured copy bandwidth. llmkernels-cuda-gqa is
the CUDA path with LLMKERNELS_DECODE_KERNEL=gqa (the GQA-sharing decode kernel instead of the forward kernel);
llmkernels-triton-atomicdq (forward + backward) the Triton backward adding dq in its dK/dV kernel through a TMA
reduce. Both run only with LLMKERNELS_BENCH_SWITCHED=1 (never run on a GPU yet).
CPU (flash_attn_fwd_cpu, flash_attn_fwd_bwd_cpu): forward, and forward + backward through autograd, against
SDPA's CPU kernel, 2 threads, fp32 at head dim 64 and bf16 at 128; GFLOP/s counted as on the GPU (backward = 2.5
forwards). CPU decode (flash_attn_decode_cpu): as the GPU decode, fp32 and bf16, against SDPA with enable_gqa.
Packed batches (flash_attn_varlen_fwd[_bwd][_cpu]): 10 causal sequences of mixed lengths in one
flash_attn_varlen_func call, against SDPA on the batch padded to the longest with a mask, SDPA once per sequence
and (GPU) FlexAttention with a document mask; FLOPs counted per sequence (padding not counted).
ALiBi (flash_attn_alibi_fwd[_bwd][_cpu]): causal attention with BLOOM's slopes, against the same call without
slopes (the bias's cost), SDPA given the bias and the causal mask as one float mask, and (GPU) FlexAttention with
the bias as a score_mod and a causal block mask.
Dropout (flash_attn_dropout_fwd[_bwd][_cpu]): causal attention with dropout_p 0.1 (the mask drawn in the kernels
from a seed and redrawn by the backward), against the same call without dropout (the mask's cost) and SDPA with
dropout_p (on a GPU its flash backend, which draws its mask in the kernel too).
Left-padded decode (flash_attn_decode_leftpad[_cpu]): a decode step of a batch of 8 left-padded to one length, as
generate() makes it: flash_attn_with_kvcache with cache_leftpad (the cache read in place; what the transformers
integration runs), the varlen call on the gathered valid keys (its fallback, and its route before), and SDPA with
the padding as a boolean mask (transformers' sdpa attention). GB/s counts the valid keys' K and V.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmkernels  # noqa: E402
from bench.common import copy_bandwidth_gbps, env_var, measure_ms, on_gpu, peak_tflops, switched_kernels_enabled  # noqa: E402


def attention_flops(
    batch: int, seqlen_q: int, seqlen_k: int, nheads: int, headdim: int, causal: bool, backward: bool = False
) -> float:
    flops = 4.0 * batch * seqlen_q * seqlen_k * nheads * headdim
    if causal:
        flops /= 2
    return flops * 3.5 if backward else flops


def _ours(backend: str, causal: bool) -> Callable:
    def fn(q, k, v):
        with llmkernels.use_backend(backend):
            return llmkernels.flash_attn_func(q, k, v, causal=causal)

    return fn


def _sdpa(backend, causal: bool) -> Callable:
    """SDPA on (batch, seqlen, heads, headdim) tensors with one kernel forced (or the default when None)."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

    return fn


def _flex(causal: bool, seqlen: int, device: str) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seqlen, seqlen, device=device) if causal else None

    def fn(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return compiled(qt, kt, vt, block_mask=mask).transpose(1, 2)

    return fn


def _time(impl: str, fn: Callable, args: tuple, backward: bool, **measure) -> float | None:
    """Median ms of fn(*args) (and its backward), or None with a note when the impl cannot run this case."""
    if backward:
        leaves = tuple(a.detach().requires_grad_() for a in args)
        dout = torch.randn_like(args[0])

        def call():
            torch.autograd.grad(fn(*leaves), leaves, dout)
    else:

        def call():
            with torch.no_grad():
                fn(*args)

    try:
        return measure_ms(call, **measure)
    except Exception as exc:  # a peer that does not support this case (or this GPU) is skipped, not fatal
        print(f"  skip {impl}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        return None


def _prefill_impls(causal: bool, seqlen: int) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend

    return {
        "llmkernels-cuda": _ours("cuda", causal),
        "llmkernels-triton": _ours("triton", causal),
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION, causal),
        "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION, causal),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, causal),
        "flex": _flex(causal, seqlen, "cuda"),
    }


def _time_atomic_dq(impl: str, fn: Callable, args: tuple, headdim: int) -> float | None:
    """Forward + backward with the Triton backward adding dq in its dK/dV kernel (TMA reduce), which only a tuned
    config selects: the override has to cover the backward call, so it wraps the whole timing."""
    from llmkernels.triton import flash_attn as triton_fa

    cfg = (32, 64, 8, 2, 2) if headdim > 128 else (64, 64, 8, 2, 2)
    with triton_fa.config_override(bwd_dkdv=cfg):
        return _time(impl, fn, args, backward=True)


def _row(op: str, case: str, impl: str, ms: float, metric: str, value: float, limit: float | None) -> dict:
    return {"op": op, "case": case, "impl": impl, "time_ms": ms, "metric": metric, "value": value, "limit": limit}


def bench_gpu_prefill(quick: bool) -> list[dict]:
    rows = []
    tokens, width = 16384, 2048
    # quick = the target cases: hd 128 at 1k and 8k (>= SDPA FLASH from 1k; 540 TFLOP/s at 8k), fwd and
    # fwd+bwd, so a time-boxed GPU run still measures what the targets are judged on.
    seqlens = (1024, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    headdims = (128,) if quick else (64, 128, 256)
    modes = (False, True)
    for backward in modes:
        op = "flash_attn_fwd_bwd" if backward else "flash_attn_fwd"
        for headdim in headdims:
            for seqlen in seqlens:
                for causal in (False, True):
                    batch, nheads = tokens // seqlen, width // headdim
                    q, k, v = (
                        torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=torch.bfloat16)
                        for _ in range(3)
                    )
                    case = f"b={batch} seqlen={seqlen} h={nheads} d={headdim}" + (" causal" if causal else "")
                    flops = attention_flops(batch, seqlen, seqlen, nheads, headdim, causal, backward)
                    for impl, fn in _prefill_impls(causal, seqlen).items():
                        ms = _time(impl, fn, (q, k, v), backward)
                        if ms is not None:
                            rows.append(_row(op, case, impl, ms, "TFLOP/s", flops / (ms * 1e-3) / 1e12, peak_tflops()))
                    if backward and switched_kernels_enabled():  # never run on a GPU yet: last, as the other switches
                        impl = "llmkernels-triton-atomicdq"
                        ms = _time_atomic_dq(impl, _ours("triton", causal), (q, k, v), headdim)
                        if ms is not None:
                            rows.append(_row(op, case, impl, ms, "TFLOP/s", flops / (ms * 1e-3) / 1e12, peak_tflops()))
                    del q, k, v
    return rows


def _decode_impls(q, k_cache, v_cache, lens) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ours(backend):
        def fn():
            with llmkernels.use_backend(backend):
                llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)

        return fn

    def sdpa(backend):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))

        def fn():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        return fn

    impls = {
        "llmkernels-cuda": ours("cuda"),
        "llmkernels-triton": ours("triton"),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    if switched_kernels_enabled():  # never run on a GPU yet: last, so a fault costs no other row of the case
        impls["llmkernels-cuda-gqa"] = ours("cuda")
    return impls


def bench_gpu_decode(quick: bool) -> list[dict]:
    rows = []
    nheads, nheads_k, headdim, dtype = 32, 8, 128, torch.bfloat16
    limit = copy_bandwidth_gbps()
    # quick: batch x context >= 256k tokens (the 80%-of-copy-bandwidth target) and the batch-1 long context
    batches = (1, 64) if quick else (1, 16, 64)
    contexts = (4096, 65536) if quick else (1024, 4096, 16384, 65536)
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * nheads_k * headdim * dtype.itemsize
            if kv_bytes > 0.6 * torch.cuda.mem_get_info()[0]:
                print(f"  skip decode b={batch} context={context}: {kv_bytes / 2**30:.1f} GiB of KV cache", flush=True)
                continue
            q = torch.randn(batch, 1, nheads, headdim, device="cuda", dtype=dtype)
            k_cache = torch.randn(batch, context, nheads_k, headdim, device="cuda", dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            moved = kv_bytes + 2 * q.nbytes
            case = f"b={batch} seqlen={context} h={nheads}/{nheads_k} d={headdim}"

            impls = _decode_impls(q, k_cache, v_cache, lens)
            for impl, fn in impls.items():
                with env_var("LLMKERNELS_DECODE_KERNEL", "gqa" if impl == "llmkernels-cuda-gqa" else None):
                    ms = _time(impl, fn, (), False)
                if ms is not None:
                    rows.append(_row("flash_attn_decode", case, impl, ms, "GB/s", moved / (ms * 1e-3) / 1e9, limit))
            del q, k_cache, v_cache
    return rows


def bench_cpu(quick: bool) -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cases = [(512, False), (1024, True)] if quick else [(s, c) for s in (512, 1024, 2048) for c in (False, True)]
        # bf16 at head dim 128: the products on vdpbf16ps where the CPU has AVX512-BF16
        cases_bf16 = [(1024, True)] if quick else [(s, c) for s in (1024, 2048) for c in (False, True)]
        nheads = 8
        for backward in (False, True):
            op = "flash_attn_fwd_bwd_cpu" if backward else "flash_attn_fwd_cpu"
            for dtype, headdim, dcases in ((torch.float32, 64, cases), (torch.bfloat16, 128, cases_bf16)):
                for seqlen, causal in dcases:
                    q, k, v = (torch.randn(1, seqlen, nheads, headdim, dtype=dtype) for _ in range(3))
                    name = "fp32" if dtype == torch.float32 else "bf16"
                    case = f"b=1 seqlen={seqlen} h={nheads} d={headdim} {name} 2 threads{' causal' if causal else ''}"
                    flops = attention_flops(1, seqlen, seqlen, nheads, headdim, causal, backward)
                    for impl, fn in (("llmkernels-cpu", _ours("cpu", causal)), ("sdpa-cpu", _sdpa(None, causal))):
                        ms = _time(impl, fn, (q, k, v), backward, warmup=2, rep=5, min_time_s=0.1)
                        if ms is not None:
                            rows.append(_row(op, case, impl, ms, "GFLOP/s", flops / (ms * 1e-3) / 1e9, None))
        rows += bench_cpu_decode(quick)
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_cpu_decode(quick: bool) -> list[dict]:
    """flash_attn_with_kvcache against SDPA (enable_gqa) on CPU: one token, 32 query heads on 8 KV heads of 128.
    The same cache every call, as on the GPU: caches under the L3 size (32 MB here) partly stay in it."""
    rows = []
    nheads, nheads_k, headdim = 32, 8, 128
    limit = copy_bandwidth_gbps()
    for dtype in (torch.float32, torch.bfloat16):
        for batch, context in [(1, 4096)] if quick else [(1, 1024), (1, 4096), (1, 16384), (8, 4096)]:
            q = torch.randn(batch, 1, nheads, headdim, dtype=dtype)
            k_cache, v_cache = (torch.randn(batch, context, nheads_k, headdim, dtype=dtype) for _ in range(2))
            lens = torch.full((batch,), context, dtype=torch.int32)
            moved = 2 * k_cache.nbytes + 2 * q.nbytes
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
            name = "fp32" if dtype == torch.float32 else "bf16"
            case = f"b={batch} seqlen={context} h={nheads}/{nheads_k} d={headdim} {name} 2 threads"
            impls = {
                "llmkernels-cpu": (llmkernels.flash_attn_with_kvcache, (q, k_cache, v_cache), {"cache_seqlens": lens}),
                "sdpa-cpu": (F.scaled_dot_product_attention, (qt, kt, vt), {"enable_gqa": True}),
            }
            for impl, (fn, args, kwargs) in impls.items():
                ms = _time(impl, functools.partial(fn, **kwargs), args, False, warmup=2, rep=10, min_time_s=0.1)
                if ms is not None:
                    rows.append(_row("flash_attn_decode_cpu", case, impl, ms, "GB/s", moved / (ms * 1e-3) / 1e9, limit))
    return rows


# A packed batch of mixed lengths, as padding-free training or a serving prefill hands flash_attn_varlen_func:
# 3930 tokens in 10 sequences, the longest 1024 (x4 on a GPU).
_VARLEN_LENGTHS = (1024, 37, 512, 300, 1, 700, 129, 64, 913, 250)


def bench_varlen(quick: bool, device: str, dtype: torch.dtype, nheads: int, headdim: int, scale: int = 1) -> list[dict]:
    rows = []
    lengths = tuple(n * scale for n in _VARLEN_LENGTHS)
    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, nheads, headdim, dtype=dtype, device=device) for _ in range(3))
    batch = len(lengths)
    padded = [torch.zeros(batch, longest, nheads, headdim, dtype=dtype, device=device) for _ in range(3)]
    for b, n in enumerate(lengths):
        for t, src in zip(padded, (q, k, v)):
            t[b, :n] = src[cu[b] : cu[b] + n]
    keys = torch.arange(longest, device=device)
    valid = keys[None, :] < torch.tensor(lengths, device=device)[:, None]  # (batch, longest)
    mask = (keys[None, :, None] >= keys[None, None, :]) & valid[:, None, :]  # (batch, q, k)
    mask = mask[:, None]  # broadcast over heads
    backend = "cpu" if device == "cpu" else "triton"

    def ours(q, k, v):
        with llmkernels.use_backend(backend):
            return llmkernels.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)

    def sdpa_padded(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)

    bounds = [(int(cu[b]), int(cu[b + 1])) for b in range(batch)]

    def sdpa_per_sequence(q, k, v):
        outs = []
        for lo, hi in bounds:
            qt, kt, vt = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)

    impls = {
        f"llmkernels-{backend}": (ours, (q, k, v)),
        "sdpa-padded-mask": (sdpa_padded, tuple(padded)),
        "sdpa-per-sequence": (sdpa_per_sequence, (q, k, v)),
    }
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(lengths, device=device))
        block_mask = create_block_mask(
            lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, total, total, device=device
        )
        compiled = torch.compile(flex_attention)

        def flex(q, k, v):
            qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
            return compiled(qt, kt, vt, block_mask=block_mask)[0].transpose(0, 1)

        impls["flex-document-mask"] = (flex, (q, k, v))
    name = str(dtype).replace("torch.", "")
    case = f"{batch} seqs {total} tokens (longest {longest}) h={nheads} d={headdim} {name} causal"
    if device == "cpu":
        case += " 2 threads"
    flops_fwd = sum(attention_flops(1, n, n, nheads, headdim, True) for n in lengths)
    measure = dict(warmup=2, rep=5, min_time_s=0.1) if device == "cpu" else {}
    for backward in (False, True) if not quick or device == "cuda" else (False,):
        op = "flash_attn_varlen_fwd_bwd" if backward else "flash_attn_varlen_fwd"
        op += "_cpu" if device == "cpu" else ""
        flops = flops_fwd * (3.5 if backward else 1.0)
        limit = None if device == "cpu" else peak_tflops(dtype)
        for impl, (fn, args) in impls.items():
            ms = _time(impl, fn, args, backward, **measure)
            if ms is not None:
                metric = "GFLOP/s" if device == "cpu" else "TFLOP/s"
                value = flops / (ms * 1e-3) / (1e9 if device == "cpu" else 1e12)
                rows.append(_row(op, case, impl, ms, metric, value, limit))
    return rows


def bench_alibi(quick: bool, device: str) -> list[dict]:
    """Causal prefill with ALiBi slopes: the bias inside the kernel against a float mask (SDPA) or a score_mod
    (FlexAttention), and against the same kernel without slopes."""
    from llmkernels.nn.attention import alibi_slopes

    cpu = device == "cpu"
    batch, seqlen, nheads, headdim = (1, 1024, 8, 64) if cpu else (4, 2048, 16, 128)
    dtype = torch.float32 if cpu else torch.bfloat16
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=device, dtype=dtype) for _ in range(3))
    slopes = alibi_slopes(nheads).to(device)
    pos = torch.arange(seqlen, device=device)
    distance = (pos[:, None] - pos[None, :]).to(torch.float32)
    bias = (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf")).to(dtype)  # (h, s, s)
    case = f"b={batch} seqlen={seqlen} h={nheads} d={headdim} causal {str(dtype)[6:]}"
    impls = {
        "llmkernels": lambda q, k, v: llmkernels.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes),
        "llmkernels-no-alibi": lambda q, k, v: llmkernels.flash_attn_func(q, k, v, causal=True),
        "sdpa-float-mask": lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
        ).transpose(1, 2),
    }
    if not cpu:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, seqlen, seqlen, device=device)

        def score_mod(score, b, h, i, j):
            return score - slopes[h] * (i - j)

        impls["flex-score-mod"] = lambda q, k, v: compiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=mask
        ).transpose(1, 2)
    return _causal_prefill_rows("flash_attn_alibi", case, impls, q, k, v, quick)


def _causal_prefill_rows(op_stem: str, case: str, impls: dict, q, k, v, quick: bool) -> list[dict]:
    """Rows op_stem_fwd[_bwd][_cpu] of causal self-attention over q, k, v (batch, seqlen, nheads, headdim): each impl
    timed forward and forward + backward (forward only for --quick on a CPU)."""
    cpu = q.device.type == "cpu"
    batch, seqlen, nheads, headdim = q.shape
    rows, measure = [], dict(warmup=2, rep=5, min_time_s=0.1) if cpu else {}
    for backward in (False, True) if not (quick and cpu) else (False,):
        op = op_stem + ("_fwd_bwd" if backward else "_fwd") + ("_cpu" if cpu else "")
        flops = attention_flops(batch, seqlen, seqlen, nheads, headdim, True, backward)
        for impl, fn in impls.items():
            ms = _time(impl, fn, (q, k, v), backward, **measure)
            if ms is not None:
                value = flops / (ms * 1e-3) / (1e9 if cpu else 1e12)
                rows.append(_row(op, case, impl, ms, "GFLOP/s" if cpu else "TFLOP/s", value,
                                 None if cpu else peak_tflops()))  # fmt: skip
    return rows


def bench_dropout(quick: bool, device: str) -> list[dict]:
    """Causal prefill with attention dropout, forward and forward + backward."""
    cpu = device == "cpu"
    batch, seqlen, nheads, headdim = (1, 1024, 8, 64) if cpu else (4, 2048, 16, 128)
    dtype = torch.float32 if cpu else torch.bfloat16
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, device=device, dtype=dtype) for _ in range(3))
    case = f"b={batch} seqlen={seqlen} h={nheads} d={headdim} causal p=0.1 {str(dtype)[6:]}"
    impls = {
        "llmkernels": lambda q, k, v: llmkernels.flash_attn_func(q, k, v, 0.1, causal=True),
        "llmkernels-no-dropout": lambda q, k, v: llmkernels.flash_attn_func(q, k, v, causal=True),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.1, is_causal=True
        ).transpose(1, 2),
    }
    return _causal_prefill_rows("flash_attn_dropout", case, impls, q, k, v, quick)


def bench_leftpad_decode(quick: bool, device: str) -> list[dict]:
    cpu = device == "cpu"
    contexts = (2048,) if cpu else ((4096,) if quick else (4096, 16384))
    rows = []
    for dtype in (torch.float32, torch.bfloat16) if cpu else (torch.bfloat16,):
        for context in contexts:
            rows += _leftpad_decode_case(device, dtype, context)
    return rows


def _leftpad_decode_case(device: str, dtype: torch.dtype, context: int) -> list[dict]:
    from llmkernels.integrations.transformers import _padded_attention

    cpu = device == "cpu"
    batch, nheads, nheads_k, headdim = 8, 32, 8, 128
    q = torch.randn(batch, 1, nheads, headdim, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, context, nheads_k, headdim, device=device, dtype=dtype) for _ in range(2))
    pads = torch.arange(batch, device=device, dtype=torch.int32) * (context // (2 * batch))
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    key_mask = torch.arange(context, device=device)[None, :] >= pads[:, None]
    moved = 2 * int(key_mask.sum()) * nheads_k * headdim * dtype.itemsize  # the valid keys' K and V
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
    varlen_args = dict(softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0)
    impls = {
        "llmkernels-leftpad": lambda: llmkernels.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pads, causal=True),
        "llmkernels-varlen-gather": lambda: _padded_attention(q, k_cache, v_cache, key_mask, varlen_args),
        "sdpa-bool-mask": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=key_mask[:, None, None, :],
                                                                 enable_gqa=True),
    }  # fmt: skip
    case = f"b={batch} seqlen={context} pads 0..{int(pads[-1])} h={nheads}/{nheads_k} d={headdim} {str(dtype)[6:]}"
    case += " 2 threads" if cpu else ""
    op = "flash_attn_decode_leftpad" + ("_cpu" if cpu else "")
    rows, limit = [], copy_bandwidth_gbps()
    for impl, fn in impls.items():
        ms = _time(impl, fn, (), False, **(dict(warmup=2, rep=10, min_time_s=0.1) if cpu else {}))
        if ms is not None:
            rows.append(_row(op, case, impl, ms, "GB/s", moved / (ms * 1e-3) / 1e9, limit))
    return rows


def run(quick: bool = False) -> list[dict]:
    if on_gpu():  # the issues' target cases (prefill, decode) first: a time budget cuts the rest
        prefill = bench_gpu_prefill(quick)
        decode = bench_gpu_decode(quick)
        varlen = bench_varlen(quick, "cuda", torch.bfloat16, 16, 128, scale=4)
        return (prefill + decode + varlen + bench_alibi(quick, "cuda") + bench_dropout(quick, "cuda")
                + bench_leftpad_decode(quick, "cuda"))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        varlen = bench_varlen(quick, "cpu", torch.float32, 8, 64)
        alibi = bench_alibi(quick, "cpu")
        dropout = bench_dropout(quick, "cpu")
        leftpad = bench_leftpad_decode(quick, "cpu")
    finally:
        torch.set_num_threads(threads)
    return bench_cpu(quick) + varlen + alibi + dropout + leftpad


if __name__ == "__main__":
    from bench.common import add_speedups, format_table

    print(format_table(add_speedups(run(quick="--quick" in sys.argv))))
