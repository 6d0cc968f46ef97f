"""Shared benchmark machinery: timing, hardware limits, tables and result files.

Each op's `bench/bench_<op>.py` defines `run(quick: bool) -> list[dict]`, one dict per (case, impl):
    {"op": "flash_attn_fwd", "case": "b=4 s=4096 h=16 d=128 causal", "impl": "llmkernels-cuda",
     "time_ms": 1.23, "metric": "TFLOP/s", "value": 456.0, "limit": 989.0, "peer": "sdpa-flash"}
`bench/run.py` adds speedups against each case's peers, prints the tables and writes JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def bench_device() -> str:
    return "cuda" if on_gpu() else "cpu"


_deadline: float | None = None


class BenchDeadline(RuntimeError):
    """Raised by measure_ms once the run's time budget is spent; the benchmarks skip the rest of their cases."""


def set_deadline(seconds: float | None) -> None:
    """From now on, measure_ms refuses to start after `seconds` (None: no limit). A time-boxed run (the GPU
    check) then returns what it measured instead of being killed with nothing saved."""
    global _deadline
    _deadline = None if seconds is None else time.monotonic() + seconds


def measure_ms(
    fn: Callable[[], object], *, warmup: int = 3, rep: int = 20, min_time_s: float = 0.2, past_deadline: bool = False
) -> float:
    """Median wall time of fn() in milliseconds. On a GPU, CUDA events around each call (so the time is
    the device's, with the queue drained between calls); on CPU, perf_counter. past_deadline: measure even once
    the budget is spent (a limit the rows already measured need, as the copy bandwidth)."""
    if _deadline is not None and time.monotonic() > _deadline and not past_deadline:
        raise BenchDeadline("the benchmark run's time budget is spent")
    for _ in range(warmup):
        fn()
    times = []
    if on_gpu():
        torch.cuda.synchronize()
        start_all = time.perf_counter()
        while len(times) < rep or (time.perf_counter() - start_all < min_time_s and len(times) < 10 * rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        start_all = time.perf_counter()
        while len(times) < rep or (time.perf_counter() - start_all < min_time_s and len(times) < 10 * rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """`name` set to `value` (None: unset) for the block, then restored: for the kernel switches the C++ host code
    reads on every call (LLMKERNELS_TERNARY_GEMM, LLMKERNELS_DECODE_KERNEL, LLMKERNELS_SCAN_BWD)."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def switched_kernels_enabled() -> bool:
    """Whether to also time kernels that sit behind an off-by-default switch because no GPU has run them yet
    (LLMKERNELS_BENCH_SWITCHED=1, which scripts/gpu_iterate.sh sets). Off in scripts/gpu_check.sh, so a fault in
    one of them cannot take the measured kernels' numbers with it."""
    return os.environ.get("LLMKERNELS_BENCH_SWITCHED") == "1"


def measure_graph_ms(fn: Callable[[], object], *, calls: int = 20, rep: int = 10) -> float | None:
    """Device time per call of fn(), replayed from one CUDA graph of `calls` successive calls: no Python, no
    launch latency, as an inference engine that captures its decode step runs it (measure_ms's eager time of a
    small op is mostly the host's). None when fn cannot be captured (a host sync or a pageable copy inside)."""
    if not on_gpu():
        return None
    if _deadline is not None and time.monotonic() > _deadline:
        raise BenchDeadline("the benchmark run's time budget is spent")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, lazy init) off the default stream, as capture wants
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        del graph
        return statistics.median(times)
    except Exception as exc:  # noqa: BLE001  (not capturable: the caller reports the eager time only)
        torch.cuda.synchronize()
        print(f"  CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]}")
        return None


_copy_gbps_cache: dict[str, float] = {}


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written), the memory-bound limit."""
    dev = bench_device()
    if dev not in _copy_gbps_cache:
        n = (1 << 28) if dev == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32 per buffer
        a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
        b = torch.empty_like(a)
        # (past the deadline too: ops call this between cases, outside their per-row guards, and a BenchDeadline
        # here ended the whole op, losing every row it had measured)
        ms = measure_ms(lambda: b.copy_(a), rep=10, past_deadline=True)
        _copy_gbps_cache[dev] = 2 * a.numel() * 4 / (ms * 1e-3) / 1e9
        del a, b
    return _copy_gbps_cache[dev]


# Dense tensor-core peaks (TFLOP/s) from datasheets, used as the compute-bound limit.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(dtype: torch.dtype = torch.bfloat16) -> float | None:
    if not on_gpu():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if on_gpu():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["driver"] = _driver_version()
    else:
        env["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return env


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def add_speedups(rows: list[dict]) -> list[dict]:
    """For each (op, case), speedup of every impl over the llmkernels row: peer_time / our_time."""
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), []).append(r)
    for group in by_case.values():
        ours = [r for r in group if r["impl"].startswith("llmkernels")]
        for r in group:
            best_ours = min((o["time_ms"] for o in ours), default=None)
            r["ours_vs_this"] = (r["time_ms"] / best_ours) if best_ours else None
    return rows


def format_table(rows: list[dict]) -> str:
    """One table per op: case, impl, time, throughput, fraction of the hardware limit, speedup."""
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        sub = [r for r in rows if r["op"] == op]
        lines.append(f"\n## {op}\n")
        lines.append("| case | impl | time (ms) | throughput | % of limit | llmkernels speedup vs this |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for r in sub:
            frac = f"{100 * r['value'] / r['limit']:.0f}%" if r.get("limit") and r.get("value") else "-"
            sp = f"{r['ours_vs_this']:.2f}x" if r.get("ours_vs_this") and not r["impl"].startswith("llmkernels") else ""
            val = f"{r['value']:.1f} {r['metric']}" if r.get("value") is not None else "-"
            lines.append(f"| {r['case']} | {r['impl']} | {r['time_ms']:.3f} | {val} | {frac} | {sp} |")
    return "\n".join(lines)


def result_file_name(env: dict, tag: str | None = None) -> str:
    """<device>-<date>[-tag].json, in letters, digits, '.', '_' and '-' only."""
    dev = env["device"].replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
    return f"{dev}-{env['date'][:10]}{'-' + tag if tag else ''}.json"


def save_results(rows: list[dict], out_dir: str, tag: str | None = None) -> str:
    env = environment()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, result_file_name(env, tag))
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    return path
