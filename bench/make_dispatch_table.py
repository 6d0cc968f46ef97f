"""Turns GPU benchmark results into llmkernels/cuda_dispatch_table.json, the measured order in which
auto-dispatch tries the CUDA and Triton backends of each op on that GPU.

    python bench/make_dispatch_table.py bench/results/<gpu>-<date>*.json [--key H100]   (one run's files)

For every benchmark case where both llmkernels-cuda and llmkernels-triton ran, the faster one scores a win
for its backend; an op whose Triton backend wins most of its cases gets ("triton", "cuda", "reference"). The same
for Mamba-2's scan routes (mamba2_routes): "mamba2_route_inference" / "mamba2_route_training" list them fastest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.merge_results import merge  # noqa: E402
from llmkernels._backend import CAPABILITY_KEY  # noqa: E402

# benchmark op name -> the public op (Dispatcher name) whose order it decides
BENCH_TO_OP = {
    "flash_attn_fwd": "flash_attn_func",
    "flash_attn_fwd_bwd": "flash_attn_func",
    "flash_attn_decode": "flash_attn_with_kvcache",
    "sliding_window": "rolling_window_attn",
    "ternary_linear": "ternary_linear_a8",
    "selective_scan_fwd": "selective_scan_fn",
    "selective_scan_fwd_bwd": "selective_scan_fn",
    "selective_state_update": "selective_state_update",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "llmkernels", "cuda_dispatch_table.json")


def preferred_orders(rows: list[dict]) -> dict[str, list[str]]:
    wins: dict[str, dict[str, int]] = {}
    cases: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["impl"] in ("llmkernels-cuda", "llmkernels-triton") and r["op"] in BENCH_TO_OP:
            cases.setdefault((r["op"], r["case"]), {})[r["impl"].split("-")[1]] = r["time_ms"]
    for (op, _), times in cases.items():
        if len(times) == 2:
            winner = min(times, key=times.get)
            tally = wins.setdefault(BENCH_TO_OP[op], {"cuda": 0, "triton": 0})
            tally[winner] += 1
    return {
        op: (["triton", "cuda", "reference"] if t["triton"] > t["cuda"] else ["cuda", "triton", "reference"])
        for op, t in wins.items()
    }


# Mamba-2's scan routes (ops/mamba_chunk_scan.py ROUTE): which bench rows time which, and the table keys that
# mamba_chunk_scan_combined reads on a GPU (forward alone: inference; forward + backward: training).
MAMBA2_ROUTE_ROWS = {"llmkernels-cuda": "scan", "llmkernels-triton": "scan", "llmkernels-chunked": "chunked",
                     "llmkernels-chunked-triton": "chunked-triton"}  # fmt: skip
MAMBA2_ROUTE_KEYS = {"mamba_chunk_scan_combined_fwd": "mamba2_route_inference",
                     "mamba_chunk_scan_combined_fwd_bwd": "mamba2_route_training"}  # fmt: skip


def mamba2_routes(rows: list[dict]) -> dict[str, list[str]]:
    """Per table key, the routes ordered by the number of cases each was fastest in (a route's time in a case: its
    fastest row); only cases where at least two routes ran count."""
    times: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        route = MAMBA2_ROUTE_ROWS.get(r["impl"])
        if route and r["op"] in MAMBA2_ROUTE_KEYS:
            case = times.setdefault((r["op"], r["case"]), {})
            case[route] = min(case.get(route, float("inf")), r["time_ms"])
    wins: dict[str, dict[str, int]] = {}
    for (op, _), case in times.items():
        if len(case) >= 2:
            tally = wins.setdefault(MAMBA2_ROUTE_KEYS[op], dict.fromkeys(("chunked", "chunked-triton", "scan"), 0))
            tally[min(case, key=case.get)] += 1
    return {key: sorted(tally, key=lambda route: -tally[route]) for key, tally in wins.items()}  # (stable: ties keep
    # the order above, the PyTorch chunked route first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="result JSONs of one GPU (e.g. one file per op)")
    ap.add_argument("--key", default=None, help="device-name substring to file the orders under (default: H100, ...)")
    args = ap.parse_args()
    merged = merge(args.results)  # one GPU's files, or SystemExit naming the odd one out
    rows, device = merged["results"], merged["environment"].get("device", "")
    key = args.key or next((k for k in ("H200", "H100", "A100", "L40S") if k in device), device)
    table = {}
    if os.path.exists(TABLE):
        with open(TABLE) as f:
            table = json.load(f)
    orders = preferred_orders(rows) | mamba2_routes(rows)
    if not orders:  # a CPU run, or a GPU run where no case had both backends: nothing measured, nothing written
        print(f"{TABLE}: no case with both llmkernels-cuda and llmkernels-triton rows; table unchanged")
        return
    # (GPUs of the same architecture without an entry of their own take this one's orders; results written before
    # the environment recorded it keep the entry's)
    capability = merged["environment"].get("capability") or table.get(key, {}).get(CAPABILITY_KEY)
    if capability:
        orders[CAPABILITY_KEY] = list(capability)
    table[key] = {**table.get(key, {}), **orders}  # (an op this run did not measure keeps its stored order)
    with open(TABLE, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    print(f"{TABLE}: {key}: {table[key]}")


if __name__ == "__main__":
    main()
