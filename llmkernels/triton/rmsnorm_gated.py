"""Triton kernels of the gated RMSNorm (`llmkernels.rmsnorm_fn`, Mamba-2's norm), forward and backward.

Math per row and group of G channels (reference: llmkernels/reference/rmsnorm_gated.py): h = x (* silu(z) when the
gate comes first), r = 1 / sqrt(mean(h^2) + eps), y = h r w + b (* silu(z) when the gate comes after). fp32 inside.

Forward: one program per (row, group) holds the group (G rounded up to a power of two) in registers: one read of
x and z, one write. Backward: one program per (block of ROWS rows, group) recomputes h and r, writes dx and dz,
and keeps its rows' dweight / dbias sums in registers, written once as one partial row; the host adds the
partials (a fixed split: the sums do not depend on scheduling). What a GPU ran before: ~12 PyTorch ops, each a
pass over memory.

Imported lazily (only when the triton backend runs), so `import llmkernels` never imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.rmsnorm_gated import backward_through, grads_like, setup_context
from .launch import launch

MAX_GROUP = 16384  # channels a program holds in registers; larger groups take the reference
ROWS_PER_PROGRAM = 16  # backward: rows whose dweight / dbias one program sums before writing a partial


@triton.jit
def _gate(z):
    return z * tl.sigmoid(z)


@triton.jit
def rmsnorm_gated_fwd_kernel(X, Z, W, B, OUT, stride_x, stride_z, stride_out, G, eps,
                             HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                             BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * G + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < G
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        if not NORM_BEFORE_GATE:
            h = h * _gate(z)
    r = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / G + eps)
    y = h * r * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * _gate(z)
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def rmsnorm_gated_bwd_kernel(DOUT, X, Z, W, B, DX, DZ, DW_PARTS, DB_PARTS, rows, H, stride_dout, stride_x, stride_z,
                             G, eps, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    part = tl.program_id(0)
    cols = tl.program_id(1) * G + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < G
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = part.to(tl.int64) * ROWS + i
        m = mask & (row < rows)
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DOUT + row * stride_dout + cols, mask=m, other=0.0).to(tl.float32)
        h = x
        if HAS_Z:
            z = tl.load(Z + row * stride_z + cols, mask=m, other=0.0).to(tl.float32)
            s = tl.sigmoid(z)
            if not NORM_BEFORE_GATE:
                h = x * z * s
        # a row past the end (zeros) gets r = 0, not 1 / sqrt(eps): with eps = 0 that is inf, and its xhat NaN
        r = tl.where(row < rows, 1.0 / tl.sqrt(tl.where(row < rows, tl.sum(h * h, axis=0) / G + eps, 1.0)), 0.0)
        xhat = h * r
        if HAS_Z:
            if NORM_BEFORE_GATE:
                y0 = xhat * w
                if HAS_BIAS:
                    y0 = y0 + b
                dz = dy * y0 * s * (1.0 + z * (1.0 - s))
                tl.store(DZ + row * H + cols, dz.to(DZ.dtype.element_ty), mask=m)
                dy = dy * z * s
        dw += dy * xhat
        db += dy
        g = dy * w
        dh = r * (g - xhat * (tl.sum(g * xhat, axis=0) / G))
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dz = dh * x * s * (1.0 + z * (1.0 - s))
                tl.store(DZ + row * H + cols, dz.to(DZ.dtype.element_ty), mask=m)
                dh = dh * z * s
        tl.store(DX + row * H + cols, dh.to(DX.dtype.element_ty), mask=m)
    tl.store(DW_PARTS + part.to(tl.int64) * H + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTS + part.to(tl.int64) * H + cols, db, mask=mask)


def _block(group_size: int) -> int:
    return triton.next_power_of_2(max(group_size, 16))


def _warps(block: int) -> int:
    """Warps per program: ~16 channels of each live vector per thread (the backward keeps a dozen: more spill)."""
    return min(16, max(4, block // 512))


def _rows(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x with unit channel stride (rows at any stride), as the kernels read it (None stays None)."""
    return x if x is None or x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _row_stride(x: Optional[torch.Tensor]) -> int:
    if x is None:
        return 0
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


@torch.library.triton_op("llmkernels::rmsnorm_gated_fwd_triton", mutates_args={})
def rmsnorm_gated_fwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z: (rows, H) fp32 / fp16 / bf16, checked by rmsnorm_fn; weight, bias (H,). Returns (rows, H) in x's dtype."""
    x, z = _rows(x), _rows(z)
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    launch(rmsnorm_gated_fwd_kernel, (rows, hidden // group_size),
           x, z, weight.contiguous(), None if bias is None else bias.contiguous(), out,
           _row_stride(x), _row_stride(z), hidden, group_size, eps,
           HAS_Z=z is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
           BLOCK=_block(group_size), num_warps=_warps(_block(group_size)))  # fmt: skip
    return out


@torch.library.triton_op("llmkernels::rmsnorm_gated_bwd_triton", mutates_args={})
def rmsnorm_gated_bwd_triton(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dz) as llmkernels::rmsnorm_gated_bwd: dbias / dz empty without bias / z."""
    x, z, dout = _rows(x), _rows(z), _rows(dout)  # (any float dtype: loaded as fp32)
    rows, hidden = x.shape
    parts = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if z is not None:
        dz = torch.empty((rows, hidden), dtype=z.dtype, device=x.device)
    else:
        dz = x.new_empty(0, dtype=torch.float32)
    dw_parts = torch.zeros((parts, hidden), dtype=torch.float32, device=x.device)
    db_parts = torch.zeros((parts, hidden), dtype=torch.float32, device=x.device) if bias is not None else None
    if rows > 0 and hidden > 0:
        launch(rmsnorm_gated_bwd_kernel, (parts, hidden // group_size),
               dout, x, z, weight.contiguous(), None if bias is None else bias.contiguous(), dx,
               dz if z is not None else None, dw_parts, db_parts, rows, hidden, _row_stride(dout), _row_stride(x),
               _row_stride(z), group_size, eps,
               HAS_Z=z is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
               ROWS=ROWS_PER_PROGRAM, BLOCK=_block(group_size), num_warps=_warps(_block(group_size)))  # fmt: skip
    dweight = dw_parts.sum(0).to(weight.dtype)
    dbias = db_parts.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0, dtype=torch.float32)
    return dx, dweight, dbias, dz


# Explicit fakes: triton_op would otherwise trace the Python above with FakeTensors, which the CPU interpreter
# cannot launch.
@rmsnorm_gated_fwd_triton.register_fake
def _(x, weight, bias, z, eps, group_size, norm_before_gate):
    return x.new_empty(x.shape)


@rmsnorm_gated_bwd_triton.register_fake
def _(dout, x, weight, bias, z, eps, group_size, norm_before_gate):
    return grads_like(x, weight, bias, z)


rmsnorm_gated_fwd_triton.register_autograd(backward_through(rmsnorm_gated_bwd_triton), setup_context=setup_context)
