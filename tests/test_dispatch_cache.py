"""The Dispatcher's cached choice (llmkernels/_backend.py) must answer as the walk from scratch does, whatever
use_backend, LLMKERNELS_BACKEND, DISABLED and the registered implementations say at the time of the call."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llmkernels
from llmkernels import _backend, _ext
from llmkernels.ops import attention, selective_scan

needs_cpu_kernels = pytest.mark.skipif(
    not (_ext.has_kernel("flash_attn_fwd", "CPU") and _ext.has_kernel("selective_state_update", "CPU")),
    reason=f"no C++ CPU kernels ({'loaded' if _ext.loaded else _ext.load_error})",
)


def _attn_args(dtype=torch.float32):
    q = torch.randn(2, 3, 4, 16, dtype=dtype)
    k = torch.randn(2, 5, 2, 16, dtype=dtype)
    return (q, k, torch.randn_like(k), 0.25, -1, 0, 0.0)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except _backend.BackendError as exc:
        return f"BackendError: {exc}"


def _both(op, args):
    """(cached choice, choice from scratch), each a backend name or the BackendError's message."""
    return _outcome(lambda: op.choose(*args)), _outcome(lambda: op._choose_uncached(args, {}))


@pytest.fixture
def disabled(monkeypatch):
    """A fresh DISABLED table for the test (the module's own is restored afterwards)."""
    table: dict = {}
    monkeypatch.setattr(_backend, "DISABLED", table)
    return table


@needs_cpu_kernels
def test_auto_choice_follows_disabled(disabled):
    op, args = attention.flash_attn, _attn_args()
    assert op.choose(*args) == "cpu"
    assert (None, torch.device("cpu")) in op._plans  # the choice came from the cache
    disabled[("flash_attn_func", "cpu")] = "wrong results on a test GPU"
    assert op.choose(*args) == "reference"
    with llmkernels.use_backend("cpu"):
        with pytest.raises(llmkernels.BackendError, match="disabled: wrong results on a test GPU"):
            op.choose(*args)
    del disabled[("flash_attn_func", "cpu")]
    assert op.choose(*args) == "cpu"


@needs_cpu_kernels
def test_use_backend_changes_the_choice_after_caching():
    op, args = selective_scan.update_dispatcher, _ssu_args()
    assert op.choose(*args) == "cpu"
    with llmkernels.use_backend("reference"):
        assert op.choose(*args) == "reference"
        with llmkernels.use_backend("auto"):
            assert op.choose(*args) == "cpu"
        with llmkernels.use_backend("cuda"):
            with pytest.raises(llmkernels.BackendError, match="inputs are on cpu, the cuda backend takes cuda"):
                op.choose(*args)
        assert op.choose(*args) == "reference"
    assert op.choose(*args) == "cpu"


@needs_cpu_kernels
def test_env_backend_is_part_of_the_key(monkeypatch):
    op, args = attention.flash_attn, _attn_args()
    assert op.choose(*args) == "cpu"
    monkeypatch.setattr(_backend, "_ENV_BACKEND", "reference")
    assert op.choose(*args) == "reference"
    with llmkernels.use_backend("auto"):  # "auto" overrides the environment for the block
        assert op.choose(*args) == "cpu"


@needs_cpu_kernels
def test_env_backend_in_a_fresh_process():
    code = (
        "import torch, llmkernels\n"
        "from llmkernels.ops import attention as a\n"
        "q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 3, 1, 16)\n"
        "args = (q, k, k.clone(), 0.25, -1, 0, 0.0)\n"
        "choices = [a.flash_attn.choose(*args) for _ in range(2)]\n"
        "with llmkernels.use_backend('auto'):\n"
        "    choices.append(a.flash_attn.choose(*args))\n"
        "print(*choices)\n"
    )
    for env, expected in (("reference", "reference reference cpu"), ("auto", "cpu cpu cpu"), ("cpu", "cpu cpu cpu")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, LLMKERNELS_BACKEND=env),
        )
        assert out.stdout.split() == expected.split(), (env, out.stdout, out.stderr)


@needs_cpu_kernels
def test_supports_is_asked_on_every_call():
    """The cache keeps only what does not depend on the arguments: a float64 q still goes to the reference."""
    op = attention.flash_attn
    assert op.choose(*_attn_args()) == "cpu"
    assert op.choose(*_attn_args(torch.float64)) == "reference"
    assert op.choose(*_attn_args(torch.bfloat16)) == "cpu"
    with llmkernels.use_backend("cpu"):
        with pytest.raises(llmkernels.BackendError, match="the CPU kernel takes float32/bfloat16/float16"):
            op.choose(*_attn_args(torch.float64))


def test_cached_choice_matches_the_walk_for_every_backend(disabled):
    """Every forced backend and auto, before and after a DISABLED entry, on valid and refused inputs."""
    cases = [
        (attention.flash_attn, _attn_args()),
        (attention.flash_attn, _attn_args(torch.float64)),
        (selective_scan.update_dispatcher, _ssu_args()),
        (attention.flash_attn, tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _attn_args())),
    ]
    for disable in (None, "cpu", "reference"):
        disabled.clear()
        if disable is not None:
            disabled[("flash_attn_func", disable)] = "test"
            disabled[("selective_state_update", disable)] = "test"
        for name in ("auto", *_backend.BACKENDS):
            with llmkernels.use_backend(name):
                for op, args in cases:
                    cached, walked = _both(op, args)
                    assert cached == walked, (op.name, name, disable)


@needs_cpu_kernels
def test_register_drops_the_cache():
    op = _backend.Dispatcher("test_dispatch_cache_op")
    try:
        op.register("reference")(lambda *a: "reference")
        args = _attn_args()
        assert op.choose(*args) == "reference"
        assert op._plans  # filled by the call above
        op.register("cpu", kernel="flash_attn_fwd")(lambda *a: "cpu")
        assert op.choose(*args) == "cpu"
        op.order["cpu"] = ("reference", "cpu")
        op.invalidate()
        assert op.choose(*args) == "reference"
    finally:
        del _backend.REGISTRY["test_dispatch_cache_op"]


@needs_cpu_kernels
def test_compiled_calls_bypass_the_cache_and_follow_use_backend():
    """Dynamo traces the walk from scratch (and guards on what it reads), never the cache."""
    op = selective_scan.update_dispatcher
    args = _ssu_args()
    state, rest = args[0], args[1:]

    def step(state, x, dt, A, B, C):
        return llmkernels.selective_state_update(state, x, dt, A, B, C, dt_softplus=True)

    expected = step(state.clone(), *rest[:5])
    op.invalidate()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(state.clone(), *rest[:5])
    torch.testing.assert_close(got, expected)
    assert not op._plans, "tracing filled the cache"
    with llmkernels.use_backend("cuda"):  # a guard on the forced backend must send this call to a new trace
        with pytest.raises(Exception) as info:  # fullgraph: dynamo reports the BackendError it traced as Unsupported
            compiled(state.clone(), *rest[:5])
    chain, exc = [], info.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    assert any("BackendError" in e and "inputs are on cpu" in e for e in chain), chain
    torch.testing.assert_close(compiled(state.clone(), *rest[:5]), expected)


def _ssu_args():
    batch, dim, dstate = 3, 6, 5
    return (
        torch.randn(batch, dim, dstate),
        torch.randn(batch, dim),
        torch.rand(batch, dim),
        -torch.rand(dim, dstate),
        torch.randn(batch, dstate),
        torch.randn(batch, dstate),
        None,
        None,
        None,
        True,
    )
