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
chunk_size is accepted and checked but does not change the result. The cost, against mamba_ssm's SSD kernels: the
layout changes copy x, z and the output once each and spread dt over the channels (an x-sized tensor, where
mamba_ssm keeps (batch, seqlen, nheads)), and the GPU scan takes an exp per state entry where one per head would do
(the CPU kernels detect the per-head A and take one per step; an SSD kernel also turns the intra-chunk work into
matrix products); see docs/GPU_SESSION.md.
Not supported (NotImplementedError naming them): seq_idx, cu_seqlens and return_varlen_states (packed sequences).
"""

from __future__ import annotations

import math
import numbers

import torch

from .._checks import check_shape, check_tensor
from ..reference.mamba_chunk_scan import processed_dt
from .selective_scan import MAX_DSTATE, selective_scan_fn

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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
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
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
            and all(isinstance(v, numbers.Real) and not math.isnan(v) for v in dt_limit)
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
    return_final_states also the last states (batch, nheads, headdim, dstate) fp32. Differentiable."""
    fn = "mamba_chunk_scan_combined"
    for name, value in (("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
        if value is not None:
            raise NotImplementedError(f"llmkernels.{fn}: {name} (packed sequences) is not supported")
    if return_varlen_states:
        raise NotImplementedError(f"llmkernels.{fn}: return_varlen_states (packed sequences) is not supported")
    _check(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[3]
    dim = nheads * headdim

    def channels(t: torch.Tensor) -> torch.Tensor:  # (batch, seqlen, nheads, headdim) -> (batch, dim, seqlen)
        return t.permute(0, 2, 3, 1).reshape(batch, dim, seqlen)

    # dt is per (token, head): its bias, softplus and clamp run here on that small tensor, in fp32 (as mamba_ssm's).
    # Spread over the channels it becomes x-sized: on a GPU in x's 16-bit dtype, since the CUDA scan would otherwise
    # promote u, B, C and z to fp32 copies to match it (the CPU kernels read each input in its own dtype).
    delta = processed_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
    if x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        delta = delta.to(x.dtype)
    delta = delta.permute(0, 2, 1)[:, :, None, :].expand(batch, nheads, headdim, seqlen).reshape(batch, dim, seqlen)
    A_channels = A.float()[:, None, None].expand(nheads, headdim, dstate).reshape(dim, dstate)
    D_channels = None
    if D is not None:
        D_channels = (D.float() if D.dim() == 2 else D.float()[:, None].expand(nheads, headdim)).reshape(dim)
    init = None if initial_states is None else initial_states.float().reshape(batch, dim, dstate)
    out, last = selective_scan_fn(
        channels(x), delta, A_channels, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D_channels,
        None if z is None else channels(z), None, False, True, init,
    )  # fmt: skip
    y = out.reshape(batch, nheads, headdim, seqlen).permute(0, 3, 1, 2)
    if return_final_states:
        return y, last.reshape(batch, nheads, headdim, dstate)
    return y
