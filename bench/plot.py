"""Plots of throughput against sequence length / tokens for each op and implementation, with the hardware
limit as a line. Reads a results JSON written by bench/run.py; writes one PNG per (op, series).

    python bench/plot.py bench/results/<device>-<date>.json [--out bench/results/plots]

Rows may carry "x" (the swept size) and "series" (what else distinguishes the case); otherwise they are
parsed from the case string: x is the first of seqlen=/s=/ctx=/context=/tokens=/L=/m=, series the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re

X_KEYS = ("seqlen", "s", "ctx", "context", "tokens", "L", "m", "T")


def split_case(case: str) -> tuple[float | None, str]:
    for key in X_KEYS:
        m = re.search(rf"(?:^|[\s,]){key}=(\d+)(k?)", case)
        if m:
            x = int(m.group(1)) * (1024 if m.group(2) else 1)
            rest = (case[: m.start()] + " " + case[m.end() :]).strip(" ,")
            return x, re.sub(r"\s+", " ", rest)
    return None, case


def plot(path: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    env, rows = data["environment"], data["results"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        x, series = (r["x"], r.get("series", "")) if "x" in r else split_case(r["case"])
        if x is None or r.get("value") is None:
            continue
        groups.setdefault((r["op"], series), []).append({**r, "_x": x})
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (op, series), sub in groups.items():
        impls = sorted({r["impl"] for r in sub}, key=lambda s: (not s.startswith("llmkernels"), s))
        if len({r["_x"] for r in sub}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for impl in impls:
            pts = sorted((r["_x"], r["value"]) for r in sub if r["impl"] == impl)
            style = "-o" if impl.startswith("llmkernels") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=4)
        limits = [r["limit"] for r in sub if r.get("limit")]
        if limits:
            ax.axhline(max(limits), color="k", linestyle=":", label=f"hardware limit ({max(limits):.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length / tokens")
        ax.set_ylabel(sub[0]["metric"])
        date = env.get("date", "")[:10]
        ax.set_title(f"{op} {series}\n{env.get('device')} | torch {env.get('torch')} | {date}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{op}-{series}".strip("-_"))[:90] + ".png"
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out_dir, name))
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or os.path.join(os.path.dirname(args.results), "plots")
    for p in plot(args.results, out):
        print(p)


if __name__ == "__main__":
    main()
