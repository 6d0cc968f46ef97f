"""Sliding-window attention benchmarks: windowed prefill, rolling-cache decode, and a small CPU case.

    python bench/run.py --op sliding_window [--quick]

GPU (bf16, Mistral 7B heads: 32 query heads, 8 KV heads of 128, W = 4096):
- prefill, seqlen 4k..32k, no cache: flash_attn_func(causal=True, window_size=(W - 1, 0)) against full causal
  attention at the same seqlen (the ideal time ratio window/causal is (seqlen W - W^2 / 2) / (seqlen^2 / 2))
  and against SDPA given an explicit window mask.
- decode, one token against a context of 8 W: the rolling cache (W slots) against a full KV cache of 8 W
  slots with the window (flash_attn_with_kvcache) and SDPA over the full cache with a window mask.
  GB/s counts the K/V bytes the window needs (what a perfect kernel reads), against copy_bandwidth_gbps().
CPU (fp32, small): decode and a chunked-prefill step through the cache, C++ kernel against the reference.
Colleagues' functions are called inside try/except, so the benchmark runs whatever state they are in.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmkernels  # noqa: E402
from bench.common import copy_bandwidth_gbps, measure_ms, on_gpu, peak_tflops  # noqa: E402
from llmkernels.reference.attention import visible_mask  # noqa: E402

OP = "sliding_window"
NHEADS, NHEADS_K, HEAD_DIM, WINDOW = 32, 8, 128, 4096


def _row(case, impl, ms, metric=None, value=None, limit=None, peer=None, **extra):
    return {"op": OP, "case": case, "impl": impl, "time_ms": ms, "metric": metric, "value": value, "limit": limit,
            "peer": peer, **extra}


def _try(rows, case, impl, fn, to_value=None, **kw):
    """Time fn and add a row; a colleague's stub or an unsupported input just leaves a note."""
    try:
        ms = measure_ms(fn)
    except Exception as exc:  # noqa: BLE001  (NotImplementedError, BackendError, OOM: all reported the same)
        print(f"  [{case}] {impl}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    metric, value = to_value(ms) if to_value else (None, None)
    rows.append(_row(case, impl, ms, metric, value, **kw))
    return ms


def gpu_prefill(quick: bool) -> list[dict]:
    rows: list[dict] = []
    for seqlen in (16384,) if quick else (4096, 8192, 16384, 32768):  # quick: the target case
        rows += _prefill_case(seqlen)
        torch.cuda.empty_cache()
    return rows


def _prefill_case(seqlen: int) -> list[dict]:
    rows: list[dict] = []
    q = torch.randn(1, seqlen, NHEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seqlen, NHEADS_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    visible_pairs = seqlen * WINDOW - WINDOW * (WINDOW - 1) / 2 if seqlen >= WINDOW else seqlen * (seqlen + 1) / 2
    ideal = visible_pairs / (seqlen * (seqlen + 1) / 2)
    case = f"prefill s={seqlen} W={WINDOW} h={NHEADS}/{NHEADS_K} d={HEAD_DIM} (ideal window/causal {ideal:.2f})"
    flops = 4 * NHEADS * HEAD_DIM * visible_pairs
    tflops = lambda ms, f=flops: ("TFLOP/s", f / (ms * 1e-3) / 1e12)  # noqa: E731
    limit = peak_tflops()
    _try(rows, case, "llmkernels-flash-window",
         lambda: llmkernels.flash_attn_func(q, k, v, causal=True, window_size=(WINDOW - 1, 0)), tflops,
         limit=limit, peer="full-causal (flash_attn_func)", ideal_ratio=ideal)
    causal_flops = 4 * NHEADS * HEAD_DIM * seqlen * (seqlen + 1) / 2
    _try(rows, case, "full-causal (flash_attn_func)", lambda: llmkernels.flash_attn_func(q, k, v, causal=True),
         lambda ms: ("TFLOP/s", causal_flops / (ms * 1e-3) / 1e12), limit=limit)
    if seqlen <= 16384:  # the explicit (seqlen, seqlen) mask
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        mask = visible_mask(seqlen, seqlen, WINDOW - 1, 0, "cuda")
        _try(rows, case, "sdpa-window-mask",
             lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True), tflops,
             limit=limit)
    return rows


def gpu_decode(quick: bool) -> list[dict]:
    rows: list[dict] = []
    context = 8 * WINDOW
    gbps_limit = copy_bandwidth_gbps()
    for batch in (1, 64) if quick else (1, 4, 16, 64):  # the target is at batch 64
        rows += _decode_case(batch, context, gbps_limit)
        torch.cuda.empty_cache()
    return rows


def _decode_case(batch: int, context: int, gbps_limit: float) -> list[dict]:
    rows: list[dict] = []
    dt = torch.bfloat16
    q = torch.randn(batch, 1, NHEADS, HEAD_DIM, device="cuda", dtype=dt)
    k1, v1 = (torch.randn(batch, 1, NHEADS_K, HEAD_DIM, device="cuda", dtype=dt) for _ in range(2))
    cache = llmkernels.RollingKVCache(batch, WINDOW, NHEADS_K, HEAD_DIM, dtype=dt, device="cuda")
    cache.k.normal_(), cache.v.normal_()
    window_bytes = 2 * batch * WINDOW * NHEADS_K * HEAD_DIM * cache.k.element_size()
    case = (f"decode b={batch} context={context} W={WINDOW} h={NHEADS}/{NHEADS_K} d={HEAD_DIM} "
            f"(rolling cache {cache.nbytes / 2**20:.0f} MiB, full cache {8 * cache.nbytes / 2**20:.0f} MiB)")
    gbps = lambda ms, n=window_bytes: ("GB/s", n / (ms * 1e-3) / 1e9)  # noqa: E731

    def rolling(backend):
        def fn():
            cache.seqlens.fill_(context)  # stay at the same context length every call
            with llmkernels.use_backend(backend):
                return llmkernels.sliding_window_attn_with_cache(q, k1, v1, cache)
        return fn

    for backend in ("cuda", "triton"):
        _try(rows, case, f"llmkernels-{backend}", rolling(backend), gbps, limit=gbps_limit,
             peer="flash_attn_with_kvcache-full", cache_mib=cache.nbytes / 2**20)
    full_k = torch.randn(batch, context + 1, NHEADS_K, HEAD_DIM, device="cuda", dtype=dt)
    full_v = torch.randn_like(full_k)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    _try(rows, case, "flash_attn_with_kvcache-full",
         lambda: llmkernels.flash_attn_with_kvcache(q, full_k, full_v, k1, v1, cache_seqlens=lens, causal=True,
                                                    window_size=(WINDOW - 1, 0)), gbps, limit=gbps_limit)
    qt, kt, vt = q.transpose(1, 2), full_k.transpose(1, 2), full_v.transpose(1, 2)
    mask = visible_mask(1, context + 1, WINDOW - 1, 0, "cuda")
    _try(rows, case, "sdpa-full-cache-window-mask",
         lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True), gbps,
         limit=gbps_limit)
    for r in rows:  # one new token per batch row per call
        r["tokens_per_s"] = batch / (r["time_ms"] * 1e-3)
    return rows


def cpu_cases(quick: bool) -> list[dict]:
    rows: list[dict] = []
    window, h, hk, d = (256, 8, 2, 64) if quick else (1024, 8, 2, 64)
    for chunk in (1, 64):
        rows += _cpu_case(window, h, hk, d, chunk)
    if not quick:  # Mistral 7B's attention shape: one token (decode), and a 512-token chunk of a long prompt
        for dtype in (torch.float32, torch.bfloat16):
            rows += _cpu_case(4096, 32, 8, 128, 1, dtype)
            rows += _cpu_case(4096, 32, 8, 128, 512, dtype)
    return rows


def _cpu_case(window: int, h: int, hk: int, d: int, chunk: int, dtype=torch.float32) -> list[dict]:
    rows: list[dict] = []
    cache = llmkernels.RollingKVCache(1, window, hk, d, dtype=dtype)
    cache.k.normal_(), cache.v.normal_()
    q = torch.randn(1, chunk, h, d, dtype=dtype)
    k, v = (torch.randn(1, chunk, hk, d, dtype=dtype) for _ in range(2))
    kind = "decode" if chunk == 1 else f"chunk {chunk}"
    case = f"cpu {kind} context={2 * window} W={window} h={h}/{hk} d={d} {'fp32' if dtype == torch.float32 else 'bf16'}"

    def step(backend):
        def fn():
            cache.seqlens.fill_(2 * window)
            with llmkernels.use_backend(backend):
                return llmkernels.sliding_window_attn_with_cache(q, k, v, cache)
        return fn

    if chunk == 1:  # decode: the window's K/V bytes per call
        metric = lambda ms: ("GB/s", 2 * window * hk * d * dtype.itemsize / (ms * 1e-3) / 1e9)  # noqa: E731
    else:  # chunked prefill: 2 matmuls over W keys per query and head
        metric = lambda ms: ("GFLOP/s", 4 * chunk * window * h * d / (ms * 1e-3) / 1e9)  # noqa: E731
    _try(rows, case, "llmkernels-cpu", step("cpu"), metric, peer="reference")
    _try(rows, case, "reference", step("reference"), metric)
    return rows


def run(quick: bool = False) -> list[dict]:
    if on_gpu():
        return gpu_prefill(quick) + gpu_decode(quick) + cpu_cases(True)
    return cpu_cases(quick)


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run(quick="--quick" in sys.argv)))
