"""The benchmark harness: speedups, tables, result files and plots (on synthetic rows)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_speedups, format_table, save_results  # noqa: E402

ROWS = [
    {"op": "attn", "case": case, "impl": impl, "time_ms": ms, "metric": "TFLOP/s", "value": value, "limit": 989.0}
    for case, impl, ms, value in [
        ("s=1024 d=128", "llmkernels-cuda", 1.0, 400.0),
        ("s=1024 d=128", "sdpa-flash", 1.5, 266.7),
        ("s=2048 d=128", "llmkernels-cuda", 3.0, 500.0),
        ("s=2048 d=128", "sdpa-flash", 2.0, 700.0),
    ]
]


def test_speedups_and_table(tmp_path):
    rows = add_speedups([dict(r) for r in ROWS])
    assert rows[1]["ours_vs_this"] == pytest.approx(1.5)
    assert rows[3]["ours_vs_this"] == pytest.approx(2.0 / 3.0)
    table = format_table(rows)
    assert "1.50x" in table and "0.67x" in table and "40%" in table
    path = save_results(rows, str(tmp_path), tag="t")
    data = json.load(open(path))
    assert data["environment"]["torch"] and len(data["results"]) == 4


def test_plots_render(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import plot, split_case

    assert split_case("b=2 seqlen=4096 d=128 causal") == (4096, "b=2 d=128 causal")
    path = save_results(add_speedups([dict(r) for r in ROWS]), str(tmp_path))
    pngs = plot(path, str(tmp_path / "plots"))
    assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 1000
