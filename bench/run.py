"""Runs the benchmarks of every op (or one) and prints a table per op against its peers.

    python bench/run.py [--op attention|sliding_window|ternary|selective_scan] [--quick] [--out bench/results]
                        [--tag NAME] [--budget-s SECONDS]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_speedups, environment, format_table, save_results, set_deadline  # noqa: E402

OPS = ("attention", "sliding_window", "ternary", "selective_scan")


def run(ops: list[str], quick: bool, out_dir: str | None, tag: str | None = None) -> list[dict]:
    rows: list[dict] = []
    env = environment()
    print(f"device: {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | triton {env['triton']} "
          f"| {env['date']}")
    for op in ops:
        try:
            module = importlib.import_module(f"bench.bench_{op}")
        except ModuleNotFoundError as exc:
            print(f"[{op}] no benchmark module: {exc}")
            continue
        print(f"[{op}] running{' (quick)' if quick else ''} ...", flush=True)
        try:
            got = module.run(quick=quick)
        except Exception:  # noqa: BLE001  (one op's failure must not cost the other ops' rows)
            import traceback

            traceback.print_exc()
            print(f"[{op}] failed outside its per-case guards: its rows are lost, the other ops go on", flush=True)
            continue
        add_speedups(got)
        print(format_table(got), flush=True)
        rows += got
        if out_dir:  # after every op: a run killed by a time limit keeps what it measured
            path = save_results(rows, out_dir, tag)
    if out_dir and rows:
        print(f"\nresults written to {path}")
        try:
            from bench.plot import plot

            plots = plot(path, os.path.join(out_dir, "plots"))
            print(f"{len(plots)} plots in {os.path.join(out_dir, 'plots')}")
        except ImportError:
            print("matplotlib not installed: no plots (pip install matplotlib)")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=OPS, action="append", help="only this op (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a few small cases")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="stop measuring new cases after this; save what ran")
    args = ap.parse_args(argv)
    set_deadline(args.budget_s)
    # Quick runs are tagged so they never overwrite a full run's results of the same day.
    tag = args.tag if args.tag is not None else ("quick" if args.quick else None)
    run(args.op or list(OPS), args.quick, None if args.no_save else args.out, tag)


if __name__ == "__main__":
    main()
