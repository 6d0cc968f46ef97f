"""Triton GEMM for ternary linear layers: int8 activations x 2-bit packed weights, tl.dot with int32 accumulation.

Math: out[m, n] = sum_k x[m, k] * W_t[n, k], W_t unpacked in registers from the packed layout of
llmkernels/reference/ternary.py (byte (k // 256) * 64 + k % 64 of a row, bits 2 * ((k % 256) // 64)).
Epilogues: MODE_INT32 stores the exact accumulator; MODE_A8 scales by (s[m] * gamma) / 127 (+ bias) in fp32;
MODE_W2 takes fp16/bf16/fp32 x (fp32 accumulate, IEEE fp32 dot for fp32 x) and scales by gamma (+ bias).

Tiling: (BLOCK_M x BLOCK_N) output tile per program, K in steps of 64 (one s-slab of a packed block, so a
weight tile is 64 consecutive bytes of each row, read once and unpacked with a shift and a mask). Prefill is
bound by the int8 tensor cores; decode by the packed weight stream (K / 4 bytes a row).
Activations for act_bits=8 are quantised by the reference code (torch ops) so x_q is bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.ternary import quantize_activation_ref
from .launch import INTERPRET, launch

# constexpr globals: a compiled kernel may only read globals that are tl.constexpr (the interpreter reads any).
MODE_INT32, MODE_A8, MODE_W2 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _ternary_matmul_kernel(
    x_ptr, w_ptr, out_ptr, s_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # m * stride_om passes int32 for a 65536 x 128256 output (an LM head prefill): the tile's first row is an
    # int64 scalar step, offsets inside the tile stay int32 (a 2-D int64 pointer tile costs registers and ALU).
    tile_m = tl.arange(0, BLOCK_M)
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    x_tile = x_ptr + first_row * stride_xm
    if MODE == MODE_W2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_tile + tile_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0
        )
        byte = (offs_k // 256) * 64 + offs_k % 64  # < K_pad / 4 for every k < K_pad: in bounds
        shift = ((offs_k % 256) // 64) * 2
        wb = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :], mask=mask_n[:, None], other=0x55)
        codes = (wb.to(tl.int32) >> shift[None, :]) & 3
        if MODE == MODE_W2:
            w = (codes - 1).to(tl.float32).to(x.dtype)  # exact in every float dtype
            if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong (triton 3.8): do that one in fp32
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE_FP32 or UPCAST:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            w = (codes - 1).to(tl.int8)
            # out_dtype spelled out: triton < 3.7 does not infer int32 from the accumulator
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    out_ptrs = out_ptr + first_row * stride_om + (tile_m[:, None] * stride_om + offs_n[None, :])
    out_mask = mask_m[:, None] & mask_n[None, :]
    if MODE == MODE_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        gamma = tl.load(w_scale_ptr)
        if MODE == MODE_A8:
            s = tl.load(s_ptr + offs_m, mask=mask_m, other=1.0)
            y = acc.to(tl.float32) * ((s * gamma) / 127.0)[:, None]
        else:
            y = acc * gamma
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _launch(mode: tl.constexpr, x, w_packed, in_features, out, s=None, w_scale=None, bias=None) -> None:
    m, n = x.shape[0], w_packed.shape[0]
    if m == 0 or n == 0:
        return
    # decode: thin tiles over many programs (weight-stream bound); prefill: larger tiles for tensor-core reuse
    block_m, block_n, warps = (16, 64, 4) if m <= 16 else (64, 64, 4) if m <= 64 else (128, 128, 8)
    dummy = out  # never read: the constexpr flags switch those loads off
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    launch(_ternary_matmul_kernel, grid,
        x, w_packed, out, s if s is not None else dummy, w_scale if w_scale is not None else dummy,
        bias if bias is not None else dummy,
        m, n, in_features, x.stride(0), w_packed.stride(0), out.stride(0),
        MODE=mode.value, HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=warps,
    )  # fmt: skip


@torch.library.triton_op("llmkernels::ternary_matmul_int8_triton", mutates_args=())
def ternary_matmul_int8_triton(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x_q: (m, in_features) int8 contiguous -> int32 (m, out_features), exact."""
    out = torch.empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32, device=x_q.device)
    _launch(MODE_INT32, x_q, w_packed, in_features, out)
    return out


@torch.library.triton_op("llmkernels::ternary_linear_a8_triton", mutates_args=())
def ternary_linear_a8_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (Optional: what torch.library's schema inference reads)
    in_features: int,
) -> torch.Tensor:
    """x: (m, in_features) -> (m, out_features) in x's dtype, 8-bit activations."""
    x_q, s = quantize_activation_ref(x)
    out = torch.empty((x.shape[0], w_packed.shape[0]), dtype=x.dtype, device=x.device)
    _launch(MODE_A8, x_q, w_packed, in_features, out, s=s, w_scale=w_scale, bias=bias)
    return out


@torch.library.triton_op("llmkernels::ternary_linear_w2_triton", mutates_args=())
def ternary_linear_w2_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (Optional: what torch.library's schema inference reads)
    in_features: int,
) -> torch.Tensor:
    """x: (m, in_features) fp16/bf16/fp32 -> (m, out_features) in x's dtype, weight-only."""
    out = torch.empty((x.shape[0], w_packed.shape[0]), dtype=x.dtype, device=x.device)
    _launch(MODE_W2, x, w_packed, in_features, out, w_scale=w_scale, bias=bias)
    return out


# Explicit fakes: triton_op would otherwise trace the Python above with FakeTensors, which the CPU
# interpreter cannot launch (it copies tensor storages).
@ternary_matmul_int8_triton.register_fake
def _(x_q, w_packed, in_features):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32)


@ternary_linear_a8_triton.register_fake
def _(x, w_packed, w_scale, bias, in_features):
    return x.new_empty((x.shape[0], w_packed.shape[0]))


@ternary_linear_w2_triton.register_fake
def _(x, w_packed, w_scale, bias, in_features):
    return x.new_empty((x.shape[0], w_packed.shape[0]))
