"""The `llmkernels` command (also `python -m llmkernels`).

    llmkernels info                      what is built and usable here, and why not
    llmkernels bench [--op NAME] [--quick]   benchmark tables against the peers, JSON in bench/results/
    llmkernels demo [--tokens N]         three small decoders, llmkernels vs pure PyTorch
"""

from __future__ import annotations

import argparse
import os
import sys


def _repo_root() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return here if os.path.isdir(os.path.join(here, "bench")) else None


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="llmkernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and usable on this machine, and why not")
    b = sub.add_parser("bench", help="benchmark tables against the peers")
    b.add_argument("--op", action="append", help="only this op family (repeatable)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None, help="results folder (default bench/results)")
    d = sub.add_parser("demo", help="generation with three small decoders, llmkernels vs pure PyTorch")
    d.add_argument("--tokens", type=_positive_int, default=200)
    d.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when there is a GPU")
    args = ap.parse_args(argv)
    if args.command == "demo" and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA GPU here")

    if args.command == "info":
        from .info import print_info

        print_info()
    elif args.command == "bench":
        root = _repo_root()
        if root is None:
            print("llmkernels bench needs the source checkout (bench/ beside the package)", file=sys.stderr)
            return 2
        sys.path.insert(0, root)
        from bench.run import main as bench_main

        bench_args = ["--quick"] if args.quick else []
        for op in args.op or []:
            bench_args += ["--op", op]
        if args.out:
            bench_args += ["--out", args.out]
        bench_main(bench_args)
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(tokens=args.tokens, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
