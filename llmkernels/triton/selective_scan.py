"""Triton kernels of Mamba's selective scan: the decode step (state update) and the forward scan.

Math (per batch b, channel d, state index n; dt = softplus(dt + dt_bias) when asked):
    x[n] <- exp(dt * A[d, n]) * x[n] + dt * B[n] * u        (B, C of channel d's group d // (dim // ngroups))
    y = sum_n C[n] * x[n] + D[d] * u,   y <- y * silu(z) when z is given
The state update applies this once to a stored state, in place; the scan applies it for t = 0 .. seqlen - 1
from initial_state (or zeros) and returns every y_t and the last state. Arithmetic is fp32 throughout.

Tiling: one program per (block of BLOCK_D channels, batch) holds the (BLOCK_D, BLOCK_N) state tile in
registers, dstate being the inner block dim (BLOCK_N = dstate rounded up to a power of two). The scan walks
time sequentially, one step per loop iteration: simple, and on a GPU memory-bound, since each step reads
BLOCK_D elements of u, delta, z and a (dstate,) or (BLOCK_D, dstate) slice of B and C, all of which stay in
L1/L2 between neighbouring timesteps. The scan's backward is not a Triton kernel: its autograd formula calls the
C++ llmkernels::selective_scan_bwd of the inputs' device when the build has it, else autograd through the reference.

Imported lazily (only when the triton backend runs), so `import llmkernels` never imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks, _ext
from ..reference.selective_scan import selective_scan_ref
from .launch import launch

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _softplus(x):
    """log(1 + e^x), and x above 20 (torch's and mamba_ssm's threshold).

    log1p(y) = log(1 + y) * y / ((1 + y) - 1) keeps full relative precision for tiny y = e^x, where the plain
    log(1 + y) would lose it to the rounding of 1 + y.
    """
    y = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + y
    ratio = tl.where(w == 1.0, 1.0, y / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x <= 20.0, tl.log(w) * ratio, x)


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
    dim, dstate, channels_per_group,
    stride_state_b, stride_state_d, stride_state_n,
    stride_x_b, stride_x_d, stride_dt_b, stride_dt_d, stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_D, stride_z_b, stride_z_d, stride_bias, stride_out_b, stride_out_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    STATE_IDX=None, state_rows=None,  # state_batch_indices (batch,) int32 and the state's rows; None: row b
):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b * stride_state_b passes int32 for a (2048, 8192, 128) state
    s_row = b
    live = True
    if STATE_IDX is not None:
        # An index outside the state's rows (negative: a pad slot) leaves row b out: no state access, output 0.
        # (Never clamped into range: that row would belong to another request.)
        s_row = tl.load(STATE_IDX + b).to(tl.int64)
        live = (s_row >= 0) & (s_row < state_rows)
        s_row = tl.where(live, s_row, 0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < dstate)[None, :]
    group = offs_d // channels_per_group  # a block of channels may straddle groups

    state_ptrs = (state_ptr + s_row * stride_state_b + offs_d[:, None] * stride_state_d
                  + offs_n[None, :] * stride_state_n)  # fmt: skip
    state = tl.load(state_ptrs, mask=mask & live, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * stride_x_b + offs_d * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dt_b + offs_d * stride_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask, other=0.0)
    bc_rows = group[:, None]
    B = tl.load(B_ptr + b * stride_B_b + bc_rows * stride_B_g + offs_n[None, :] * stride_B_n, mask=mask, other=0.0)
    C = tl.load(C_ptr + b * stride_C_b + bc_rows * stride_C_g + offs_n[None, :] * stride_C_n, mask=mask, other=0.0)

    state = state * tl.exp2(dt[:, None] * A.to(tl.float32) * LOG2E) + (dt * x)[:, None] * B.to(tl.float32)
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask & live)
    y = tl.sum(state * C.to(tl.float32), axis=1)  # the fp32 state, before rounding to the state's dtype
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d * stride_D, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        y *= _silu(tl.load(z_ptr + b * stride_z_b + offs_d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32))
    y = tl.where(live, y, 0.0)
    tl.store(out_ptr + b * stride_out_b + offs_d * stride_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, seq_idx_ptr, out_ptr, last_ptr,
    dim, dstate, seqlen, B_channels_per_group, C_channels_per_group,
    stride_u_b, stride_u_d, stride_u_t, stride_delta_b, stride_delta_d, stride_delta_t,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_B_t, stride_C_b, stride_C_g, stride_C_n, stride_C_t,
    stride_D, stride_z_b, stride_z_d, stride_z_t, stride_bias,
    stride_init_b, stride_init_d, stride_init_n, stride_out_b, stride_out_d, stride_out_t,
    stride_last_b, stride_last_d, stride_last_n, stride_seq_b, stride_seq_t,
    B_CONST: tl.constexpr, C_CONST: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    # int64 offsets: batch * dim * seqlen passes 2^31 (8 x 5120 x 65536), and so can dim * seqlen or, for a
    # (batch, seqlen, dim)-strided input, seqlen * dim.
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < dstate)[None, :]
    offs_d64 = offs_d.to(tl.int64)

    A2 = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    # Constant B/C are (dim, dstate) and loaded once; per-token ones are (batch, ngroups, dstate, seqlen) and their
    # pointers (per channel's group) advance by one timestep per iteration.
    if B_CONST:
        B_ptrs = B_ptr + offs_d[:, None] * stride_B_g + offs_n[None, :] * stride_B_n
        B_tile = tl.load(B_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        B_ptrs = B_ptr + b * stride_B_b + (offs_d // B_channels_per_group)[:, None] * stride_B_g
        B_ptrs += offs_n[None, :] * stride_B_n
    if C_CONST:
        C_ptrs = C_ptr + offs_d[:, None] * stride_C_g + offs_n[None, :] * stride_C_n
        C_tile = tl.load(C_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        C_ptrs = C_ptr + b * stride_C_b + (offs_d // C_channels_per_group)[:, None] * stride_C_g
        C_ptrs += offs_n[None, :] * stride_C_n
    if HAS_D:
        D = tl.load(D_ptr + offs_d * stride_D, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_INIT:
        init_ptrs = init_ptr + b * stride_init_b + offs_d[:, None] * stride_init_d + offs_n[None, :] * stride_init_n
        state = tl.load(init_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    u_ptrs = u_ptr + b * stride_u_b + offs_d64 * stride_u_d
    delta_ptrs = delta_ptr + b * stride_delta_b + offs_d64 * stride_delta_d
    out_ptrs = out_ptr + b * stride_out_b + offs_d64 * stride_out_d
    if HAS_SEQ_IDX:
        # step 0's own: step 0 continues the initial state (masked: seqlen may be 0)
        seq_prev = tl.load(seq_idx_ptr + b * stride_seq_b, mask=seqlen > 0, other=0)
    for t_ in range(seqlen):
        t = tl.cast(t_, tl.int64)
        if HAS_SEQ_IDX:  # packed sequences: a new one starts from a zero state
            seq = tl.load(seq_idx_ptr + b * stride_seq_b + t * stride_seq_t)
            state = tl.where(seq == seq_prev, state, 0.0)
            seq_prev = seq
        u = tl.load(u_ptrs + t * stride_u_t, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptrs + t * stride_delta_t, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = _softplus(dt)
        if not B_CONST:
            B_tile = tl.load(B_ptrs + t * stride_B_t, mask=mask, other=0.0).to(tl.float32)
        if not C_CONST:
            C_tile = tl.load(C_ptrs + t * stride_C_t, mask=mask, other=0.0).to(tl.float32)
        state = state * tl.exp2(dt[:, None] * A2) + (dt * u)[:, None] * B_tile
        y = tl.sum(state * C_tile, axis=1)
        if HAS_D:
            y += D * u
        if HAS_Z:
            z_ptrs = z_ptr + b * stride_z_b + offs_d64 * stride_z_d + t * stride_z_t  # z_ptr is None without z
            y *= _silu(tl.load(z_ptrs, mask=mask_d, other=0.0).to(tl.float32))
        tl.store(out_ptrs + t * stride_out_t, y.to(out_ptr.dtype.element_ty), mask=mask_d)

    last_ptrs = last_ptr + b * stride_last_b + offs_d[:, None] * stride_last_d + offs_n[None, :] * stride_last_n
    tl.store(last_ptrs, state, mask=mask)


def _blocks(dim: int, dstate: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): all of dstate, and channels so that a state tile holds <= 1024 fp32 values."""
    block_n = max(2, triton.next_power_of_2(dstate))  # >= 2: no single-element aranges
    block_d = max(2, min(triton.next_power_of_2(dim), 1024 // block_n, 64))
    return block_d, block_n


def _strides_or_zeros(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.triton_op("llmkernels::selective_state_update_triton", mutates_args={"state"})
def selective_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    state_batch_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One decode step; updates state in place and returns y (batch, dim) in x's dtype.

    state: (batch, dim, dstate) fp32/fp16/bf16, any strides; x, dt, z: (batch, dim); A: (dim, dstate), or (dim,) one
    value per channel (read with a dstate stride of 0); B, C: (batch, dstate) or (batch, ngroups, dstate); D,
    dt_bias: (dim,). state_batch_indices: (batch,) int32 or
    None; given, the state has any number of rows and row b of x steps row state_batch_indices[b], or, for an
    index outside the rows (negative: a pad slot), nothing (its output is 0).
    """
    fn = "selective_state_update"
    _checks.check_tensor(fn, "x", x, ndim=2, dtypes=_FLOAT_TYPES)
    batch, dim = x.shape
    _checks.check_tensor(fn, "A", A, device=x.device)
    _checks.check_tensor(fn, "state", state, ndim=3, dtypes=_FLOAT_TYPES, device=x.device)
    dstate = A.shape[1] if A.dim() == 2 else state.shape[2]
    _checks.check_shape(fn, "A", A, (dim, dstate) if A.dim() == 2 else (dim,))
    a_strides = A.stride() if A.dim() == 2 else (A.stride(0), 0)
    _checks.check_shape(fn, "state", state, (batch if state_batch_indices is None else state.shape[0], dim, dstate))
    if state_batch_indices is not None:
        _checks.check_tensor(fn, "state_batch_indices", state_batch_indices, ndim=1, dtypes=(torch.int32,),
                             device=x.device)  # fmt: skip
        _checks.check_shape(fn, "state_batch_indices", state_batch_indices, (batch,))
        state_batch_indices = state_batch_indices.contiguous()  # (the kernel reads row b's index at [b])
    _checks.check_tensor(fn, "dt", dt, device=x.device)
    _checks.check_shape(fn, "dt", dt, (batch, dim))
    _checks.check_tensor(fn, "B", B, device=x.device)
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    ngroups = B.shape[1]
    if B.dim() != 3 or ngroups < 1 or dim % ngroups:
        raise ValueError(
            f"llmkernels.{fn}: B must be (batch, dstate) or (batch, ngroups, dstate) with ngroups "
            f"dividing dim = {dim}, got shape {tuple(B.shape)}"
        )
    _checks.check_shape(fn, "B", B, (batch, ngroups, dstate))
    _checks.check_shape(fn, "C", C, (batch, ngroups, dstate))
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _checks.check_shape(fn, name, t, (dim,))
    if z is not None:
        _checks.check_shape(fn, "z", z, (batch, dim))

    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d, block_n = _blocks(dim, dstate)
    grid = (triton.cdiv(dim, block_d), batch)
    launch(selective_state_update_kernel, grid,
        state, x, dt, A, B, C, D, z, dt_bias, out,
        dim, dstate, dim // ngroups,
        *state.stride(), *x.stride(), *dt.stride(), *a_strides, *B.stride(), *C.stride(),
        *_strides_or_zeros(D, 1), *_strides_or_zeros(z, 2), *_strides_or_zeros(dt_bias, 1), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n,
        STATE_IDX=state_batch_indices, state_rows=None if state_batch_indices is None else state.shape[0],
    )  # fmt: skip
    return out


@torch.library.triton_op("llmkernels::selective_scan_fwd_triton", mutates_args={})
def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    initial_state: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward selective scan: (out (batch, dim, seqlen) in u's dtype, last_state (batch, dim, dstate) fp32).

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (dim, dstate), (batch, dstate, seqlen) or
    (batch, ngroups, dstate, seqlen); D, delta_bias: (dim,); initial_state: (batch, dim, dstate); seq_idx
    (batch, seqlen) int32 (a state restarts from zero where it changes). Any strides.
    """
    fn = "selective_scan_fn"
    _checks.check_tensor(fn, "u", u, ndim=3, dtypes=_FLOAT_TYPES)
    batch, dim, seqlen = u.shape
    _checks.check_tensor(fn, "delta", delta, device=u.device)
    _checks.check_shape(fn, "delta", delta, (batch, dim, seqlen))
    _checks.check_tensor(fn, "A", A, ndim=2, device=u.device)
    dstate = A.shape[1]
    _checks.check_shape(fn, "A", A, (dim, dstate))
    bc = {}
    for name, M in (("B", B), ("C", C)):
        _checks.check_tensor(fn, name, M, device=u.device)
        if M.dim() == 2:
            _checks.check_shape(fn, name, M, (dim, dstate))
            bc[name] = (M.unsqueeze(0).unsqueeze(-1), True, dim)  # strides (., d, n, .): see B_CONST in the kernel
            continue
        if M.dim() == 3:
            M = M.unsqueeze(1)
        ngroups = M.shape[1] if M.dim() == 4 else 0
        if M.dim() != 4 or ngroups < 1 or dim % ngroups:
            raise ValueError(
                f"llmkernels.{fn}: {name} must be (dim, dstate), (batch, dstate, seqlen) or (batch, "
                f"ngroups, dstate, seqlen) with ngroups dividing dim = {dim}, got shape {tuple(M.shape)}"
            )
        _checks.check_shape(fn, name, M, (batch, ngroups, dstate, seqlen))
        bc[name] = (M, False, dim // ngroups)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _checks.check_shape(fn, name, t, (dim,))
    if z is not None:
        _checks.check_shape(fn, "z", z, (batch, dim, seqlen))
    if initial_state is not None:
        _checks.check_shape(fn, "initial_state", initial_state, (batch, dim, dstate))
    if seq_idx is not None:
        _checks.check_tensor(fn, "seq_idx", seq_idx, ndim=2, dtypes=(torch.int32,), device=u.device)
        _checks.check_shape(fn, "seq_idx", seq_idx, (batch, seqlen))

    out = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)
    if batch * dim == 0:
        return out, last_state
    (Bt, B_const, B_cpg), (Ct, C_const, C_cpg) = bc["B"], bc["C"]
    block_d, block_n = _blocks(dim, dstate)
    grid = (triton.cdiv(dim, block_d), batch)
    launch(selective_scan_fwd_kernel, grid,
        u, delta, A, Bt, Ct, D, z, delta_bias, initial_state, seq_idx, out, last_state,
        dim, dstate, seqlen, B_cpg, C_cpg,
        *u.stride(), *delta.stride(), *A.stride(), *Bt.stride(), *Ct.stride(),
        *_strides_or_zeros(D, 1), *_strides_or_zeros(z, 3), *_strides_or_zeros(delta_bias, 1),
        *_strides_or_zeros(initial_state, 3), *out.stride(), *last_state.stride(), *_strides_or_zeros(seq_idx, 2),
        B_CONST=B_const, C_CONST=C_const, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, HAS_INIT=initial_state is not None, SOFTPLUS=delta_softplus,
        HAS_SEQ_IDX=seq_idx is not None, BLOCK_D=block_d, BLOCK_N=block_n,
    )  # fmt: skip
    return out, last_state


# Explicit fakes: triton_op would otherwise trace the Python above with FakeTensors, which the CPU interpreter
# cannot launch (it copies tensor storages).
@selective_state_update_triton.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    return x.new_empty(x.shape)


@selective_scan_triton.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx=None):
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx = ctx.saved_tensors
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if dout is None:
        dout = torch.zeros_like(u)
    if _ext.has_kernel("selective_scan_bwd", u.device.type.upper()):
        grads = torch.ops.llmkernels.selective_scan_bwd(
            dout.contiguous(), _contiguous(dlast_state), *(_contiguous(t) for t in inputs[:8]), ctx.delta_softplus,
            _contiguous(initial_state), _contiguous(seq_idx),
        )  # fmt: skip
        grads = [g if t is not None else None for g, t in zip(grads, inputs)]
    else:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
            lu, ldelta, lA, lB, lC, lD, lz, lbias, linit = leaves
            out, last = selective_scan_ref(lu, ldelta, lA, lB, lC, lD, lz, lbias, ctx.delta_softplus, True, linit,
                                           seq_idx)  # fmt: skip
            present = [t for t in leaves if t is not None]
            outs, grad_outs = [out], [dout]
            if dlast_state is not None:
                outs.append(last)
                grad_outs.append(dlast_state)
            found = iter(torch.autograd.grad(outs, present, grad_outs, allow_unused=True))
            grads = [next(found) if t is not None else None for t in leaves]
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = grads
    return du, ddelta, dA, dB, dC, dD, dz, dbias, None, dinit, None


selective_scan_triton.register_autograd(_scan_backward, setup_context=_scan_setup_context)
