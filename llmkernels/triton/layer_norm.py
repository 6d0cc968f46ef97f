"""Triton kernels of the residual add + LayerNorm / RMSNorm (`llmkernels.layer_norm_fn` / `rms_norm_fn`), forward
and backward.

Math per row (reference: llmkernels/reference/layer_norm.py): s = x + residual in fp32, mean (LayerNorm) and
rstd = 1 / sqrt(var + eps), y = (s - mean) rstd w + b. Forward: one program per row holds the row (hidden rounded
up to a power of two) in registers: one read of x and residual, one write of y (and of residual_out when asked).
Backward: one program per block of ROWS rows recomputes s, mean and rstd, writes dx (and dresidual) and keeps its
rows' dweight / dbias sums in registers, written once as a partial row that the host adds (a fixed split: the
sums do not depend on scheduling).

Imported lazily (only when the triton backend runs), so `import llmkernels` never imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.layer_norm import backward_through, fwd_like, grads_like, setup_context
from .launch import launch
from .rmsnorm_gated import _block, _row_stride, _rows, _warps

MAX_HIDDEN = 16384  # channels a program holds in registers; wider rows take the reference
ROWS_PER_PROGRAM = 16  # backward: rows whose dweight / dbias one program sums before writing a partial


@triton.jit
def _row_stats(s, mask, H, eps, IS_RMS: tl.constexpr):
    """(mean, rstd) of a row s whose lanes past H are 0."""
    if IS_RMS:
        mean = 0.0
        var = tl.sum(s * s, axis=0) / H
    else:
        mean = tl.sum(s, axis=0) / H
        centred = tl.where(mask, s - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / H
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def add_norm_fwd_kernel(X, R, W, B, Y, RES_OUT, stride_x, stride_r, H, eps, HAS_RESIDUAL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, STORE_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(RES_OUT + row * H + cols, s.to(RES_OUT.dtype.element_ty), mask=mask)
    mean, rstd = _row_stats(s, mask, H, eps, IS_RMS)
    y = (s - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def add_norm_bwd_kernel(DY, DRES_OUT, X, R, W, DX, DRES, DW_PARTS, DB_PARTS, rows, H, stride_dy, stride_dro,
                        stride_x, stride_r, eps, HAS_DRES_OUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    part = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = part.to(tl.int64) * ROWS + i
        m = mask & (row < rows)
        s = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
        mean, rstd = _row_stats(s, m, H, eps, IS_RMS)
        # a row past the end (zeros) gets rstd 0, not 1 / sqrt(eps): with eps = 0 that is inf, and its xhat NaN
        rstd = tl.where(row < rows, rstd, 0.0)
        xhat = tl.where(m, (s - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        g = dy * w
        ds = g - xhat * (tl.sum(g * xhat, axis=0) / H)
        if not IS_RMS:
            ds -= tl.sum(g, axis=0) / H
        ds *= rstd
        if HAS_DRES_OUT:
            ds += tl.load(DRES_OUT + row * stride_dro + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + row * H + cols, ds.to(DX.dtype.element_ty), mask=m)
        if HAS_RESIDUAL:
            tl.store(DRES + row * H + cols, ds.to(DRES.dtype.element_ty), mask=m)
    tl.store(DW_PARTS + part.to(tl.int64) * H + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTS + part.to(tl.int64) * H + cols, db, mask=mask)


@torch.library.triton_op("llmkernels::add_norm_fwd_triton", mutates_args={})
def add_norm_fwd_triton(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    is_rms_norm: bool,
    residual_out_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (rows, H), checked by layer_norm_fn; weight, bias (H,). Returns (y, residual_out) as
    llmkernels::add_norm_fwd: residual_out empty without residual_out_dtype."""
    x, residual = _rows(x), _rows(residual)
    rows, hidden = x.shape
    y, res_out = fwd_like(x, residual_out_dtype)
    if y.numel() > 0:
        block = _block(hidden)
        launch(add_norm_fwd_kernel, (rows,), x, residual, weight.contiguous(),
               None if bias is None else bias.contiguous(), y, res_out if residual_out_dtype is not None else None,
               _row_stride(x), _row_stride(residual), hidden, eps, HAS_RESIDUAL=residual is not None,
               HAS_BIAS=bias is not None, STORE_RESIDUAL=residual_out_dtype is not None, IS_RMS=is_rms_norm,
               BLOCK=block, num_warps=_warps(block))  # fmt: skip
    return y, res_out


@torch.library.triton_op("llmkernels::add_norm_bwd_triton", mutates_args={})
def add_norm_bwd_triton(
    dy: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    is_rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dbias) as llmkernels::add_norm_bwd: dresidual / dbias empty without them."""
    x, residual, dy, dresidual_out = _rows(x), _rows(residual), _rows(dy), _rows(dresidual_out)
    rows, hidden = x.shape
    dx, dres, _, _ = grads_like(x, residual, weight, bias)
    parts = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dw_parts = torch.zeros((parts, hidden), dtype=torch.float32, device=x.device)
    db_parts = torch.zeros((parts, hidden), dtype=torch.float32, device=x.device) if bias is not None else None
    if rows > 0 and hidden > 0:
        block = _block(hidden)
        launch(add_norm_bwd_kernel, (parts,), dy, dresidual_out, x, residual, weight.contiguous(), dx,
               dres if residual is not None else None, dw_parts, db_parts, rows, hidden, _row_stride(dy),
               _row_stride(dresidual_out), _row_stride(x), _row_stride(residual), eps,
               HAS_DRES_OUT=dresidual_out is not None, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
               IS_RMS=is_rms_norm, ROWS=ROWS_PER_PROGRAM, BLOCK=block, num_warps=_warps(block))  # fmt: skip
    dweight = dw_parts.sum(0).to(weight.dtype)
    dbias = db_parts.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0, dtype=torch.float32)
    return dx, dres, dweight, dbias


# Explicit fakes: triton_op would otherwise trace the Python above with FakeTensors, which the CPU interpreter
# cannot launch.
@add_norm_fwd_triton.register_fake
def _(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype):
    return fwd_like(x, residual_out_dtype)


@add_norm_bwd_triton.register_fake
def _(dy, dresidual_out, x, residual, weight, bias, eps, is_rms_norm):
    return grads_like(x, residual, weight, bias)


add_norm_fwd_triton.register_autograd(backward_through(add_norm_bwd_triton), setup_context=setup_context)
