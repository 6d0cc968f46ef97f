"""Depthwise causal conv1d: `causal_conv1d_fn` and `causal_conv1d_update` with the causal_conv1d package's names.

Semantics: llmkernels/reference/causal_conv1d.py. Backends: reference, cpu and cuda (the C++ ops
llmkernels::causal_conv1d_fwd / _bwd / _update). The C++ forward is differentiable via `register_autograd`.
"""

from __future__ import annotations

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import register_fake
from ..reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref, conv1d_final_states_ref
from .inference_only import inference_only

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (2, 3, 4)


def _silu(fn: str, activation: str | None) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"llmkernels.{fn}: activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _check_weight_bias(fn: str, x, weight, bias) -> None:
    dim = x.shape[1]
    _checks.check_tensor(fn, "weight", weight, ndim=2, dtypes=ACT_DTYPES, device=x.device)
    if weight.shape[0] != dim or weight.shape[1] not in WIDTHS:
        raise ValueError(
            f"llmkernels.{fn}: weight must have shape (dim, width) with dim = {dim} and width in 2..4, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        _checks.check_tensor(fn, "bias", bias, ndim=1, dtypes=ACT_DTYPES, device=x.device)
        _checks.check_shape(fn, "bias", bias, (dim,))


def _x_weight_bias_ok(x, ndim: int, weight, bias) -> bool:
    """Whether x's check (ndim dims) and _check_weight_bias would pass, tested the cheap way (no messages)."""
    if not (isinstance(x, torch.Tensor) and x.dtype in ACT_DTYPES and _checks.fits(weight, ACT_DTYPES, x.device)):
        return False
    shape, w_shape = x.shape, weight.shape  # each read costs ~0.1 us: read once, len() for dim()
    return (
        len(shape) == ndim
        and len(w_shape) == 2
        and w_shape[0] == shape[1]
        and w_shape[1] in WIDTHS
        and (bias is None or (_checks.fits(bias, ACT_DTYPES, x.device) and bias.shape == (shape[1],)))
    )


conv_dispatcher = Dispatcher("causal_conv1d_fn")


# (x, weight, bias, silu, seq_idx, initial_states): seq_idx None or (batch, seqlen) int32, initial_states None or
# (batch, dim, width - 1) in x's dtype, contiguous.
@conv_dispatcher.register("reference")
def _conv_reference(x, weight, bias, silu, seq_idx=None, initial_states=None):
    return causal_conv1d_ref(x, weight, bias, "silu" if silu else None, seq_idx, initial_states)


@conv_dispatcher.register("cpu", kernel="causal_conv1d_fwd")
@conv_dispatcher.register("cuda", kernel="causal_conv1d_fwd")
def _conv_cpp(x, weight, bias, silu, seq_idx=None, initial_states=None):
    if x.device.type != "cpu":  # the CUDA kernels read rows; the CPU ones also read time-major x in place
        x = x.contiguous()
    return torch.ops.llmkernels.causal_conv1d_fwd(x, weight, bias, silu, seq_idx, initial_states)


def time_major(x: torch.Tensor) -> bool:
    """Whether x (batch, dim, seqlen) is (batch, seqlen, dim) memory with channels adjacent, the layout the CPU ops
    read in place and give their outputs (csrc/scan/cpu/conv1d_cpu.cpp's rule; anything else: contiguous)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1 and x.stride(2) != 1


def _empty_layout(x: torch.Tensor) -> torch.Tensor:
    if time_major(x):
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
):
    """Depthwise causal conv1d, a drop-in for causal_conv1d.causal_conv1d_fn (same arguments, same order).

    x: (batch, dim, seqlen) fp32/fp16/bf16; weight: (dim, width), width 2..4; bias: (dim,); activation None,
    "silu" or "swish" (keyword: the fourth positional argument is seq_idx, as in causal_conv1d). Returns (batch,
    dim, seqlen) in x's dtype; differentiable in x, weight, bias and initial_states.
    x may be time-major, a (batch, dim, seqlen) view of (batch, seqlen, dim) memory (in_proj's output transposed, as
    causal_conv1d's channel-last kernels take it): the CPU kernels read it in place and return the output (and dx) in
    that layout too, so `.transpose(1, 2)` gives (batch, seqlen, dim) without a copy; the CUDA kernels read a
    contiguous copy.
    seq_idx (batch, seqlen) int32 / int64, packed sequences: each sequence is convolved alone (a tap that reaches
    into the previous sequence reads 0). initial_states (batch, dim, width - 1): the inputs before x[..., 0] (a
    chunked prefill continuing a sequence); not with seq_idx (NotImplementedError, as causal_conv1d).
    return_final_states: also returns the last width - 1 inputs (batch, dim, width - 1) in x's dtype (from
    initial_states / zeros when seqlen < width - 1), the next chunk's initial_states: written into final_states_out
    when given (no gradient flows through that copy), else a differentiable slice of initial_states and x. With
    seq_idx (which causal_conv1d refuses here) they are the last sequence's inputs, earlier sequences' read as 0.
    """
    fn = "causal_conv1d_fn"
    if isinstance(seq_idx, str):
        raise TypeError(f"llmkernels.{fn}: the fourth positional argument is seq_idx (causal_conv1d's order); pass "
                        f"activation={seq_idx!r} by keyword")  # fmt: skip
    silu = _silu(fn, activation)
    if not _x_weight_bias_ok(x, 3, weight, bias):
        _checks.check_tensor(fn, "x", x, ndim=3, dtypes=ACT_DTYPES)  # raises, naming the argument
        _check_weight_bias(fn, x, weight, bias)
    if seq_idx is not None:
        if initial_states is not None:
            raise NotImplementedError(f"llmkernels.{fn}: initial_states together with seq_idx is not supported (as "
                                      "in causal_conv1d)")  # fmt: skip
        from .selective_scan import checked_seq_idx

        seq_idx = checked_seq_idx(fn, seq_idx, x.shape[0], x.shape[2], x.device)
    width = weight.shape[1]
    if initial_states is not None:
        _checks.check_tensor(fn, "initial_states", initial_states, ndim=3, dtypes=ACT_DTYPES, device=x.device)
        _checks.check_shape(fn, "initial_states", initial_states, (x.shape[0], x.shape[1], width - 1))
        initial_states = initial_states.to(x.dtype).contiguous()
    out = conv_dispatcher(x, weight.contiguous(), None if bias is None else bias.contiguous(), silu, seq_idx,
                          initial_states)  # fmt: skip
    if not return_final_states:
        if final_states_out is not None:
            raise ValueError(f"llmkernels.{fn}: final_states_out is written only with return_final_states=True")
        return out
    final = conv1d_final_states_ref(x, width, initial_states, seq_idx)
    if final_states_out is not None:
        _checks.check_tensor(fn, "final_states_out", final_states_out, ndim=3, device=x.device)
        _checks.check_shape(fn, "final_states_out", final_states_out, final.shape)
        final = final_states_out.copy_(final.detach())
    return out, final


update_dispatcher = Dispatcher("causal_conv1d_update")


# (x, conv_state, weight, bias, silu, conv_state_indices, cache_seqlens): the indices None or (batch,) int32, the
# lengths None or (batch,) int32 / int64.
@update_dispatcher.register("reference")
def _update_reference(x, conv_state, weight, bias, silu, conv_state_indices=None, cache_seqlens=None):
    if conv_state_indices is not None:  # (read back: an index out of range or repeated is an error here)
        _checks.check_pool_index_values("causal_conv1d_update", "conv_state_indices", conv_state_indices,
                                        conv_state.shape[0])  # fmt: skip
    return causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu else None, conv_state_indices,
                                    cache_seqlens)  # fmt: skip


@update_dispatcher.register("cpu", kernel="causal_conv1d_update")
@update_dispatcher.register("cuda", kernel="causal_conv1d_update")
def _update_cpp(x, conv_state, weight, bias, silu, conv_state_indices=None, cache_seqlens=None):
    return torch.ops.llmkernels.causal_conv1d_update(x, conv_state, weight, bias, silu, conv_state_indices,
                                                     cache_seqlens)  # fmt: skip


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step: conv_state (batch, dim, state_len) updated in place; returns (batch, dim) in x's dtype.

    x: (batch, dim); weight: (dim, width); bias: (dim,). conv_state holds the last state_len >= width - 1 inputs,
    oldest first: the step appends x (shifting the state left by one) and convolves the last `width` inputs, x
    included. state_len = width is Hugging Face's and mamba_ssm's cache (Mamba.step), width - 1 vLLM's; causal_conv1d
    takes any state_len >= width - 1, as here.
    cache_seqlens ((batch,) int32 or int64, causal_conv1d's): the state is a circular buffer instead; x is token
    number cache_seqlens[b] of its sequence, written to slot cache_seqlens[b] % state_len (nothing shifts), and the
    window's other inputs are read from the slots of the width - 1 positions before it.
    conv_state_indices ((batch,) int32 or int64, causal_conv1d's; continuous batching): row b of x steps row
    conv_state_indices[b] of a state of any number of rows, (state_batch, dim, state_len); rows no index names are
    untouched. A negative index (a pad slot) leaves its batch row out: no state changes, output 0. The others must
    be distinct and below state_batch: the CPU kernel and the reference check; the CUDA kernel leaves a row whose
    index is past the pool out too (no sync to check), and repeated ones race.
    x may also be (batch, dim, seqlen), a few tokens at once (speculative decoding; transformers passes seqlen 1): the
    same as that many steps (token t at cache_seqlens + t), in one kernel call, returning (batch, dim, seqlen).
    conv_state may have any strides that do not alias (causal_conv1d's and vLLM's channel-last states, slices of a
    larger cache): it is updated where it lies.
    """
    fn = "causal_conv1d_update"
    silu = _silu(fn, activation)
    if conv_state_indices is not None:
        conv_state_indices = _checks.pool_indices(fn, "conv_state_indices", conv_state_indices, x)
    if cache_seqlens is not None:
        _checks.check_batch_ints(fn, "cache_seqlens", cache_seqlens, x)
    rows = None  # the state's rows: x's batch
    if conv_state_indices is not None:
        rows = conv_state.shape[0] if isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3 else -1
    if not _update_args_ok(x, conv_state, weight, bias, rows):
        _check_update_args(fn, x, conv_state, weight, bias, conv_state_indices)  # raises, naming the argument
        if x.dim() == 3 and x.shape[2] == 0:  # no token: nothing to step
            return x.new_empty(x.shape)
    out = update_dispatcher(
        x.contiguous(), conv_state, weight.contiguous(), None if bias is None else bias.contiguous(), silu,
        conv_state_indices=conv_state_indices, cache_seqlens=cache_seqlens,
    )  # fmt: skip
    # No gradient flows through a decode step (as causal_conv1d's): a backward says so instead of dropping them.
    return inference_only("causal_conv1d_update", out, x, weight, bias, train_with="causal_conv1d_fn")


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """The conv states after a packed prefill, causal_conv1d's `causal_conv1d_varlen_states`: x (total_tokens, dim)
    holds sequence b in rows cu_seqlens[b]:cu_seqlens[b + 1] ((batch + 1,) int32 / int64 non-decreasing offsets
    into x's rows, from 0 as a packed batch has them); state b is its last state_len inputs, oldest first, zeros
    before a shorter sequence. Returns (batch, dim, state_len) in x's dtype, a view of (batch, state_len, dim) memory
    as causal_conv1d's; it feeds causal_conv1d_update as a shifting state (state_len = width: Mamba.step's; width - 1:
    vLLM's), not as a circular one (cache_seqlens), whose slots hold position p at p % state_len.

    One gather, no kernel of its own: nothing is read back from a GPU. The offsets are checked on the CPU; on a GPU
    they are clamped into x's rows (bad ones give wrong states, never a fault). Differentiable in x.
    """
    fn = "causal_conv1d_varlen_states"
    _checks.check_tensor(fn, "x", x, ndim=2)
    if not x.is_floating_point():
        raise TypeError(f"llmkernels.{fn}: x must be a floating tensor, got {x.dtype}")
    _checks.check_tensor(fn, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=x.device)
    if cu_seqlens.shape[0] == 0:
        raise ValueError(f"llmkernels.{fn}: cu_seqlens must hold batch + 1 offsets, got none")
    if not _checks.integral(state_len) or state_len < 0:
        raise ValueError(f"llmkernels.{fn}: state_len must be an int >= 0, got {state_len!r}")
    total = x.shape[0]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        offsets = cu_seqlens.tolist()
        if offsets[0] < 0 or offsets[-1] > total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"llmkernels.{fn}: cu_seqlens must be non-decreasing offsets in [0, {total}] (x's rows), "
                             f"got {offsets}")  # fmt: skip
    ends, starts = cu_seqlens[1:].long(), cu_seqlens[:-1].long()
    rows = ends[:, None] + torch.arange(-state_len, 0, device=x.device)  # (batch, state_len): each entry's row of x
    inside = rows >= starts[:, None]
    if total == 0:
        return x.new_zeros(ends.shape[0], state_len, x.shape[1]).transpose(1, 2)
    states = x[rows.clamp(0, total - 1)]  # (batch, state_len, dim)
    return torch.where(inside[:, :, None], states, states.new_zeros(())).transpose(1, 2)


def _update_args_ok(x, conv_state, weight, bias, state_rows: int | None = None) -> bool:
    """Whether _check_update_args would pass, tested the cheap way (no messages): it runs only when this says no.
    Written out rather than through _x_weight_bias_ok: each call and tensor attribute read costs ~0.1 us, and
    this runs every decode step."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(conv_state, torch.Tensor)):
        return False
    dev, shape, w_shape = x.device, x.shape, weight.shape
    return (
        (len(shape) == 2 or (len(shape) == 3 and shape[2] > 0))
        and len(w_shape) == 2
        and w_shape[0] == shape[1]
        and w_shape[1] in WIDTHS
        and x.dtype in ACT_DTYPES
        and weight.dtype in ACT_DTYPES
        and conv_state.dtype in ACT_DTYPES
        and weight.device == dev
        and conv_state.device == dev
        and len(conv_state.shape) == 3
        and conv_state.shape[:2] == (shape[0] if state_rows is None else state_rows, shape[1])
        and conv_state.shape[2] >= w_shape[1] - 1
        and (conv_state.is_contiguous() or torch.compiler.is_compiling() or _checks.has_no_overlap(conv_state))
        and (bias is None or (_checks.fits(bias, ACT_DTYPES, dev) and bias.shape == (shape[1],)))
    )


def _check_update_args(fn: str, x, conv_state, weight, bias, conv_state_indices=None) -> None:
    _checks.check_tensor(fn, "x", x, dtypes=ACT_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"llmkernels.{fn}: x must be (batch, dim) or (batch, dim, seqlen), got {tuple(x.shape)}")
    _check_weight_bias(fn, x, weight, bias)
    _checks.check_tensor(fn, "conv_state", conv_state, dtypes=ACT_DTYPES, device=x.device)
    _checks.check_no_overlap(fn, "conv_state", conv_state)
    if conv_state_indices is not None:  # any number of state rows: the indices pick them
        _checks.check_tensor(fn, "conv_state", conv_state, ndim=3)
    rows = conv_state.shape[0] if conv_state_indices is not None else x.shape[0]
    if conv_state.dim() != 3 or conv_state.shape[:2] != (rows, x.shape[1]) or conv_state.shape[2] < weight.shape[1] - 1:
        raise ValueError(f"llmkernels.{fn}: conv_state must have shape ({rows}, {x.shape[1]}, state_len) with "
                         f"state_len >= width - 1 = {weight.shape[1] - 1}, got {tuple(conv_state.shape)}")  # fmt: skip


if _ext.loaded:

    @register_fake("llmkernels::causal_conv1d_fwd")
    def _conv_fwd_fake(x, weight, bias, silu, seq_idx=None, initial_states=None):
        return _empty_layout(x)

    @register_fake("llmkernels::causal_conv1d_bwd")
    def _conv_bwd_fake(dout, x, weight, bias, silu, seq_idx=None, initial_states=None):
        dbias = x.new_empty(0, dtype=torch.float32) if bias is None else torch.empty_like(bias)
        dinit = x.new_empty(0, dtype=torch.float32) if initial_states is None else torch.empty_like(initial_states)
        return (
            _empty_layout(x),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            dbias,
            dinit,
        )

    @register_fake("llmkernels::causal_conv1d_update")
    def _conv_update_fake(x, conv_state, weight, bias, silu, conv_state_indices=None, cache_seqlens=None):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _conv_setup_context(ctx, inputs, output):
        x, weight, bias, silu, seq_idx, initial_states = inputs
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.silu = silu

    def _conv_backward(ctx, dout):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        bwd = torch.ops.llmkernels.causal_conv1d_bwd
        if dout.device.type != "cpu":  # (the CPU op takes either layout of dout)
            dout = dout.contiguous()
        dx, dweight, dbias, dinit = bwd(dout, x, weight, bias, ctx.silu, seq_idx, initial_states)
        return (dx, dweight, dbias if bias is not None else None, None, None,
                dinit if initial_states is not None else None)  # fmt: skip

    torch.library.register_autograd("llmkernels::causal_conv1d_fwd", _conv_backward, setup_context=_conv_setup_context)
    _checks.refuse_double_backward("llmkernels::causal_conv1d_bwd")
