"""Run the test suite in several pytest processes at once, for a GPU machine with many cores and no pytest-xdist.

    python scripts/run_tests_parallel.py OUTDIR [--workers N] [--deadline-s S] [--max-tests-per-job M] [paths...]

On a GPU most of the suite's time is Triton's JIT compiling kernels, one process and one core at a time; and a
kernel that faults leaves its process's CUDA context broken, failing every later test in it. Separate processes
fix both: compiles run in parallel, and a fault is confined to one job. Jobs are whole test files, or shards of the
large ones (`--shard I/K` from tests/conftest.py). Each job writes OUTDIR/junit/<job>.xml and OUTDIR/logs/<job>.log;
the summary (totals, every failure with its first line, jobs that crashed or ran out of time) goes to stdout.
Exit status: 0 when every job ran and nothing failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    name: str
    args: list[str]
    tests: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    finished: float = 0.0
    rc: int | None = None
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def collect(paths: list[str]) -> Counter:
    """Number of tests per file, from one `pytest --collect-only` (cheap next to running them)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    per_file = Counter()
    for line in out.splitlines():
        if "::" in line:
            per_file[line.split("::", 1)[0]] += 1
    return per_file


# Seconds per test are far from even on a GPU: a Triton test JIT-compiles its kernels (about 1 s each), the
# ternary autograd tests run every backend, the runner's own tests start pytest processes. Measured on one
# H100 (2026-11-23): test_triton_attention alone took over 130 s in one job. Such files count as this many tests
# when jobs are cut and ordered.
COST_PER_TEST = {"triton": 4, "autograd": 3, "parallel_runner": 10}


def test_cost(path: str) -> int:
    return max([w for key, w in COST_PER_TEST.items() if key in path] or [1])


def make_jobs(per_file: Counter, max_tests_per_job: int) -> list[Job]:
    jobs = []
    for path, n_tests in per_file.items():
        count = n_tests * test_cost(path)
        shards = max(1, -(-count // max_tests_per_job))
        stem = path.replace("/", "_").removesuffix(".py")
        for i in range(shards):
            shard = ["--shard", f"{i}/{shards}"] if shards > 1 else []
            jobs.append(Job(f"{stem}.{i}" if shards > 1 else stem, [path, *shard], -(-count // shards)))
    # Longest first, so the big jobs do not start last and set the end time alone.
    return sorted(jobs, key=lambda job: -job.tests)


def read_junit(job: Job, xml_path: Path) -> None:
    if not xml_path.exists():
        return
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return
    for case in root.iter("testcase"):
        node = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()
                job.failures.append(f"{outcome.upper()} {node}: {message[0][:200] if message else ''}")
                break
            if child.tag == "skipped":
                outcome = "skipped"
        job.counts[outcome] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("paths", nargs="*", default=["tests"])
    # Most of a job's time is one core compiling Triton kernels: on the 16-core GPU machine 12 jobs at once (the
    # suite roughly doubled after session 3, when 8 workers took 230 s of the 240 s deadline).
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 4)))
    parser.add_argument("--deadline-s", type=float, default=float(os.environ.get("TEST_TIMEOUT", 180)))
    parser.add_argument("--max-tests-per-job", type=int, default=150)
    parser.add_argument("--test-timeout-s", type=float, default=120, help="per test, if pytest-timeout is installed")
    args = parser.parse_args()
    start = time.monotonic()
    (args.outdir / "junit").mkdir(parents=True, exist_ok=True)
    (args.outdir / "logs").mkdir(parents=True, exist_ok=True)

    per_file = collect(args.paths)
    jobs = make_jobs(per_file, args.max_tests_per_job)
    print(
        f"{sum(per_file.values())} tests in {len(per_file)} files -> {len(jobs)} jobs on {args.workers} workers "
        f"(collected in {time.monotonic() - start:.0f}s)",
        flush=True,
    )
    # A hung kernel would hold its worker until the deadline: with pytest-timeout installed (the GPU machine has
    # it), a test running past --test-timeout-s ends its job, which is then reported as crashed.
    per_test = []
    if importlib.util.find_spec("pytest_timeout") is not None and args.test_timeout_s > 0:
        per_test = [f"--timeout={args.test_timeout_s:g}", "--timeout-method=thread"]
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < args.workers:
            job = pending.pop(0)
            log = open(args.outdir / "logs" / f"{job.name}.log", "w")  # noqa: SIM115 (closed with the process)
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "junit_family=xunit1",
                f"--junitxml={args.outdir / 'junit' / f'{job.name}.xml'}",
                *per_test,
                *job.args,
            ]
            job.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            job.started = time.monotonic()
            running.append(job)
        time.sleep(0.5)
        for job in list(running):
            if job.proc.poll() is not None:
                job.rc, job.finished = job.proc.returncode, time.monotonic()
                running.remove(job)
        if time.monotonic() - start > args.deadline_s:
            for job in running:
                job.proc.kill()
                job.proc.wait()
                job.rc, job.finished = "timeout", time.monotonic()
            running = []
            break

    totals, crashed = Counter(), []
    for job in jobs:
        read_junit(job, args.outdir / "junit" / f"{job.name}.xml")
        totals.update(job.counts)
        # pytest: 0 all passed, 1 some failed, 5 nothing collected (a shard of skips-only is fine too).
        xml = args.outdir / "junit" / f"{job.name}.xml"
        if job.rc is None:
            crashed.append(f"NOT RUN {job.name} (deadline reached first)")
        elif not xml.exists():  # the process ended before pytest wrote its report: a per-test timeout or a crash
            log_text = (args.outdir / "logs" / f"{job.name}.log").read_text(errors="replace")
            why = "a test passed --test-timeout-s" if "Timeout" in log_text else "no junit report"
            crashed.append(f"CRASHED {job.name} rc={job.rc}: {why} (log: logs/{job.name}.log)")
        elif job.rc not in (0, 1, 5):
            crashed.append(
                f"CRASHED {job.name} rc={job.rc} after {job.finished - job.started:.0f}s (log: logs/{job.name}.log)"
            )
    for job in sorted(jobs, key=lambda job: -(job.finished - job.started) if job.rc is not None else 0)[:10]:
        if job.rc is not None:
            print(f"  {job.finished - job.started:6.1f}s  {job.name}  {dict(job.counts)}")
    failures = [line for job in jobs for line in job.failures]
    for line in failures + crashed:
        print(line)
    unfinished = sorted({job.args[0] for job in jobs if job.rc in (None, "timeout")})
    if unfinished:  # what the next call should run (scripts/gpu_iterate.sh takes it as TEST_PATHS)
        print(f'RERUN: TEST_PATHS="{" ".join(unfinished)}"')
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(totals.items()))
    print(
        f"== {summary or 'no results'}; {len(crashed)} jobs crashed or not run; "
        f"{time.monotonic() - start:.0f}s wall on {args.workers} workers"
    )
    return 0 if not failures and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
