"""Triton forward of Mamba-2's chunked scan (SSD): the GPU route of mamba_chunk_scan_combined.

The math and the chunk decomposition are those of ops/mamba_ssd_chunked.py (read its doc first). There, each
chunk's (Q x Q) decay-weighted scores are materialised per head and pass through memory several times. Here one
program per (batch * head, chunk, block of headdim) keeps them in registers:

    acc  = exp(cum_i) * C_i . H_in                          tl.dot over dstate blocks (H_in: the state entering the
                                                            chunk, from PyTorch below)
    acc += sum over key blocks j of  W_ij x_j,  W_ij = (C_i . B_j) exp(cum_i - cum_j) dt_j  for j <= i
    y    = (acc + D x_i) * silu(z_i)

so y is written once and the per-head (Q x Q) tiles never reach memory. What feeds it stays in PyTorch, all on
(batch, seqlen, heads)-sized tensors or one product per chunk: the within-chunk cumulative log-decay, C_i . B_j per
(chunk, group) (the heads of a group share it: computed once, not per head and headdim block), the chunk states
(sum_j exp(cum_end - cum_j) dt_j B_j x_j^T as B^T @ (weighted x) with the group's heads side by side, so x is read
in its own layout) and the states entering each chunk (ops/mamba_ssd_chunked._pass_states).

Precision: C . B per (chunk, group) on the host in fp32 (once for the group's heads); the kernel's products (W x,
C . H) in IEEE fp32 for fp32 inputs and TF32 for 16-bit ones (their outputs round to 7-10 bits anyway). The backward
recomputes through the PyTorch route's autograd (ops/mamba_ssd_chunked.py).

Imported lazily (only for CUDA tensors or under TRITON_INTERPRET=1), so `import llmkernels` never imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode

from ..ops import mamba_ssd_chunked as torch_route
from .launch import INTERPRET, launch

LOG2E = tl.constexpr(1.4426950408889634)
CHUNK = 64  # tokens per chunk = rows per program (tl.dot needs >= 16)


# The tiles' dots multiply fp32 values (scores, states): exact for fp32 inputs; for 16-bit ones TF32 where its
# rounding stays under the output's (bf16: 8 bits), three TF32 products (~fp32) for fp16, whose 11-bit outputs one
# TF32 product (its operands truncated, not rounded: no cvt.rna) missed by 2x (a review's emulation, no GPU here).
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}

@triton.jit
def ssd_chunk_output_kernel(
    x_ptr, dt_ptr, cum_ptr, CB_ptr, C_ptr, H_ptr, D_ptr, z_ptr, seq_ptr, seq_end_ptr, y_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group,
    sx_b, sx_t, sx_h, sx_p,
    sdt_b, sdt_h, sdt_t,
    scum_b, scum_h, scum_t,
    sS_b, sS_c, sS_g, sS_i, sS_j,
    sC_b, sC_t, sC_g, sC_n,
    sH_b, sH_h, sH_c, sH_n, sH_p,
    sD_h, sD_p,
    sz_b, sz_t, sz_h, sz_p,
    sseq_b, sseq_t, sse_b, sse_c,
    sy_b, sy_t, sy_h, sy_p,
    CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # int64 indices: offsets such as b * sH_b pass 2^31 at batch 8 x 16k tokens x 80 heads x dstate 256
    bh = tl.program_id(0).to(tl.int64)  # (batch * nheads on axis 0: CUDA caps axes 1 and 2 at 65535)
    chunk = tl.program_id(1).to(tl.int64)
    b = bh // nheads
    h = bh % nheads
    g = h // heads_per_group
    t0 = chunk * CHUNK
    offs_i = t0 + tl.arange(0, CHUNK)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_i = offs_i < seqlen
    in_p = offs_p < headdim

    # dt and cum (the log-decay from the chunk's start) per (batch, head, padded seqlen)
    cum_i = tl.load(cum_ptr + b * scum_b + h * scum_h + offs_i * scum_t, mask=in_i, other=0.0)
    if HAS_SEQ:
        seq_i = tl.load(seq_ptr + b * sseq_b + offs_i * sseq_t, mask=in_i, other=-1)

    # From the state entering the chunk: exp(cum_i) C_i . H_in, for the rows of the sequence that state belongs to.
    acc = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < dstate
        Ci = tl.load(C_ptr + b * sC_b + offs_i[:, None] * sC_t + g * sC_g + offs_n[None, :] * sC_n,
                     mask=in_i[:, None] & in_n[None, :], other=0.0).to(tl.float32)  # fmt: skip
        Hk = tl.load(H_ptr + b * sH_b + h * sH_h + chunk * sH_c + offs_n[:, None] * sH_n + offs_p[None, :] * sH_p,
                     mask=in_n[:, None] & in_p[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(Ci, Hk, input_precision=PRECISION)
    carry = in_i
    if HAS_SEQ:
        carry = carry & (seq_i == tl.load(seq_end_ptr + b * sse_b + chunk * sse_c))
    # a select, not a product: an inf state must not become NaN in the rows of another sequence
    acc = tl.where(carry[:, None], acc * tl.exp2(cum_i * LOG2E)[:, None], 0.0)

    # Within the chunk: W_ij x_j over key blocks; W_ij = (C_i . B_j) exp(cum_i - cum_j) dt_j where j <= i.
    for j0 in range(0, CHUNK, BLOCK_J):
        offs_j = t0 + j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < seqlen
        # C_i . B_j: the group's, computed once per (chunk, group) on the host, not per head and headdim block
        scores = tl.load(CB_ptr + b * sS_b + chunk * sS_c + g * sS_g + (offs_i - t0)[:, None] * sS_i
                         + (offs_j - t0)[None, :] * sS_j, mask=in_i[:, None] & in_j[None, :], other=0.0)  # fmt: skip
        cum_j = tl.load(cum_ptr + b * scum_b + h * scum_h + offs_j * scum_t, mask=in_j, other=0.0)
        dt_j = tl.load(dt_ptr + b * sdt_b + h * sdt_h + offs_j * sdt_t, mask=in_j, other=0.0)
        keep = (offs_i[:, None] >= offs_j[None, :]) & in_j[None, :]
        if HAS_SEQ:
            seq_j = tl.load(seq_ptr + b * sseq_b + offs_j * sseq_t, mask=in_j, other=-2)
            keep = keep & (seq_i[:, None] == seq_j[None, :])
        # exponent -inf off the band (above the diagonal it could overflow), and a select: a non-finite score of
        # another sequence's key must not become NaN here
        decay = tl.exp2(tl.where(keep, (cum_i[:, None] - cum_j[None, :]) * LOG2E, float("-inf")))
        w = tl.where(keep, scores * decay * dt_j[None, :], 0.0)
        xj = tl.load(x_ptr + b * sx_b + offs_j[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p,
                     mask=in_j[:, None] & in_p[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.dot(w, xj, input_precision=PRECISION)

    mask = in_i[:, None] & in_p[None, :]
    if HAS_D:
        xi = tl.load(x_ptr + b * sx_b + offs_i[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p,
                     mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.load(D_ptr + h * sD_h + offs_p * sD_p, mask=in_p, other=0.0)[None, :] * xi
    if HAS_Z:
        zi = tl.load(z_ptr + b * sz_b + offs_i[:, None] * sz_t + h * sz_h + offs_p[None, :] * sz_p,
                     mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        acc *= zi / (1.0 + tl.exp2(-zi * LOG2E))
    tl.store(y_ptr + b * sy_b + offs_i[:, None] * sy_t + h * sy_h + offs_p[None, :] * sy_p,
             acc.to(y_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def _strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


@torch.library.triton_op("llmkernels::ssd_chunked_fwd_triton", mutates_args={})
def ssd_chunked_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y like x, final states (batch, nheads, headdim, dstate) fp32): ops/mamba_ssd_chunked.ssd_chunked's contract
    (dt processed fp32 (batch, seqlen, nheads); seq_idx renumbered int32 or None; inputs checked by the caller)."""
    with torch_route.without_autocast(x.device):
        return _forward(x, dt, A, B, C, D, z, initial_states, seq_idx)


def _forward(x, dt, A, B, C, D, z, initial_states, seq_idx):
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[3]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if batch * nheads * headdim == 0 or seqlen == 0:
        final = torch.zeros(batch, nheads, headdim, dstate, dtype=torch.float32, device=x.device)
        if initial_states is not None and seqlen == 0:
            final.copy_(initial_states)
        return y, final
    # The per-token decays, the chunk states and the states entering each chunk: PyTorch, shared with that route.
    k = torch_route.Chunked(x, dt, A, B, initial_states, seq_idx, CHUNK)
    entering, final = k.states()  # (b, g, hg, c, n, p), (b, g, hg, n, p)
    entering = entering.reshape(batch, nheads, k.nchunks, dstate, headdim)
    dt_h, cum = k.dt.reshape(batch, nheads, -1), k.cum.reshape(batch, nheads, -1)  # (batch, head, padded seqlen)
    scores = k.scores(k.chunk_major(C))  # (b, c, g, Q, Q) fp32
    seq, seq_end, hg, nchunks, Q = k.seq, k.seq_end, k.hg, k.nchunks, CHUNK

    D_hp = None
    if D is not None:
        D_hp = (D.float() if D.dim() == 2 else D.float()[:, None].expand(nheads, headdim)).contiguous()
    block_p = min(64, max(16, triton.next_power_of_2(headdim)))
    block_n = min(64, max(16, triton.next_power_of_2(dstate)))
    grid = (batch * nheads, nchunks, triton.cdiv(headdim, block_p))
    launch(ssd_chunk_output_kernel, grid,
        x, dt_h, cum, scores, C, entering, D_hp, z, seq, seq_end, y,
        seqlen, nheads, headdim, dstate, hg,
        *x.stride(), *dt_h.stride(), *cum.stride(), *scores.stride(), *C.stride(), *entering.stride(),
        *_strides(D_hp, 2), *_strides(z, 4), *_strides(seq, 2), *_strides(seq_end, 2), *y.stride(),
        CHUNK=Q, BLOCK_J=32, BLOCK_P=block_p, BLOCK_N=block_n, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_SEQ=seq_idx is not None, PRECISION=_DOT_PRECISION[x.dtype],
        num_warps=8 if x.dtype == torch.float32 else 4,  # (IEEE fp32 dots: 113-117 registers at 8 warps, 181 at 4)
    )  # fmt: skip
    # (a fresh tensor, as the fake's: final is a view into the last group's product)
    return y, final.transpose(-1, -2).clone(memory_format=torch.contiguous_format).view(batch, nheads, headdim, dstate)


@ssd_chunked_triton.register_fake
def _(x, dt, A, B, C, D, z, initial_states, seq_idx):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), dtype=torch.float32))  # fmt: skip


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy, dfinal):
    """Recompute through the PyTorch route and differentiate it (the (Q x Q) tiles live only during this)."""
    x, dt, A, B, C, D, z, initial_states, seq_idx = ctx.saved_tensors
    inputs = (x, dt, A, B, C, D, z, initial_states)
    with torch.enable_grad():  # (only the inputs whose gradient is asked for become leaves)
        leaves = [t.detach().requires_grad_() if t is not None and ctx.needs_input_grad[i] else t
                  for i, t in enumerate(inputs)]  # fmt: skip
        y, final = torch_route._ssd_chunked(*leaves, seq_idx, torch_route.CHUNK)
        present = [t for t in leaves if t is not None and t.requires_grad]
        outs, grads_out = [], []
        for out, grad in ((y, dy), (final, dfinal)):
            if grad is not None and out.requires_grad:  # (an empty sequence's y is no function of anything)
                outs.append(out)
                grads_out.append(grad)
        found = iter(torch.autograd.grad(outs, present, grads_out, allow_unused=True) if outs and present else [])
        grads = [next(found, None) if t is not None and t.requires_grad else None for t in leaves]
    return (*grads, None)


ssd_chunked_triton.register_autograd(_backward, setup_context=_setup_context)

if INTERPRET:
    # triton_op decomposes into its launches when AOTAutograd functionalizes a graph; interpreted kernels cannot be
    # traced, so under the interpreter the op stays opaque there (as flash_attn.py's do).
    ssd_chunked_triton.register_torch_dispatch(FunctionalTensorMode, lambda mode, op, types, args, kwargs:
                                               mode.__torch_dispatch__(op, types, args, kwargs))  # fmt: skip
