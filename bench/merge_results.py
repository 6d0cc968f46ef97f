"""Merges the result files of one benchmark run (e.g. one per op, as scripts/gpu_check.sh writes them) into
the single file that is committed under bench/results/.

    python bench/merge_results.py RESULTS.json... --out-dir bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import result_file_name  # noqa: E402


def merge(paths: list[str]) -> dict:
    merged: dict = {"environment": None, "results": []}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        env = data["environment"]
        if merged["environment"] is None:
            merged["environment"] = env
        elif env.get("device") != merged["environment"].get("device"):
            theirs, ours = env.get("device"), merged["environment"].get("device")
            raise SystemExit(f"merge_results: results from several devices: {path} is from {theirs}, not {ours}")
        merged["results"] += data["results"]
    return merged


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    merged = merge(args.results)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, result_file_name(merged["environment"]))
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"{len(merged['results'])} rows from {len(args.results)} files -> {path}")
    return path


if __name__ == "__main__":
    main()
