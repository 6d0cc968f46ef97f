"""mamba_chunk_scan_combined: Mamba-2's scan (SSD) with mamba_ssm's signature, as llmkernels' selective scan over
the flattened (head, headdim) channels. Definition: llmkernels/reference/mamba_chunk_scan.py.

    import llmkernels
    y = llmkernels.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias,
                                             dt_softplus=True)   # x (b, L, h, p), B / C (b, L, g, n)

Mamba-2's recurrence is Mamba's with one scalar decay per head: channel (h, p) of the flattened (b, h * p, L) layout
is selective_scan_fn's channel with delta = dt[:, :, h], A[h] along every state entry and B / C of group
h // (nheads / ngroups), which is exactly the grouped B / C layout the scan kernels already take. So every backend
of selective_scan_fn (C++ CPU, CUDA C++, Triton, reference) runs it, differentiably (gradients reach x, dt, A, B,
C, D, z, dt_bias and initial_states through the layout changes), with the kernels' own chunking along the sequence:
chunk_size is accepted and checked but does not change the result. That "scan" route is the CPU's. On a GPU the op
takes the "chunked" route instead (ops/mamba_ssd_chunked.py: SSD's chunked matrix products in PyTorch ops, one exp
per head and token pair; see ROUTE), because the GPU scan kernels take an exp per state entry where one per head
would do (the CPU kernels detect the per-head A and take one per step). The scan route also changes layouts: x, z
and the output are copied once each on a GPU, and dt is spread over the channels (an x-sized tensor, where
mamba_ssm keeps (batch, seqlen, nheads)), except on the C++ CPU kernels, which take dt per head.
See docs/GPU_SESSION.md.
Packed sequences (seq_idx) reach the scan kernels, which restart the state where seq_idx changes; the per-sequence
final states (return_varlen_states with cu_seqlens) are computed in closed form, one small matrix product per
sequence (sum over its tokens of exp(A * dt after t) dt_t x_t B_t^T).
"""

from __future__ import annotations

import numbers
import os

import torch

from .. import _checks
from .._backend import BackendError, measured_cuda_order, requested_backend, triton_unavailable_reason
from .._checks import check_shape, check_tensor
from ..reference.mamba_chunk_scan import processed_dt
from .mamba_ssd_chunked import ssd_chunked
from .selective_scan import MAX_DSTATE, checked_seq_idx, scan_dispatcher, selective_scan_fn

# How the scan runs: "scan" (selective_scan_fn's kernels over the flattened channels), "chunked" (matrix products
# over chunks in PyTorch ops: ops/mamba_ssd_chunked.py), "chunked-triton" (the same with the (Q x Q) tiles fused in
# a Triton kernel: triton/mamba_ssd.py; CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or "auto": on a GPU the
# route measured fastest there (see _route), until measured "chunked", since the scan kernels take an exp per state
# entry on the SFU (docs/GPU_SESSION.md; the Triton kernel has never run on a GPU, so it is not the default yet);
# elsewhere the scan (on the CPU the C++ scan measured 1.2-2.5x faster than the chunked products); a backend forced
# with use_backend / LLMKERNELS_BACKEND runs its own scan kernels.
ROUTE = os.environ.get("LLMKERNELS_MAMBA2_ROUTE", "auto")
_ROUTES = ("auto", "scan", "chunked", "chunked-triton")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit) -> None:
    check_tensor(fn, "x", x, ndim=4, dtypes=_DTYPES)
    batch, seqlen, nheads, headdim = x.shape
    dev = x.device
    check_tensor(fn, "dt", dt, ndim=3, dtypes=_DTYPES, device=dev)
    check_shape(fn, "dt", dt, (batch, seqlen, nheads))
    check_tensor(fn, "A", A, ndim=1, dtypes=_DTYPES, device=dev)
    check_shape(fn, "A", A, (nheads,))
    for name, t in (("B", B), ("C", C)):
        check_tensor(fn, name, t, ndim=4, dtypes=_DTYPES, device=dev)
    ngroups, dstate = B.shape[2], B.shape[3]
    if B.shape[:2] != (batch, seqlen) or ngroups < 1 or nheads % ngroups != 0 or not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"llmkernels.{fn}: B must be (batch, seqlen, ngroups, dstate) = ({batch}, {seqlen}, ngroups "
                         f"dividing nheads = {nheads}, 1..{MAX_DSTATE}), got {tuple(B.shape)}")  # fmt: skip
    check_shape(fn, "C", C, B.shape)
    if not _checks.integral(chunk_size) or chunk_size < 1:
        raise ValueError(f"llmkernels.{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None:
        check_tensor(fn, "D", D, dtypes=_DTYPES, device=dev)
        if tuple(D.shape) not in ((nheads,), (nheads, headdim)):
            raise ValueError(f"llmkernels.{fn}: D must be (nheads,) or (nheads, headdim) = ({nheads}, {headdim}), "
                             f"got {tuple(D.shape)}")  # fmt: skip
    if z is not None:
        check_tensor(fn, "z", z, dtypes=_DTYPES, device=dev)
        check_shape(fn, "z", z, x.shape)
    if dt_bias is not None:
        check_tensor(fn, "dt_bias", dt_bias, ndim=1, dtypes=_DTYPES, device=dev)
        check_shape(fn, "dt_bias", dt_bias, (nheads,))
    if initial_states is not None:
        check_tensor(fn, "initial_states", initial_states, ndim=4, dtypes=_DTYPES, device=dev)
        check_shape(fn, "initial_states", initial_states, (batch, nheads, headdim, dstate))
    # v == v rejects NaN: dynamo cannot trace math.isnan under torch.compile(dynamic=True)
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
            and all(isinstance(v, numbers.Real) and v == v for v in dt_limit)
            and dt_limit[0] <= dt_limit[1]):  # fmt: skip
        raise ValueError(f"llmkernels.{fn}: dt_limit must be a pair (min, max) of numbers, got {dt_limit!r}")


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2's scan, a drop-in for mamba_ssm's mamba_chunk_scan_combined (see the module doc and
    reference/mamba_chunk_scan.py). x, z: (batch, seqlen, nheads, headdim) fp32/fp16/bf16; dt: (batch, seqlen,
    nheads); A, dt_bias: (nheads,); B, C: (batch, seqlen, ngroups, dstate), dstate <= 256; D: (nheads,) or (nheads,
    headdim); initial_states: (batch, nheads, headdim, dstate). Returns y like x (in x's dtype), and with
    return_final_states also the last states (batch, nheads, headdim, dstate) fp32. Differentiable.

    Packed sequences (mamba_ssm's): seq_idx (batch, seqlen) int32 / int64, a sequence starting wherever it changes,
    from a zero state (initial_states is the state of each row's first sequence); with return_varlen_states and
    cu_seqlens (nseqs + 1,) (batch 1) also the final state of each sequence, (nseqs, nheads, headdim, dstate) fp32,
    returned last: (y, varlen_states) or (y, final_states, varlen_states). cu_seqlens is used only for those.
    A sequence is a run of equal seq_idx values, whatever they are (mamba_ssm gives initial_states to the tokens whose
    seq_idx is 0; here they belong to the row's first run). return_varlen_states reads cu_seqlens on the host, so
    under torch.compile it breaks the graph (fullgraph=True refuses it); seq_idx alone compiles."""
    fn = "mamba_chunk_scan_combined"
    _check(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit)
    if seq_idx is not None:
        seq_idx = checked_seq_idx(fn, seq_idx, x.shape[0], x.shape[1], x.device)
    if return_varlen_states:
        bounds = _checked_bounds(fn, x, cu_seqlens, seq_idx)  # (one host read of cu_seqlens, used twice)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[3]
    dim = nheads * headdim
    training = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)
    )
    route = _route(fn, x, training)
    # dt is per (token, head): its bias, softplus and clamp run once, on that small tensor, in fp32 (as mamba_ssm's)
    dt_heads = processed_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
    if route.startswith("chunked"):
        if route == "chunked-triton":
            reason = triton_unavailable_reason(x.device.type)
            if reason is not None:
                raise BackendError(f"llmkernels.{fn}: LLMKERNELS_MAMBA2_ROUTE=chunked-triton: {reason}")
            from ..triton.mamba_ssd import ssd_chunked_triton

            y, last = ssd_chunked_triton(x, dt_heads, A, B, C, D, z, initial_states, seq_idx)
        else:
            y, last = ssd_chunked(x, dt_heads, A, B, C, D, z, initial_states, seq_idx)
        result = (y, last) if return_final_states else (y,)
        if return_varlen_states:
            result += (_varlen_states(x, dt_heads, A, B, bounds, initial_states),)
        return result if len(result) > 1 else y

    def channels(t: torch.Tensor) -> torch.Tensor:  # (batch, seqlen, nheads, headdim) -> (batch, dim, seqlen)
        return t.permute(0, 2, 3, 1).reshape(batch, dim, seqlen)

    # channels(x), channels(z) are views: the CPU kernels read their rows in place (in 16-channel tiles) and write y
    # (and dx, dz) in x's layout, so neither is transposed.
    u, Bc, Cc, zc = channels(x), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), None if z is None else channels(z)
    A_channels = A.float()[:, None, None].expand(nheads, headdim, dstate).reshape(dim, dstate)
    D_channels = None
    if D is not None:
        D_channels = (D.float() if D.dim() == 2 else D.float()[:, None].expand(nheads, headdim)).reshape(dim)
    init = None if initial_states is None else initial_states.float().reshape(batch, dim, dstate).contiguous()
    if x.device.type == "cpu" and scan_dispatcher.choose(x) == "cpu":
        # The C++ CPU ops spread a (batch, nheads, seqlen) delta over each head's channels themselves (and sum its
        # gradient per head): no x-sized copy of it (~11% of the forward at 80 heads x 2048 tokens). Differentiable
        # through the op's registered autograd, as selective_scan_fn.
        delta = dt_heads.permute(0, 2, 1).contiguous()
        out, last = torch.ops.llmkernels.selective_scan_fwd(u, delta, A_channels, Bc, Cc, D_channels, zc, None, False,
                                                            init, seq_idx)  # fmt: skip
    else:
        # dt spread over the channels becomes x-sized: on a GPU in x's 16-bit dtype, since the CUDA scan would
        # otherwise promote u, B, C and z to fp32 copies to match it (the CPU kernels read each input in its own
        # dtype). Written channels-major (its rows contiguous, its backward a sum over headdim along contiguous
        # memory; in x's layout that sum ran strided and cost more than it saved).
        delta = dt_heads
        if x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            delta = delta.to(x.dtype)
        delta = delta.permute(0, 2, 1)[:, :, None, :].expand(batch, nheads, headdim, seqlen).reshape(batch, dim, seqlen)
        out, last = selective_scan_fn(u, delta, A_channels, Bc, Cc, D_channels, zc, None, False, True, init,
                                      seq_idx=seq_idx)  # fmt: skip
    # contiguous as mamba_ssm's (callers .view it; transformers does): free where out took x's layout (the CPU kernel)
    y = out.reshape(batch, nheads, headdim, seqlen).permute(0, 3, 1, 2).contiguous()
    result = (y,)
    if return_final_states:
        result += (last.reshape(batch, nheads, headdim, dstate),)
    if return_varlen_states:
        result += (_varlen_states(x, dt_heads, A, B, bounds, initial_states),)
    return result if len(result) > 1 else y


def _route(fn: str, x: torch.Tensor, training: bool = False) -> str:
    """ROUTE, or for "auto": on a GPU the route the benchmarks measured fastest there (cuda_dispatch_table.json's
    mamba2_route_training / _inference, from bench/make_dispatch_table.py), else the PyTorch chunked route."""
    if ROUTE not in _ROUTES:
        raise ValueError(f"llmkernels.{fn}: LLMKERNELS_MAMBA2_ROUTE must be one of {', '.join(_ROUTES)}, got {ROUTE!r}")
    if ROUTE != "auto":
        return ROUTE
    if requested_backend() is not None or x.device.type != "cuda":
        return "scan"
    measured = measured_cuda_order("mamba2_route_training" if training else "mamba2_route_inference")
    for route in measured or ("chunked",):
        if route != "chunked-triton" or triton_unavailable_reason("cuda") is None:
            return route
    return "chunked"


def _checked_bounds(fn: str, x: torch.Tensor, cu_seqlens, seq_idx) -> list[int]:
    """cu_seqlens as a checked list of ints (the sequences' bounds)."""
    if cu_seqlens is None:
        raise ValueError(f"llmkernels.{fn}: return_varlen_states needs cu_seqlens")
    if seq_idx is None:  # (without it the scan would carry states across the sequences the states are cut at)
        raise ValueError(f"llmkernels.{fn}: return_varlen_states needs seq_idx (the packed sequences)")
    check_tensor(fn, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=x.device)
    if x.shape[0] != 1:
        raise ValueError(f"llmkernels.{fn}: return_varlen_states takes packed sequences in a batch of 1 (as "
                         f"mamba_ssm), got batch {x.shape[0]}")  # fmt: skip
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != x.shape[1] or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"llmkernels.{fn}: cu_seqlens must rise from 0 to seqlen = {x.shape[1]}, got {bounds}")
    return bounds


def _varlen_states(x, dt, A, B, bounds: list[int], initial_states) -> torch.Tensor:
    """Each sequence's final state (nseqs, nheads, headdim, dstate) fp32, batch 1: sum over its tokens t of
    exp(A * (dt summed over the tokens after t)) dt_t x_t B_t^T, plus for the one at token 0 the initial state decayed
    by exp(A * its dt sum). The decay exponents are sums within one sequence (a cumulative sum over the whole packed
    row would lose their precision to cancellation). Differentiable."""
    nheads, dstate = x.shape[2], B.shape[3]
    heads_per_group = nheads // B.shape[2]
    A = A.float()
    states = []
    for k in range(len(bounds) - 1):
        s, e = bounds[k], bounds[k + 1]
        dts = dt[0, s:e]  # (l, nheads) fp32
        after = dts.flip(0).cumsum(0).flip(0) - dts
        weight = torch.exp(after * A) * dts
        Bh = B[0, s:e].float().repeat_interleave(heads_per_group, dim=1)  # (l, nheads, dstate)
        state = torch.einsum("lhp,lhn->hpn", x[0, s:e].float() * weight[..., None], Bh)
        if s == 0 and e > 0 and initial_states is not None:  # the sequence that holds token 0 (see the reference)
            state = state + torch.exp(dts.sum(0) * A)[:, None, None] * initial_states[0].float()
        states.append(state)
    if not states:
        return x.new_zeros(0, nheads, x.shape[3], dstate, dtype=torch.float32)
    return torch.stack(states)
