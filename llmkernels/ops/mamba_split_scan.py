"""mamba_split_conv1d_scan_combined: Mamba-2's mixer after in_proj with mamba_ssm's signature (the fused entry its
Mamba2 module trains through, and transformers' Mamba-2 models call when a kernel provides it), composed from
llmkernels' causal_conv1d_fn and mamba_chunk_scan_combined (each on the fastest backend; gradients flow through
both), the gated RMSNorm (rmsnorm_fn) and out_proj. Definition: llmkernels/reference/mamba_split_scan.py.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_shape, check_tensor
from ..reference.mamba_split_scan import mamba_split_conv1d_scan_ref
from .causal_conv1d import causal_conv1d_fn
from .mamba_chunk_scan import mamba_chunk_scan_combined
from .rmsnorm_gated import rmsnorm_fn

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(fn, zxbcdt, conv1d_weight, dt_bias, A, D, headdim, ngroups, activation, rmsnorm_weight, outproj_weight,
           outproj_bias) -> None:  # fmt: skip
    check_tensor(fn, "zxbcdt", zxbcdt, ndim=3, dtypes=_DTYPES)
    dev = zxbcdt.device
    check_tensor(fn, "D", D, dtypes=_DTYPES, device=dev)
    if D.dim() not in (1, 2) or (D.dim() == 1 and not (isinstance(headdim, int) and headdim > 0)):
        raise ValueError(f"llmkernels.{fn}: D must be (nheads, headdim), or (nheads,) with headdim given; got D "
                         f"{tuple(D.shape)}, headdim {headdim!r}")  # fmt: skip
    nheads = D.shape[0]
    dim = nheads * (D.shape[1] if D.dim() == 2 else headdim)
    if not isinstance(ngroups, int) or ngroups < 1 or nheads % ngroups:
        raise ValueError(f"llmkernels.{fn}: ngroups must be a positive int dividing nheads = {nheads}, got {ngroups!r}")
    check_tensor(fn, "conv1d_weight", conv1d_weight, dtypes=_DTYPES, device=dev)
    conv_dim = conv1d_weight.shape[0]
    if (conv1d_weight.dim() not in (2, 3) or (conv1d_weight.dim() == 3 and conv1d_weight.shape[1] != 1)
            or conv_dim <= dim or (conv_dim - dim) % (2 * ngroups)):  # fmt: skip
        raise ValueError(f"llmkernels.{fn}: conv1d_weight must be (dim + 2 * ngroups * dstate, width) (or "
                         f"nn.Conv1d's (., 1, width)) with dim = {dim}, ngroups = {ngroups}; got "
                         f"{tuple(conv1d_weight.shape)}")  # fmt: skip
    rest = zxbcdt.shape[-1] - conv_dim - dim - nheads  # 2 * d_mlp
    if rest < 0 or rest % 2:
        raise ValueError(f"llmkernels.{fn}: zxbcdt's last dim must be 2 * d_mlp + dim + conv_dim + nheads = 2 * d_mlp "
                         f"+ {dim + conv_dim + nheads}, got {zxbcdt.shape[-1]}")  # fmt: skip
    for name, t in (("dt_bias", dt_bias), ("A", A)):
        check_tensor(fn, name, t, ndim=1, dtypes=_DTYPES, device=dev)
        check_shape(fn, name, t, (nheads,))
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"llmkernels.{fn}: activation must be None, 'silu' or 'swish', got {activation!r}")
    if rmsnorm_weight is not None:
        check_tensor(fn, "rmsnorm_weight", rmsnorm_weight, ndim=1, dtypes=_DTYPES, device=dev)
        check_shape(fn, "rmsnorm_weight", rmsnorm_weight, (dim,))
    if outproj_weight is not None:
        check_tensor(fn, "outproj_weight", outproj_weight, ndim=2, dtypes=(zxbcdt.dtype,), device=dev)
        check_shape(fn, "outproj_weight", outproj_weight, (outproj_weight.shape[0], rest // 2 + dim))
    if outproj_bias is not None:
        if outproj_weight is None:
            raise ValueError(f"llmkernels.{fn}: outproj_bias without outproj_weight")
        check_tensor(fn, "outproj_bias", outproj_bias, ndim=1, device=dev)
        check_shape(fn, "outproj_bias", outproj_bias, (outproj_weight.shape[0],))


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """Mamba-2's mixer from in_proj's output, a drop-in for mamba_ssm's mamba_split_conv1d_scan_combined.

    zxbcdt (batch, seqlen, 2 * d_mlp + dim + conv_dim + nheads), dim = nheads * headdim, conv_dim = dim + 2 *
    ngroups * dstate; conv1d_weight (conv_dim, width); conv1d_bias (conv_dim,); dt_bias, A (nheads,); D (nheads,
    headdim) or (nheads,) with headdim; initial_states (batch, nheads, headdim, dstate); seq_idx (batch, seqlen)
    int32 (packed sequences: the conv and the scan restart where it changes); rmsnorm_weight (dim,); outproj_weight
    (out_dim, d_mlp + dim). Returns (batch, seqlen, out_dim or d_mlp + dim), and with return_final_states also the
    final states (batch, nheads, headdim, dstate) fp32. Differentiable in every tensor.
    """
    fn = "mamba_split_conv1d_scan_combined"
    _check(fn, zxbcdt, conv1d_weight, dt_bias, A, D, headdim, ngroups, activation, rmsnorm_weight, outproj_weight,
           outproj_bias)  # fmt: skip
    return mamba_split_conv1d_scan_ref(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
        return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
        norm_before_gate, conv_fn=causal_conv1d_fn, scan_fn=mamba_chunk_scan_combined, norm_fn=rmsnorm_fn,
    )  # fmt: skip
