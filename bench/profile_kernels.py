"""Where the time of each missed target goes: device time per kernel per call, under torch.profiler.

    python bench/profile_kernels.py [--case NAME ...] [--out FILE]      (on a GPU: the issues' missed targets)
    python bench/profile_kernels.py --smoke                               (CPU, tiny shapes: checks the machinery)

The benchmarks say how far a case is from its target; this says why, in one device call: for each case the
kernels it launches (name, launches per call, device microseconds per call), their sum against the wall time
of a call (the gap is host work: Python, dispatch, allocation, launch latency) and, where the case has one,
the same for the peer it must beat. Cases are the targets bench/README.md lists as not met.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmkernels  # noqa: E402
from llmkernels.ternary import quantize_weight  # noqa: E402

Fn = Callable[[], object]


def kernel_times(fn: Fn, iters: int = 5) -> tuple[list[tuple[str, int, float]], float]:
    """([(kernel, launches per call, device us per call)], wall us per call), kernels sorted by time."""
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    wall_us = (time.perf_counter() - start) / iters * 1e6
    activity = torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(iters):
            fn()
        sync()
    total_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if gpu and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not gpu and ev.cpu_parent is not None:  # CPU smoke: top-level ops only
            continue
        us = ev.device_time_total if gpu else ev.cpu_time_total
        total_us[ev.name] += us
        count[ev.name] += 1
    rows = [(name, count[name] // iters, total_us[name] / iters) for name in total_us]
    return sorted(rows, key=lambda r: -r[2]), wall_us


def format_profile(case: str, impl: str, rows: list[tuple[str, int, float]], wall_us: float, top: int = 8) -> str:
    device_us = sum(r[2] for r in rows)
    lines = [
        f"### {case} | {impl}: wall {wall_us:.1f} us/call, kernels {device_us:.1f} us "
        f"({100 * device_us / wall_us if wall_us else 0:.0f}% of wall)"
    ]
    for name, n, us in rows[:top]:
        lines.append(f"  {us:10.1f} us  x{n:<3d} {name[:110]}")
    if len(rows) > top:
        lines.append(f"  {sum(r[2] for r in rows[top:]):10.1f} us  ({len(rows) - top} more kernels)")
    return "\n".join(lines)


# --- cases: name -> [(impl, fn)], built lazily so one case's memory is freed before the next -----------------


def _ternary(tokens: int, n: int, k: int, device: str, dtype: torch.dtype) -> list[tuple[str, Fn]]:
    w = torch.randn(n, k, device=device)
    w_packed, w_scale = quantize_weight(w)
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    w_peer = w.to(dtype)
    return [
        ("llmkernels", lambda: llmkernels.ternary_linear(x, w_packed, w_scale)),
        (f"F.linear {str(dtype)[6:]}", lambda: F.linear(x, w_peer)),
    ]


def _attn(b: int, s: int, h: int, d: int, causal: bool, backward: bool, device: str, dtype: torch.dtype):
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    dout = torch.randn_like(q)

    def ours():
        out = llmkernels.flash_attn_func(q, k, v, causal=causal)
        if backward:
            out.backward(dout)

    def sdpa():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        if backward:
            out.backward(dout.transpose(1, 2))

    return [("llmkernels", ours), ("sdpa", sdpa)]


def _decode(b: int, ctx: int, h: int, hk: int, d: int, device: str, dtype: torch.dtype):
    q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(b, ctx, hk, d, device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    return [
        ("llmkernels", lambda: llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)),
        ("sdpa", lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, enable_gqa=True)),
    ]


def _window(s: int, w: int, h: int, hk: int, d: int, device: str, dtype: torch.dtype):
    q = torch.randn(1, s, h, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, s, hk, d, device=device, dtype=dtype) for _ in range(2))
    return [
        ("window", lambda: llmkernels.flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0))),
        ("full causal", lambda: llmkernels.flash_attn_func(q, k, v, causal=True)),
    ]


def _scan(b: int, dim: int, seqlen: int, backward: bool, device: str, dtype: torch.dtype):
    n = 16
    u, delta, z = (torch.randn(b, dim, seqlen, device=device, dtype=dtype) for _ in range(3))
    delta = (0.5 * delta.abs()).to(dtype)
    B, C = (torch.randn(b, n, seqlen, device=device, dtype=dtype) for _ in range(2))
    A, D, bias = (
        -0.5 - torch.rand(dim, n, device=device),
        torch.randn(dim, device=device),
        torch.rand(dim, device=device),
    )
    leaves = (u, delta, B, C, z)
    for t in leaves:
        t.requires_grad_(backward)

    def run():
        out = llmkernels.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
        if backward:
            out.backward(torch.ones_like(out))

    return [("llmkernels", run)]


def gpu_cases() -> dict[str, Callable[[], list[tuple[str, Fn]]]]:
    bf16, dev = torch.bfloat16, "cuda"
    return {
        "ternary prefill 2048 x 4096x4096": lambda: _ternary(2048, 4096, 4096, dev, bf16),
        "ternary prefill 2048 x 28672x8192": lambda: _ternary(2048, 28672, 8192, dev, bf16),
        "ternary decode 1 x 4096x4096": lambda: _ternary(1, 4096, 4096, dev, bf16),
        "attn fwd b16 s1k h16 d128": lambda: _attn(16, 1024, 16, 128, False, False, dev, bf16),
        "attn fwd b16 s1k h16 d128 causal": lambda: _attn(16, 1024, 16, 128, True, False, dev, bf16),
        "attn fwd+bwd b16 s1k h16 d128 causal": lambda: _attn(16, 1024, 16, 128, True, True, dev, bf16),
        "attn decode b64 ctx4k h32/8 d128": lambda: _decode(64, 4096, 32, 8, 128, dev, bf16),
        "window prefill s16k W4k h32/8 d128": lambda: _window(16384, 4096, 32, 8, 128, dev, bf16),
        "scan fwd b8 dim5120 L2048": lambda: _scan(8, 5120, 2048, False, dev, bf16),
        "scan fwd+bwd b8 dim5120 L2048": lambda: _scan(8, 5120, 2048, True, dev, bf16),
    }


def smoke_cases() -> dict[str, Callable[[], list[tuple[str, Fn]]]]:
    f32, dev = torch.float32, "cpu"
    return {
        "ternary prefill 17 x 64x256": lambda: _ternary(17, 64, 256, dev, f32),
        "attn fwd+bwd b1 s33 h2 d32": lambda: _attn(1, 33, 2, 32, True, True, dev, f32),
        "attn decode b2 ctx40 h4/2 d32": lambda: _decode(2, 40, 4, 2, 32, dev, f32),
        "window prefill s40 W8 h2/1 d32": lambda: _window(40, 8, 2, 1, 32, dev, f32),
        "scan fwd+bwd b1 dim8 L17": lambda: _scan(1, 8, 17, True, dev, f32),
    }


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="substring of a case name (repeatable); default: all")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU cases (no GPU needed)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    cases = smoke_cases() if args.smoke or not torch.cuda.is_available() else gpu_cases()
    parts = [
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}"
    ]
    for name, build in cases.items():
        if args.case and not any(c in name for c in args.case):
            continue
        try:
            for impl, fn in build():
                rows, wall = kernel_times(fn, args.iters)
                parts.append(format_profile(name, impl, rows, wall))
        except Exception as exc:  # noqa: BLE001  (OOM, a kernel that fails: the other cases still run)
            parts.append(f"### {name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(parts[-1], flush=True)
    report = "\n\n".join(parts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return report


if __name__ == "__main__":
    main()
