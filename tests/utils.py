"""Tolerance helpers shared by every op's tests.

Attention (and any op whose error grows with a reduction length): a kernel in a low precision must be
no worse than `ratio` times the error of the PyTorch reference run in that same precision, both measured
against the reference in fp32/fp64. The small absolute floor keeps the rule meaningful when the
reference is (nearly) exact, e.g. a single key per row, where both errors are one rounding of the output.

Elementwise-style ops use per-dtype (rtol, atol) tables.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rounding of an O(1) value in each dtype: the least error any kernel can have on its output.
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}

# (rtol, atol) for ops without a long reduction (and mamba_ssm's own tolerances for the scan).
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) or an extreme value (integer) so an unwritten element cannot pass."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like / Tensor.new_empty give NaN-filled float tensors inside the block: what an op
    allocates for its outputs (and scratch) must be written by a kernel to pass."""
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.device.type != "meta" else t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_like(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: poison(real_new(self, *a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_like, real_new


@contextlib.contextmanager
def nan_filled_empty():
    """at::empty (C++ ops' allocations too) gives NaN-filled float tensors inside the block (torch's deterministic
    mode fills uninitialised memory): an output element or gradient an op allocates but never writes fails."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_within_ratio(
    out: torch.Tensor,
    ref_exact: torch.Tensor,
    ref_same_precision: torch.Tensor,
    *,
    ratio: float = 2.0,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """|out - exact| <= ratio * |ref_same_precision - exact| + floor, elementwise maxima.

    floor defaults to 4 roundings of the output dtype scaled by the reference's magnitude: the error a
    kernel incurs just by rounding its result (and a reordered fp32 sum) once more than the reference.
    """
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_exact.shape)}"
    assert not torch.isnan(out).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    if floor is None:
        scale = max(ref_exact.abs().max().item(), 1.0) if ref_exact.numel() else 1.0
        floor = 4 * EPS[out.dtype] * scale
    err = max_abs_err(out, ref_exact)
    base = max_abs_err(ref_same_precision, ref_exact)
    assert err <= ratio * base + floor, (
        f"{name}: max error {err:.3e} exceeds {ratio} x reference error {base:.3e} + floor {floor:.1e}"
    )


def assert_close_dtype(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """assert_close with the per-dtype table, optionally loosened by `scale` (state why at the call)."""
    rtol, atol = TOLERANCES[dtype or out.dtype]
    torch.testing.assert_close(out.to(ref.dtype), ref, rtol=rtol * scale, atol=atol * scale)


def cpu_has_flag(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. "amx_bf16", "amx_int8"); False where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def saved_with_amx_on_and_off(code: str) -> list:
    """Runs `code` in two fresh processes, with LLMKERNELS_CPU_AMX=1 and =0 (read once per process); `code` saves
    its results with torch.save(..., sys.argv[1]) (sys is imported). Returns [results with AMX, without]."""
    results = []
    for flag in ("1", "0"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llmk_amx_{os.getpid()}_{flag}.pt")
        env = {**os.environ, "LLMKERNELS_CPU_AMX": flag}
        subprocess.run([sys.executable, "-c", "import sys;" + code, path], check=True, cwd=_ROOT, env=env)
        results.append(torch.load(path))
        os.remove(path)
    return results


def run_with_cpu_isa(isa: str, code: str, *test_dirs: str) -> str:
    """Runs `python -c code` in a fresh process with LLMKERNELS_CPU_ISA=isa (read once per process: "avx2" or
    "scalar" caps the C++ CPU kernels), from the repository root with tests/ and tests/<test_dirs> importable;
    asserts it succeeded and returns its stdout."""
    paths = [_ROOT, os.path.join(_ROOT, "tests")] + [os.path.join(_ROOT, "tests", d) for d in test_dirs]
    env = dict(
        os.environ, LLMKERNELS_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
