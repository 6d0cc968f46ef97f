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


def test_deadline_stops_new_measurements():
    from bench import common

    calls = []
    try:
        common.set_deadline(0.0)
        with pytest.raises(common.BenchDeadline):
            common.measure_ms(lambda: calls.append(1))
        assert calls == []  # refused before running anything
        common.set_deadline(None)
        assert common.measure_ms(lambda: calls.append(1), warmup=0, rep=2, min_time_s=0) >= 0
        assert len(calls) == 2
    finally:
        common.set_deadline(None)


def test_a_spent_budget_keeps_the_measured_rows(tmp_path, monkeypatch):
    """Past the deadline the copy bandwidth (a limit measured rows need, asked for between cases outside the
    per-row guards) is still measured, and an op that fails outside its guards costs only its own rows: run.py
    saves the other ops' (once, a BenchDeadline there ended the process with nothing saved)."""
    from bench import common, run

    try:
        common.set_deadline(0.0)
        monkeypatch.setattr(common, "_copy_gbps_cache", {})
        assert common.copy_bandwidth_gbps() > 0
    finally:
        common.set_deadline(None)

    class Failing:
        @staticmethod
        def run(quick=False):
            raise common.BenchDeadline("spent")

    class Fine:
        @staticmethod
        def run(quick=False):
            return [{"op": "x", "case": "c", "impl": "llmkernels-cpu", "time_ms": 1.0}]

    modules = {"bench.bench_attention": Failing, "bench.bench_ternary": Fine}
    monkeypatch.setattr(run.importlib, "import_module", lambda name: modules[name])
    monkeypatch.setattr(run, "save_results", lambda rows, out, tag: str(tmp_path / "r.json"))
    monkeypatch.setitem(sys.modules, "bench.plot", None)  # (no plots: ImportError path)
    rows = run.run(["attention", "ternary"], quick=True, out_dir=str(tmp_path))
    assert [r["op"] for r in rows] == ["x"]


def test_dispatch_table_from_several_result_files(tmp_path, monkeypatch):
    from bench import make_dispatch_table as mdt

    def result(rows, device="NVIDIA H100 80GB HBM3"):
        return {"environment": {"device": device, "capability": [9, 0]}, "results": rows}

    def row(op, case, impl, ms):
        return {"op": op, "case": case, "impl": impl, "time_ms": ms}

    attn = [row("flash_attn_fwd", c, i, ms) for c, i, ms in
            [("a", "llmkernels-cuda", 2.0), ("a", "llmkernels-triton", 1.0),
             ("b", "llmkernels-cuda", 3.0), ("b", "llmkernels-triton", 2.0)]]  # fmt: skip
    scan = [row("selective_scan_fwd", "c", i, ms) for i, ms in [("llmkernels-cuda", 1.0), ("llmkernels-triton", 5.0)]]
    files = []
    for name, rows in (("attention", attn), ("scan", scan)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result(rows)))
    table = tmp_path / "table.json"
    monkeypatch.setattr(mdt, "TABLE", str(table))
    monkeypatch.setattr(sys, "argv", ["make_dispatch_table.py", *map(str, files)])
    mdt.main()
    orders = json.loads(table.read_text())["H100"]
    assert orders["flash_attn_func"] == ["triton", "cuda", "reference"]
    assert orders["selective_scan_fn"] == ["cuda", "triton", "reference"]
    assert orders["_capability"] == [9, 0]  # (an H200, which has no entry, then takes these orders)
    older = tmp_path / "older.json"  # results written before the environment recorded the capability
    older.write_text(json.dumps({"environment": {"device": "NVIDIA H100 80GB HBM3"}, "results": attn}))
    monkeypatch.setattr(sys, "argv", ["make_dispatch_table.py", str(older)])
    mdt.main()
    assert json.loads(table.read_text())["H100"]["_capability"] == [9, 0]  # (kept from the entry)
    assert json.loads(table.read_text())["H100"]["selective_scan_fn"] == ["cuda", "triton", "reference"]  # (not in
    # the older run: kept)

    other = tmp_path / "other.json"
    other.write_text(json.dumps(result(scan, device="NVIDIA A100")))
    monkeypatch.setattr(sys, "argv", ["make_dispatch_table.py", str(files[0]), str(other)])
    with pytest.raises(SystemExit, match="several devices"):
        mdt.main()


def test_profile_kernels_smoke(tmp_path):
    """bench/profile_kernels.py (the per-kernel breakdown a GPU session runs) works end to end on CPU."""
    from bench.profile_kernels import main

    out = tmp_path / "profile.md"
    report = main(["--smoke", "--case", "ternary", "--case", "scan", "--iters", "1", "--out", str(out)])
    assert "### ternary prefill 17 x 64x256 | llmkernels: wall" in report
    assert "### scan fwd+bwd b1 dim8 L17 | llmkernels: wall" in report
    assert "failed" not in report and "attn" not in report  # --case filters
    assert out.read_text().strip() == report.strip()
