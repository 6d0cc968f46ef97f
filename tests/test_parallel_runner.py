"""scripts/run_tests_parallel.py, which the GPU check runs the suite with: shards cover every test exactly once and
the summary counts what the junit reports say."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_shards_cover_every_test_once(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/run_tests_parallel.py", str(out), "tests/test_package.py",
         "--workers", "2", "--max-tests-per-job", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_package.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    n = sum(1 for line in collected.splitlines() if "::" in line)
    assert n >= 5
    reports = sorted((out / "junit").glob("*.xml"))
    assert len(reports) == -(-n // 4)  # one per shard
    cases = [case for r in reports for case in ET.parse(r).getroot().iter("testcase")]
    names = [(case.get("classname"), case.get("name")) for case in cases]
    assert len(names) == n and len(set(names)) == n  # each test ran in exactly one shard
    assert f"== {n} passed;" in proc.stdout
