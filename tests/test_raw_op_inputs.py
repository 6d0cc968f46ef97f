"""Malformed and unusual inputs to the raw C++ CPU ops (torch.ops.llmkernels.*), which bypass the Python wrappers'
checks. Each case must either raise a clean error naming the op and the argument, or match the reference; never
crash the process or return garbage. The cases run in a child process (a crash there is reported per case, and
the remaining cases run in a fresh child); the inputs that used to crash (division by zero on nheads 0 / batch 0)
or return garbage (huge windows, overlapping in-place outputs, non-finite scales) come first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from llmkernels import _ext
from llmkernels.reference.attention import flash_attn_fwd_ref, flash_attn_with_kvcache_ref
from llmkernels.reference.causal_conv1d import causal_conv1d_ref
from llmkernels.reference.selective_scan import selective_scan_ref
from llmkernels.reference.sliding_window import rolling_window_attn_ref
from llmkernels.reference.ternary import pack_ternary_ref

INT64_MAX = 2**63 - 1
OPS = torch.ops.llmkernels


def rn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# Valid small calls of each op (args in schema order), and their references
# ------------------------------------------------------------------------------------------------------------------
def attn_args(b=2, sq=3, sk=5, h=4, hk=2, d=8, dtype=torch.float32, left=-1, right=0, scale=0.3, softcap=0.0):
    return [
        rn(b, sq, h, d, dtype=dtype),
        rn(b, sk, hk, d, dtype=dtype),
        rn(b, sk, hk, d, dtype=dtype),
        scale,
        left,
        right,
        softcap,
    ]


def attn_bwd_args(left=-1, right=0, h=4, scale=0.3, softcap=0.0):
    q, k, v, *_ = attn_args(h=h)
    out, lse = flash_attn_fwd_ref(q, k, v, scale, left, right, softcap)
    return [rn(*q.shape), q, k, v, out, lse, scale, left, right, softcap]


def attn_bwd_ref(dout, q, k, v, out, lse, scale, left, right, softcap):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    o, _ = flash_attn_fwd_ref(q, k, v, scale, left, right, softcap)
    return list(torch.autograd.grad(o, (q, k, v), dout.double()))


def kvcache_args(h=4, d=8, cap=9, lens=(2, 5), s_new=2, caches=None, right=0, scale=0.3, softcap=0.0):
    b = len(lens)
    k_cache, v_cache = caches if caches is not None else (rn(b, cap, 2, d), rn(b, cap, 2, d))
    return [
        rn(b, 1, h, d),
        k_cache,
        v_cache,
        rn(b, s_new, 2, d),
        rn(b, s_new, 2, d),
        torch.tensor(lens, dtype=torch.int32),
        scale,
        -1,
        right,
        softcap,
    ]


def kvcache_ref(q, kc, vc, kn, vn, lens, scale, left, right, softcap):
    kc, vc = kc.clone(), vc.clone()
    return [flash_attn_with_kvcache_ref(q, kc, vc, kn, vn, lens, scale, False, (left, right), softcap), kc, vc]


def rolling_args(h=4, dtype=torch.float32, scale=0.3, softcap=0.0, lens=(0, 7)):
    b, S, W, hk, d = len(lens), 3, 4, 2, 8
    return [
        rn(b, S, h, d, dtype=dtype),
        rn(b, S, hk, d, dtype=dtype),
        rn(b, S, hk, d, dtype=dtype),
        rn(b, W, hk, d, dtype=dtype),
        rn(b, W, hk, d, dtype=dtype),
        torch.tensor(lens, dtype=torch.int32),
        scale,
        softcap,
    ]


def scan_args(b=2, dim=4, L=5, n=3):
    return [
        rn(b, dim, L),
        rn(b, dim, L).abs(),
        -rn(dim, n).abs(),
        rn(b, n, L),
        rn(b, n, L),
        rn(dim),
        rn(b, dim, L),
        rn(dim),
        True,
        rn(b, dim, n),
    ]


def ssu_args(n=3):
    return [rn(2, 4, n), rn(2, 4), rn(2, 4).abs(), -rn(4, n).abs(), rn(2, n), rn(2, n), rn(4), rn(2, 4), rn(4), True]


def conv_update_args(state=None, dtype=torch.float32):
    return [
        rn(2, 4, dtype=dtype),
        rn(2, 4, 3) if state is None else state,
        rn(4, 3, dtype=dtype),
        rn(4, dtype=dtype),
        True,
    ]


def lin_args(k=40, n=5, dtype=torch.float32):
    w = pack_ternary_ref(torch.randint(-1, 2, (n, k), dtype=torch.int8))
    return [rn(3, k, dtype=dtype), w, torch.tensor(0.5), rn(n, dtype=dtype), k]


def expanded(shape):  # every batch row aliases row 0: stride 0
    return rn(1, *shape[1:]).expand(shape)


def overlapping(shape):  # rows (dim -2) overlap by half
    strides = list(torch.empty(shape).stride())
    strides[-2] //= 2
    size = sum((s - 1) * st for s, st in zip(shape, strides)) + 1
    return rn(size).as_strided(shape, strides)


def with_arg(args, i, value):
    args = list(args)
    args[i] = value
    return args


# ------------------------------------------------------------------------------------------------------------------
# Cases: name -> (op, make args, expected). expected: ("error", argument named in the message) or ("ref", fn of the
# (cloned) args returning the op's outputs followed by its in-place outputs (None: not compared)).
# ------------------------------------------------------------------------------------------------------------------
def _ref_fwd(q, k, v, scale, left, right, softcap):
    return list(
        flash_attn_fwd_ref(
            q, k, v, scale, -1 if left >= k.shape[1] else left, -1 if right >= q.shape[1] else right, softcap
        )
    )


def _rolling_ref(*a):
    return [rolling_window_attn_ref(*a)]


def _empty_like_outputs(*shapes):
    return lambda *a: [torch.zeros(s) for s in shapes]


CASES = {
    # --- used to crash the process (SIGFPE) ---
    "fwd_nheads0": ("flash_attn_fwd", lambda: attn_args(h=0), ("ref", _empty_like_outputs((2, 3, 0, 8), (2, 0, 3)))),
    "fwd_nheads0_bf16": (
        "flash_attn_fwd",
        lambda: attn_args(h=0, dtype=torch.bfloat16),
        ("ref", _empty_like_outputs((2, 3, 0, 8), (2, 0, 3))),
    ),
    "kvcache_nheads0": ("flash_attn_with_kvcache", lambda: kvcache_args(h=0), ("ref", kvcache_ref)),
    "rolling_nheads0": ("rolling_window_attn", lambda: rolling_args(h=0), ("ref", _empty_like_outputs((2, 3, 0, 8)))),
    "rolling_nheads0_bf16": (
        "rolling_window_attn",
        lambda: rolling_args(h=0, dtype=torch.bfloat16),
        ("ref", _empty_like_outputs((2, 3, 0, 8))),
    ),
    "scan_bwd_batch0": (
        "selective_scan_bwd",
        lambda: [rn(0, 4, 5), rn(0, 4, 3)] + scan_args(b=0),
        (
            "ref",
            lambda *a: [
                torch.zeros(0, 4, 5),
                torch.zeros(0, 4, 5),
                torch.zeros(4, 3),
                torch.zeros(0, 3, 5),
                torch.zeros(0, 3, 5),
                torch.zeros(4),
                torch.zeros(0, 4, 5),
                torch.zeros(4),
                torch.zeros(0, 4, 3),
            ],
        ),
    ),
    # --- used to return garbage ---
    "bwd_nheads0": (
        "flash_attn_bwd",
        lambda: attn_bwd_args(h=0),
        ("ref", lambda *a: [torch.zeros(2, 3, 0, 8), torch.zeros(2, 5, 2, 8), torch.zeros(2, 5, 2, 8)]),
    ),
    "fwd_window_right_int64_max": ("flash_attn_fwd", lambda: attn_args(right=INT64_MAX), ("ref", _ref_fwd)),
    "fwd_window_left_int64_max": ("flash_attn_fwd", lambda: attn_args(left=INT64_MAX, sq=7, sk=3), ("ref", _ref_fwd)),
    "bwd_window_left_int64_max": ("flash_attn_bwd", lambda: attn_bwd_args(left=INT64_MAX), ("ref", attn_bwd_ref)),
    "kvcache_window_right_int64_max": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(right=INT64_MAX),
        ("ref", lambda *a: kvcache_ref(*a[:8], -1, a[9])),
    ),
    "kvcache_k_cache_expanded": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(caches=(expanded((2, 9, 2, 8)), rn(2, 9, 2, 8))),
        ("error", "k_cache"),
    ),
    "kvcache_v_cache_overlapping": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(caches=(rn(2, 9, 2, 8), overlapping((2, 9, 2, 8)))),
        ("error", "v_cache"),
    ),
    "conv_update_state_expanded": (
        "causal_conv1d_update",
        lambda: conv_update_args(state=expanded((2, 4, 3))),
        ("error", "conv_state"),
    ),
    "conv_update_state_overlapping": (
        "causal_conv1d_update",
        lambda: conv_update_args(state=overlapping((2, 4, 3))),
        ("error", "conv_state"),
    ),
    "fwd_scale_nan": ("flash_attn_fwd", lambda: attn_args(scale=math.nan), ("error", "softmax_scale")),
    "fwd_scale_inf": ("flash_attn_fwd", lambda: attn_args(scale=math.inf), ("error", "softmax_scale")),
    "fwd_softcap_inf": ("flash_attn_fwd", lambda: attn_args(softcap=math.inf), ("error", "softcap")),
    "fwd_softcap_negative": ("flash_attn_fwd", lambda: attn_args(softcap=-1.0), ("error", "softcap")),
    "bwd_softcap_inf": ("flash_attn_bwd", lambda: with_arg(attn_bwd_args(), 9, math.inf), ("error", "softcap")),
    "kvcache_scale_nan": ("flash_attn_with_kvcache", lambda: kvcache_args(scale=math.nan), ("error", "softmax_scale")),
    "rolling_scale_nan": ("rolling_window_attn", lambda: rolling_args(scale=math.nan), ("error", "softmax_scale")),
    "rolling_scale_neg_inf": ("rolling_window_attn", lambda: rolling_args(scale=-math.inf), ("error", "softmax_scale")),
    "rolling_softcap_inf": ("rolling_window_attn", lambda: rolling_args(softcap=math.inf), ("error", "softcap")),
    "conv_bwd_bias_int32": (
        "causal_conv1d_bwd",
        lambda: [rn(2, 4, 6), rn(2, 4, 6), rn(4, 3), torch.ones(4, dtype=torch.int32), True],
        ("error", "bias"),
    ),
    # --- used to raise an error that named neither the op nor the argument ---
    "quantize_float8": ("ternary_quantize_activation", lambda: [rn(3, 40).to(torch.float8_e4m3fn)], ("error", "x")),
    "conv_fwd_float8": (
        "causal_conv1d_fwd",
        lambda: [rn(2, 4, 6).to(torch.float8_e4m3fn), rn(4, 3), None, False],
        ("error", "x"),
    ),
    "conv_update_x_float8": (
        "causal_conv1d_update",
        lambda: with_arg(conv_update_args(), 0, rn(2, 4).to(torch.float8_e4m3fn)),
        ("error", "x"),
    ),
    # --- a sample of the rest (these were fine, and must stay so) ---
    "fwd_q_int32": (
        "flash_attn_fwd",
        lambda: with_arg(attn_args(), 0, torch.ones(2, 3, 4, 8, dtype=torch.int32)),
        ("error", "q"),
    ),
    "fwd_k_rank3": ("flash_attn_fwd", lambda: with_arg(attn_args(), 1, rn(2, 5, 16)), ("error", "k")),
    "fwd_headdim_257": ("flash_attn_fwd", lambda: attn_args(d=257), ("error", "q")),
    "fwd_gqa_mismatch": ("flash_attn_fwd", lambda: attn_args(h=3), ("error", "k")),
    "fwd_v_last_dim_strided": (
        "flash_attn_fwd",
        lambda: with_arg(attn_args(), 2, rn(2, 5, 2, 16)[..., ::2]),
        ("error", "v"),
    ),
    "fwd_q_batch_strided": (
        "flash_attn_fwd",
        lambda: with_arg(attn_args(), 0, rn(3, 2, 4, 8).transpose(0, 1)),
        ("ref", _ref_fwd),
    ),
    "fwd_k_expanded": ("flash_attn_fwd", lambda: with_arg(attn_args(), 1, expanded((2, 5, 2, 8))), ("ref", _ref_fwd)),
    "fwd_seqlen_k0": ("flash_attn_fwd", lambda: attn_args(sk=0), ("ref", _ref_fwd)),
    "fwd_window_negative": ("flash_attn_fwd", lambda: attn_args(left=-5, right=-(2**63)), ("ref", _ref_fwd)),
    "bwd_lse_wrong_shape": (
        "flash_attn_bwd",
        lambda: with_arg(attn_bwd_args(), 5, rn(2, 3, 4)),
        ("error", "softmax_lse"),
    ),
    "kvcache_lens_int64": (
        "flash_attn_with_kvcache",
        lambda: with_arg(kvcache_args(), 5, torch.tensor([2, 5])),
        ("error", "cache_seqlens"),
    ),
    "kvcache_lens_over_capacity": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(lens=(8, 0)),
        ("error", "cache_seqlens"),
    ),
    "kvcache_lens_negative": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(lens=(-1, 0)),
        ("error", "cache_seqlens"),
    ),
    "kvcache_lens_int32_max": (
        "flash_attn_with_kvcache",
        lambda: kvcache_args(lens=(2**31 - 1, 0)),
        ("error", "cache_seqlens"),
    ),
    "kvcache_k_new_only": ("flash_attn_with_kvcache", lambda: with_arg(kvcache_args(), 4, None), ("error", "k_new")),
    "rolling_lens_negative": ("rolling_window_attn", lambda: rolling_args(lens=(0, -3)), ("error", "seqlens")),
    "rolling_lens_int32_max": ("rolling_window_attn", lambda: rolling_args(lens=(2**31 - 2, 5)), ("ref", _rolling_ref)),
    "rolling_ring_strided": (
        "rolling_window_attn",
        lambda: with_arg(rolling_args(), 3, rn(4, 2, 2, 8).transpose(0, 1)),
        ("error", "k_ring"),
    ),
    "append_lens_int64": (
        "rolling_cache_append",
        lambda: [rn(2, 4, 2, 8), rn(2, 4, 2, 8), rn(2, 3, 2, 8), rn(2, 3, 2, 8), torch.tensor([0, 1])],
        ("error", "seqlens"),
    ),
    "matmul_in_features_negative": (
        "ternary_matmul_int8",
        lambda: [torch.ones(3, 40, dtype=torch.int8), lin_args()[1], -40],
        ("error", "x_q"),
    ),
    "matmul_in_features_huge": (
        "ternary_matmul_int8",
        lambda: [torch.ones(3, 40, dtype=torch.int8), lin_args()[1], 2**62],
        ("error", "x_q"),
    ),
    "a8_w_packed_columns": (
        "ternary_linear_a8",
        lambda: with_arg(lin_args(), 1, torch.zeros(5, 32, dtype=torch.uint8)),
        ("error", "w_packed"),
    ),
    "w2_w_scale_two": ("ternary_linear_w2", lambda: with_arg(lin_args(), 2, torch.ones(2)), ("error", "w_scale")),
    "w2_bias_wrong_dtype": (
        "ternary_linear_w2",
        lambda: with_arg(lin_args(), 3, rn(5, dtype=torch.float64)),
        ("error", "bias"),
    ),
    "scan_dstate_257": ("selective_scan_fwd", lambda: scan_args(n=257), ("error", "A")),
    "scan_groups_not_dividing": (
        "selective_scan_fwd",
        lambda: with_arg(scan_args(), 3, rn(2, 3, 3, 5)),
        ("error", "B"),
    ),
    "scan_seqlen0": (
        "selective_scan_fwd",
        lambda: scan_args(L=0),
        ("ref", lambda *a: list(selective_scan_ref(*a[:9], True, a[9]))),
    ),
    "ssu_state_strided": (
        "selective_state_update",
        lambda: with_arg(ssu_args(), 0, rn(4, 2, 3).transpose(0, 1)),
        ("error", "state"),
    ),
    "ssu_dstate0": ("selective_state_update", lambda: ssu_args(n=0), ("error", "A")),
    "conv_width5": ("causal_conv1d_fwd", lambda: [rn(2, 4, 6), rn(4, 5), None, False], ("error", "weight")),
    "conv_seqlen1": (
        "causal_conv1d_fwd",
        lambda: [rn(2, 4, 1), rn(4, 3), rn(4), True],
        ("ref", lambda x, w, b, silu: [causal_conv1d_ref(x, w, b, "silu")]),
    ),
}

# Ops whose in-place outputs follow the returned ones in a "ref" comparison.
MUTATED = {"flash_attn_with_kvcache": (1, 2)}


def _run_case(name: str) -> dict:
    op, make, (kind, what) = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    args = make()
    clones = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        out = getattr(OPS, op)(*args)
    except Exception as e:  # noqa: BLE001 - classified below
        msg = str(e).split("\n")[0]
        clean = isinstance(e, (RuntimeError, ValueError, NotImplementedError, TypeError))
        if kind == "error" and clean and f"llmkernels.{op}" in msg and what in msg:
            return {"ok": True}
        return {"ok": False, "why": f"{type(e).__name__}: {msg[:300]}"}
    if kind == "error":
        return {"ok": False, "why": f"accepted, expected an error naming {what}"}
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    outs += [args[i] for i in MUTATED.get(op, ())]
    for i, (got, ref) in enumerate(zip(outs, what(*clones))):
        if ref is None:
            continue
        if tuple(got.shape) != tuple(ref.shape):
            return {"ok": False, "why": f"output {i}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
        try:
            tol = 3e-2 if got.dtype in (torch.bfloat16, torch.float16) else 1e-4
            torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol, equal_nan=True)
        except AssertionError as e:
            return {"ok": False, "why": f"output {i}: {str(e).splitlines()[:3]}"}
    return {"ok": True}


def _child(names: list[str]) -> None:
    for name in names:
        print("START " + name, flush=True)
        print("RESULT " + json.dumps({name: _run_case(name)}), flush=True)


def _run_all() -> dict:
    """Runs every case in child processes; a child killed by a signal marks its current case and the next child
    carries on with the rest."""
    results, todo = {}, [n for n in CASES if _ext.has_kernel(CASES[n][0], "CPU")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    while todo:
        code = f"import test_raw_op_inputs as t; t._child({todo!r})"
        try:
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", e.stdout or "", ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        current = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("RESULT "):
                results.update(json.loads(line[7:]))
        if current is not None and current not in results:
            results[current] = {"ok": False, "why": f"the process died (exit status {rc}): {stderr[-300:]}"}
        elif rc != 0:
            pytest.fail(f"child process failed (exit status {rc}): {stderr[-2000:]}")
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def results():
    if not _ext.loaded:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error}")
    return _run_all()


@pytest.mark.parametrize("name", list(CASES))
def test_raw_op_input(name, results):
    op = CASES[name][0]
    if not _ext.has_kernel(op, "CPU"):
        pytest.skip(f"this build has no C++ CPU kernel of {op}")
    r = results[name]
    assert r["ok"], f"{name} ({op}): {r['why']}"


def test_fake_kernels_refuse_mixed_devices():
    """A raw call mixing meta and CPU tensors reaches the fake kernel, not the C++ checks: it must raise, not
    return an uninitialised tensor; all-meta calls still give shapes."""
    import llmkernels

    w_packed, _ = llmkernels.ternary.quantize_weight(torch.randn(16, 256))
    x_q = torch.zeros(3, 256, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="ternary_matmul_int8: tensor arguments must be on one device"):
        torch.ops.llmkernels.ternary_matmul_int8(x_q, w_packed.to("meta"), 256)
    assert torch.ops.llmkernels.ternary_matmul_int8(x_q.to("meta"), w_packed.to("meta"), 256).shape == (3, 16)
    q = torch.randn(1, 5, 2, 32)
    with pytest.raises(RuntimeError, match="flash_attn_fwd: tensor arguments must be on one device"):
        torch.ops.llmkernels.flash_attn_fwd(q, q.to("meta"), q, 0.2, -1, -1, 0.0)


def test_triton_fallbacks_decline_tensors_past_their_int32_offsets():
    """Where a Triton kernel forms a row offset in int32 (the sliding-window chunk's keys, the scan's per-token B / C
    groups, the ternary GEMM's weight rows), inputs of 2^31+ elements are declined with a reason (dispatch then takes
    another backend) instead of addressing wrapped memory; shapes below that are taken. Meta tensors: no memory."""
    from llmkernels.ops import selective_scan as scan_ops
    from llmkernels.ops import sliding_window as sw_ops
    from llmkernels.ops import ternary as ternary_ops

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, device="meta", dtype=dtype)

    q, ring = meta(1, 2_097_152, 32, 128), meta(1, 4096, 8, 128)
    for keys, declined in ((meta(1, 2_097_152, 8, 128), True), (meta(1, 2_097_151, 8, 128), False)):
        reason = sw_ops._triton_supports(q, keys, keys, ring, ring, None, 0.1, 0.0)
        assert (reason is not None and "int32" in reason) == declined
    u = meta(1, 2048, 3, dtype=torch.float32)
    # (a batch row's furthest element, 1024 * steps - 1 here, must stay below 2^31; a slice of a longer buffer counts
    # its span, not its numel)
    for steps, declined in ((2_097_153, True), (2_097_152, False)):
        bc = meta(1, 8, 128, steps)
        reason = scan_ops._scan_triton_supports(u, u, meta(2048, 128), bc, bc)
        assert (reason is not None and "int32" in reason) == declined
    sliced = meta(1, 8, 128, 4 * 2_097_152)[..., :1000]  # 1000 steps, strides of the long buffer
    assert "int32" in scan_ops._scan_triton_supports(u, u, meta(2048, 128), sliced, sliced)
    x = meta(1, 32768, dtype=torch.int8)
    for rows, declined in ((262144, True), (262143, False)):
        reason = ternary_ops._triton_supports(x, meta(rows, 8192, dtype=torch.uint8), 32768)
        assert (reason is not None and "int32" in reason) == declined
