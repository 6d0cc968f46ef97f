"""mamba_inner_fn: Mamba's inner block from the in_proj output (conv1d, x / dt projections, selective scan,
out_proj) with mamba_ssm's signature, composed from llmkernels' causal_conv1d_fn and selective_scan_fn (each runs
on the fastest backend; gradients flow through both). Definition: llmkernels/reference/mamba_inner.py.
"""

from __future__ import annotations

import torch

from .._checks import check_same_dtype, check_shape, check_tensor
from ..reference.mamba_inner import mamba_inner_ref
from .causal_conv1d import causal_conv1d_fn
from .selective_scan import selective_scan_fn

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(fn, xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C, out_proj_bias=None,
           B_proj_bias=None, C_proj_bias=None) -> None:
    check_tensor(fn, "xz", xz, ndim=3, dtypes=_DTYPES)
    if xz.shape[1] % 2 != 0:
        raise ValueError(f"llmkernels.{fn}: xz must be (batch, 2 * d_inner, seqlen): x and z stacked, got "
                         f"{tuple(xz.shape)}")  # fmt: skip
    d_inner = xz.shape[1] // 2
    check_tensor(fn, "A", A, ndim=2, dtypes=(torch.float32,), device=xz.device)
    dstate = A.shape[1]
    check_shape(fn, "A", A, (d_inner, dstate))
    if conv1d_weight.dim() == 3:  # nn.Conv1d's (d_inner, 1, width)
        check_shape(fn, "conv1d_weight", conv1d_weight, (d_inner, 1, conv1d_weight.shape[-1]))
    check_tensor(fn, "delta_proj_weight", delta_proj_weight, ndim=2, device=xz.device)
    check_shape(fn, "delta_proj_weight", delta_proj_weight, (d_inner, delta_proj_weight.shape[1]))
    rows = delta_proj_weight.shape[1] + dstate * ((B is None) + (C is None))  # dt rank, then B and C from x
    check_tensor(fn, "x_proj_weight", x_proj_weight, ndim=2, device=xz.device)
    check_shape(fn, "x_proj_weight", x_proj_weight, (rows, d_inner))
    check_tensor(fn, "out_proj_weight", out_proj_weight, ndim=2, device=xz.device)
    check_shape(fn, "out_proj_weight", out_proj_weight, (out_proj_weight.shape[0], d_inner))
    for name, w in (("x_proj_weight", x_proj_weight), ("delta_proj_weight", delta_proj_weight),
                    ("out_proj_weight", out_proj_weight)):  # fmt: skip
        check_same_dtype(fn, name, w, "xz", xz)
    for name, bias, size in (("out_proj_bias", out_proj_bias, out_proj_weight.shape[0]),
                             ("B_proj_bias", B_proj_bias, dstate), ("C_proj_bias", C_proj_bias, dstate)):  # fmt: skip
        if bias is not None:
            check_tensor(fn, name, bias, device=xz.device)
            check_shape(fn, name, bias, (size,))


def mamba_inner_fn(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    B_proj_bias: torch.Tensor | None = None,
    C_proj_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
    b_rms_weight: torch.Tensor | None = None,
    c_rms_weight: torch.Tensor | None = None,
    dt_rms_weight: torch.Tensor | None = None,
    b_c_dt_rms_eps: float = 1e-6,
    *,
    cu_seqlens: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba's inner block, a drop-in for mamba_ssm.ops.selective_scan_interface.mamba_inner_fn.

    xz: (batch, 2 * d_inner, seqlen), in_proj's output with x then z along channels; conv1d_weight (d_inner, 1,
    width) or (d_inner, width), width 2..4; x_proj_weight (dt_rank [+ dstate for B] [+ dstate for C], d_inner);
    delta_proj_weight (d_inner, dt_rank); out_proj_weight (d_model, d_inner), the three in xz's dtype; A
    (d_inner, dstate) fp32 (real: mamba_ssm's complex A is not supported); B, C: None (taken per token from
    x_proj's output, plus B_proj_bias / C_proj_bias), or as selective_scan_fn takes them, x_proj then having no
    rows for the one given; D, delta_bias (d_inner,) fp32. Under torch.autocast the three weights and out_proj_bias
    are cast to the autocast dtype first (as mamba_ssm does: its Mamba layer keeps fp32 parameters). Returns
    (batch, seqlen, d_model) in xz's dtype, differentiable in every tensor. checkpoint_lvl (0 or 1, a memory
    hint) is accepted and ignored. Not supported (NotImplementedError): the RMS-normed B / C / dt variant
    (b_rms_weight, c_rms_weight, dt_rms_weight) and packed sequences (cu_seqlens, seq_idx).
    """
    fn = "mamba_inner_fn"
    for name, t in (("b_rms_weight", b_rms_weight), ("c_rms_weight", c_rms_weight), ("dt_rms_weight", dt_rms_weight),
                    ("cu_seqlens", cu_seqlens), ("seq_idx", seq_idx)):  # fmt: skip
        if t is not None:
            raise NotImplementedError(f"llmkernels.{fn}: {name} is not supported (only None)")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"llmkernels.{fn}: checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    if isinstance(xz, torch.Tensor) and torch.is_autocast_enabled(xz.device.type):
        dtype = torch.get_autocast_dtype(xz.device.type)
        x_proj_weight, delta_proj_weight, out_proj_weight = (
            w.to(dtype) for w in (x_proj_weight, delta_proj_weight, out_proj_weight)
        )
        out_proj_bias = None if out_proj_bias is None else out_proj_bias.to(dtype)
        xz = xz.to(dtype)
    _check(fn, xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C, out_proj_bias,
           B_proj_bias, C_proj_bias)  # fmt: skip
    return mamba_inner_ref(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D,
        delta_bias, B_proj_bias, C_proj_bias, delta_softplus, conv_fn=causal_conv1d_fn, scan_fn=selective_scan_fn,
    )  # fmt: skip
