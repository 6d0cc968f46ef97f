"""Mamba's selective scan: `selective_scan_fn` and `selective_state_update` with mamba_ssm's signatures.

Semantics: llmkernels/reference/selective_scan.py. Backends: reference (pure PyTorch), cpu and cuda (the C++
ops llmkernels::selective_scan_fwd / selective_scan_bwd / selective_state_update), triton (lazily imported
from llmkernels.triton.selective_scan). The C++ forward is differentiable through `register_autograd`,
whose backward recomputes the states (selective_scan_bwd) rather than storing them.
"""

from __future__ import annotations

import math

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import register_fake
from ..reference.selective_scan import selective_scan_ref, selective_state_update_ref, sequence_runs
from .inference_only import inference_only

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F32 = (torch.float32,)
MAX_DSTATE = 256


def _bc_shape_ok(shape, batch: int, dim: int, dstate: int, seqlen: int | None) -> bool:
    """B/C: (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen); decode (seqlen None):
    (batch, dstate) or (batch, ngroups, dstate). ngroups must divide dim."""
    n = len(shape)
    if seqlen is None:  # selective_state_update
        return (n == 2 and shape[0] == batch and shape[1] == dstate) or (
            n == 3 and shape[0] == batch and shape[2] == dstate and shape[1] >= 1 and dim % shape[1] == 0
        )
    return (
        (n == 2 and shape[0] == dim and shape[1] == dstate)
        or (n == 3 and shape[0] == batch and shape[1] == dstate and shape[2] == seqlen)
        or (
            n == 4
            and shape[0] == batch
            and shape[2] == dstate
            and shape[3] == seqlen
            and shape[1] >= 1
            and dim % shape[1] == 0
        )
    )


def _check_bc(fn: str, name: str, M, batch: int, dim: int, dstate: int, seqlen: int | None, dev) -> None:
    _checks.check_tensor(fn, name, M, dtypes=ACT_DTYPES, device=dev)
    if seqlen is None:
        expected = f"(batch, dstate) = ({batch}, {dstate}) or (batch, ngroups, dstate) with dim % ngroups == 0"
    else:
        expected = (
            f"(dim, dstate) = ({dim}, {dstate}), (batch, dstate, seqlen) = ({batch}, {dstate}, {seqlen}) or "
            "(batch, ngroups, dstate, seqlen) with dim % ngroups == 0"
        )
    if not _bc_shape_ok(M.shape, batch, dim, dstate, seqlen):
        raise ValueError(f"llmkernels.{fn}: {name} must have shape {expected}, got {tuple(M.shape)}")


def _check_A(fn: str, A, dim: int, dev) -> int:
    _checks.check_tensor(fn, "A", A, ndim=2, dtypes=(torch.float32,), device=dev)
    if A.shape[0] != dim or not 1 <= A.shape[1] <= MAX_DSTATE:
        raise ValueError(
            f"llmkernels.{fn}: A must have shape (dim, dstate) with dim = {dim} and 1 <= dstate <= {MAX_DSTATE}, "
            f"got {tuple(A.shape)}"
        )
    return A.shape[1]


def _check_channel_vector(fn: str, name: str, t, dim: int, dev) -> None:
    """D, delta_bias, dt_bias: (dim,) in any float dtype (a bf16 model's parameters); the ops take them in fp32."""
    if t is not None:
        _checks.check_tensor(fn, name, t, ndim=1, dtypes=ACT_DTYPES, device=dev)
        _checks.check_shape(fn, name, t, (dim,))


# The quick tests read each tensor attribute once (each read costs ~0.1 us) and use len(shape) for dim().
def _channel_vector_ok(t, dim: int, dev) -> bool:
    return t is None or (_checks.fits(t, ACT_DTYPES, dev) and t.shape == (dim,))


def _scan_args_ok(u, delta, A, B, C, D, z, delta_bias, initial_state) -> bool:
    """Whether check_scan_args would pass, tested the cheap way (no messages): it runs only when this says no.
    The tensors every call has are tested inline, like _update_args_ok's."""
    T = torch.Tensor
    if not (isinstance(u, T) and isinstance(delta, T) and isinstance(A, T) and isinstance(B, T) and isinstance(C, T)):
        return False
    dev, shape, a_shape = u.device, u.shape, A.shape
    if not (len(shape) == 3 and len(a_shape) == 2 and a_shape[0] == shape[1] and 1 <= a_shape[1] <= MAX_DSTATE):
        return False
    batch, dim, seqlen = shape
    dstate = a_shape[1]
    return (
        u.dtype in ACT_DTYPES
        and delta.dtype in ACT_DTYPES
        and A.dtype == torch.float32
        and B.dtype in ACT_DTYPES
        and C.dtype in ACT_DTYPES
        and delta.device == dev
        and A.device == dev
        and B.device == dev
        and C.device == dev
        and delta.shape == shape
        and _bc_shape_ok(B.shape, batch, dim, dstate, seqlen)
        and _bc_shape_ok(C.shape, batch, dim, dstate, seqlen)
        and _channel_vector_ok(D, dim, dev)
        and _channel_vector_ok(delta_bias, dim, dev)
        and (z is None or (_checks.fits(z, ACT_DTYPES, dev) and z.shape == shape))
        and (
            initial_state is None
            or (_checks.fits(initial_state, _F32, dev) and initial_state.shape == (batch, dim, dstate))
        )
    )


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    fn = "selective_scan_fn"
    _checks.check_tensor(fn, "u", u, ndim=3, dtypes=ACT_DTYPES)
    dev = u.device
    batch, dim, seqlen = u.shape
    _checks.check_tensor(fn, "delta", delta, dtypes=ACT_DTYPES, device=dev)
    _checks.check_shape(fn, "delta", delta, u.shape)
    dstate = _check_A(fn, A, dim, dev)
    _check_bc(fn, "B", B, batch, dim, dstate, seqlen, dev)
    _check_bc(fn, "C", C, batch, dim, dstate, seqlen, dev)
    _check_channel_vector(fn, "D", D, dim, dev)
    _check_channel_vector(fn, "delta_bias", delta_bias, dim, dev)
    if z is not None:
        _checks.check_tensor(fn, "z", z, dtypes=ACT_DTYPES, device=dev)
        _checks.check_shape(fn, "z", z, u.shape)
    if initial_state is not None:
        _checks.check_tensor(fn, "initial_state", initial_state, dtypes=(torch.float32,), device=dev)
        _checks.check_shape(fn, "initial_state", initial_state, (batch, dim, dstate))


def checked_seq_idx(fn: str, seq_idx, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """seq_idx as the kernels take it, (batch, seqlen) int32 contiguous on `device`, or an error naming it.

    A sequence is a run of equal values: the runs are renumbered 0, 1, ... so that the kernels' comparisons of two
    positions (the conv's taps reach back width - 1 steps) agree with "no change in between", and no two int64 values
    alias in int32."""
    _checks.check_tensor(fn, "seq_idx", seq_idx, ndim=2, dtypes=(torch.int32, torch.int64), device=device)
    _checks.check_shape(fn, "seq_idx", seq_idx, (batch, seqlen))
    if seqlen <= 1:
        return torch.zeros((batch, seqlen), dtype=torch.int32, device=device)
    return sequence_runs(seq_idx)


# ---------------------------------------------------------------------------------------------------------
# selective_scan_fn: backends take (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
# (u, delta, z, B, C with any strides, the rest contiguous; seq_idx None or (batch, seqlen) int32) and return
# (out, last_state).
# ---------------------------------------------------------------------------------------------------------
scan_dispatcher = Dispatcher("selective_scan_fn")


@scan_dispatcher.register("reference")
def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx=None):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, seq_idx)


@scan_dispatcher.register("cpu", kernel="selective_scan_fwd")
@scan_dispatcher.register("cuda", kernel="selective_scan_fwd")
def _scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx=None):
    return torch.ops.llmkernels.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                                   seq_idx)  # fmt: skip


def _triton_module_reason(attr: str) -> str | None:
    try:
        from ..triton import selective_scan as mod
    except ImportError as exc:
        return f"llmkernels.triton.selective_scan cannot be imported ({exc})"
    if not hasattr(mod, attr):
        return f"llmkernels.triton.selective_scan has no {attr}"
    return None


def _scan_triton_supports(u, delta=None, A=None, B=None, C=None, *args, **kwargs) -> str | None:
    # (B, C absent: a caller asking which backend would take u alone, as mamba_chunk_scan_combined's route does)
    per_row = [  # the furthest element of one batch row, by its strides (a slice of a longer buffer counts its span)
        sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:]) if n > 0)
        for t in (B, C) if isinstance(t, torch.Tensor) and t.dim() > 2
    ]
    if max(per_row, default=0) >= 2**31:  # (per-token B / C, the batch offset int64: e.g. 8 x 128 x 2.1M steps)
        return "the Triton kernel addresses per-token B / C with int32 group offsets: fewer than 2^31 elements"
    return _triton_module_reason("selective_scan_triton")


@scan_dispatcher.register("triton", supports=_scan_triton_supports)
def _scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx=None):
    from ..triton.selective_scan import selective_scan_triton

    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in fp32, contiguous (the C++ ops' layout), without the two calls in the common case where it already is."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Mamba's selective scan, a drop-in for mamba_ssm.ops.selective_scan_interface.selective_scan_fn.

    u, delta, z: (batch, dim, seqlen) fp32/fp16/bf16; A: (dim, dstate) fp32, dstate <= 256; B, C: (dim, dstate),
    (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen); D, delta_bias: (dim,) fp32; initial_state:
    (batch, dim, dstate) fp32. Returns out (batch, dim, seqlen) in u's dtype, and with return_last_state also
    the last state (batch, dim, dstate) fp32. Differentiable in every tensor, including initial_state and
    through the returned last state. Any strides: the CPU kernels read strided inputs in place (the output and the
    gradients of u, delta, z then take their layouts); with gradients on CUDA, non-contiguous inputs are copied (as
    mamba_ssm does).
    seq_idx (batch, seqlen) int32 / int64 (beyond mamba_ssm; packed sequences, as mamba_chunk_scan_combined's): a
    new sequence starts wherever seq_idx[b, t] != seq_idx[b, t - 1], from a zero state; initial_state is the state
    before t = 0 (of each row's first sequence) and the last state that of the last.
    """
    if not _scan_args_ok(u, delta, A, B, C, D, z, delta_bias, initial_state):
        check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)  # raises, naming the argument
    if seq_idx is not None:
        seq_idx = checked_seq_idx("selective_scan_fn", seq_idx, u.shape[0], u.shape[2], u.device)
    # u, delta, z, B, C go in with their strides (the C++ CPU forward and backward read rows in place, in tiles, and
    # give the output and gradients the inputs' layouts; Triton takes strides; the CUDA host copies what it needs):
    # Mamba-2's prefill skips two x-sized transposes, 1.2x at 80 heads x 2048 tokens on CPU. With gradients on
    # CUDA they are made contiguous first: its backward reads the saved copies.
    tensors = (u, delta, B, C, z, A, D, delta_bias, initial_state)
    if u.device.type != "cpu" and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        u, delta, B, C, z = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous(), _contig(z)
    args = (
        u,
        delta,
        A.contiguous(),
        B,
        C,
        _f32(D),
        z,
        _f32(delta_bias),
        bool(delta_softplus),
        _contig(initial_state),
        seq_idx,
    )
    out, last_state = scan_dispatcher(*args)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------
# selective_state_update
# ---------------------------------------------------------------------------------------------------------
update_dispatcher = Dispatcher("selective_state_update")


# (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices): the indices None or (batch,) int32.
@update_dispatcher.register("reference")
def _update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    if state_batch_indices is not None:  # (read back: an index out of range or repeated is an error here)
        _checks.check_pool_index_values("selective_state_update", "state_batch_indices", state_batch_indices,
                                        state.shape[0])  # fmt: skip
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


@update_dispatcher.register("cpu", kernel="selective_state_update")
@update_dispatcher.register("cuda", kernel="selective_state_update")
def _update_cpp(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    return torch.ops.llmkernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                       state_batch_indices)  # fmt: skip


@update_dispatcher.register("triton", supports=lambda *a, **k: _triton_module_reason("selective_state_update_triton"))
def _update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    from ..triton.selective_scan import selective_state_update_triton

    return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def _update_args_ok(state, x, dt, A, B, C, D, z, dt_bias, state_rows: int | None = None) -> bool:
    """Whether check_update_args would pass, tested the cheap way (no messages): it runs only when this says no.
    The tensors every call has are tested inline, not through fits: each call costs ~0.1 us, every step."""
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(dt, T) and isinstance(A, T) and isinstance(state, T)):
        return False
    if not (isinstance(B, T) and isinstance(C, T)):
        return False
    dev, shape, a_shape, s_shape = x.device, x.shape, A.shape, state.shape
    if not (len(shape) == 2 and len(a_shape) in (1, 2) and a_shape[0] == shape[1] and len(s_shape) == 3):
        return False
    batch, dim = shape
    dstate = a_shape[1] if len(a_shape) == 2 else s_shape[2]
    if not 1 <= dstate <= MAX_DSTATE:
        return False
    return (
        x.dtype in ACT_DTYPES
        and dt.dtype in ACT_DTYPES
        and A.dtype == torch.float32
        and state.dtype in ACT_DTYPES
        and B.dtype in ACT_DTYPES
        and C.dtype in ACT_DTYPES
        and dt.device == dev
        and A.device == dev
        and state.device == dev
        and B.device == dev
        and C.device == dev
        and dt.shape == shape
        and state.shape == (batch if state_rows is None else state_rows, dim, dstate)
        and state.is_contiguous()
        and _bc_shape_ok(B.shape, batch, dim, dstate, None)
        and _bc_shape_ok(C.shape, batch, dim, dstate, None)
        and _channel_vector_ok(D, dim, dev)
        and _channel_vector_ok(dt_bias, dim, dev)
        and (z is None or (_checks.fits(z, ACT_DTYPES, dev) and z.shape == shape))
    )


def check_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices=None) -> None:
    fn = "selective_state_update"
    _checks.check_tensor(fn, "x", x, ndim=2, dtypes=ACT_DTYPES)
    dev = x.device
    batch, dim = x.shape
    _checks.check_tensor(fn, "dt", dt, dtypes=ACT_DTYPES, device=dev)
    _checks.check_shape(fn, "dt", dt, x.shape)
    if isinstance(A, torch.Tensor) and A.dim() == 1:  # one A per channel: dstate is the state's
        _checks.check_tensor(fn, "A", A, dtypes=(torch.float32,), device=dev)
        _checks.check_shape(fn, "A", A, (dim,))
        _checks.check_tensor(fn, "state", state, ndim=3)
        dstate = state.shape[2]
        if not 1 <= dstate <= MAX_DSTATE:
            raise ValueError(f"llmkernels.{fn}: state must have 1 <= dstate <= {MAX_DSTATE}, got {tuple(state.shape)}")
    else:
        dstate = _check_A(fn, A, dim, dev)
    _checks.check_tensor(fn, "state", state, dtypes=ACT_DTYPES, device=dev)
    if state_batch_indices is not None:  # any number of state rows: the indices pick them
        _checks.check_tensor(fn, "state", state, ndim=3)
        _checks.check_shape(fn, "state", state, (state.shape[0], dim, dstate))
    else:
        _checks.check_shape(fn, "state", state, (batch, dim, dstate))
    _checks.check_updated_in_place(fn, "state", state)
    _check_bc(fn, "B", B, batch, dim, dstate, None, dev)
    _check_bc(fn, "C", C, batch, dim, dstate, None, dev)
    _check_channel_vector(fn, "D", D, dim, dev)
    _check_channel_vector(fn, "dt_bias", dt_bias, dim, dev)
    if z is not None:
        _checks.check_tensor(fn, "z", z, dtypes=ACT_DTYPES, device=dev)
        _checks.check_shape(fn, "z", z, x.shape)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of the scan (mamba_ssm's selective_state_update); updates `state` in place.

    state: (batch, dim, dstate) contiguous, fp32/fp16/bf16 (arithmetic fp32); x, dt, z: (batch, dim);
    A: (dim, dstate) fp32, or (dim,) for one value per channel over all its state entries (beyond mamba_ssm's 3-D
    form: Mamba-2's per-head A; the kernels then take one exp per channel); B, C: (batch, dstate) or (batch,
    ngroups, dstate); D, dt_bias: (dim,) fp32. Returns y (batch, dim) in x's dtype. Stepping it L times equals
    selective_scan_fn over L tokens.

    state_batch_indices ((batch,) int32 or int64, mamba_ssm's; continuous batching): row b of x steps row
    state_batch_indices[b] of a state of any number of rows, (state_batch, dim, dstate); rows no index names are
    untouched. A negative index (a pad slot, as vLLM's -1) leaves its batch row out: no state changes, output 0.
    The others must be distinct and below state_batch: the CPU kernel and the reference check; the GPU kernels
    leave a row whose index is past the pool out too (no sync to check), and repeated ones race.

    Multi-head states (Mamba-2's decode, as mamba_ssm takes them): state (batch, nheads, headdim, dstate), x, dt, z
    (batch, nheads, headdim), A (nheads, headdim, dstate), B, C (batch, ngroups, dstate) with heads h * nheads /
    ngroups .. of group h, D, dt_bias (nheads, headdim); per-head scalars broadcast with expand() (stride 0) are
    fine. Returns y (batch, nheads, headdim). It is the 3-D step over nheads * headdim channels; an A that is
    constant along dstate (stride 0 there, as Mamba-2's expanded per-head A) goes in as one value per channel, so it
    is neither copied out to (nheads * headdim, dstate) each step nor read per state entry.
    """
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return _multihead_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    rows = None  # the state's rows: x's batch
    if state_batch_indices is not None:
        state_batch_indices = _checks.pool_indices("selective_state_update", "state_batch_indices",
                                                   state_batch_indices, x)  # fmt: skip
        rows = state.shape[0] if isinstance(state, torch.Tensor) and state.dim() == 3 else -1
    if not _update_args_ok(state, x, dt, A, B, C, D, z, dt_bias, rows):
        check_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)  # raises, naming the argument
    if B.shape != C.shape:  # other groupings ((batch, dstate) is one group): both spread to the lcm of the two,
        B, C = _same_grouping(B, C)  # the one grouping every backend takes for both
    y = update_dispatcher(
        state,
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        _f32(D),
        _contig(z),
        _f32(dt_bias),
        bool(dt_softplus),
        state_batch_indices=state_batch_indices,
    )
    # No gradient flows through a decode step (as mamba_ssm's): a backward says so instead of dropping them.
    return inference_only("selective_state_update", y, x, dt, A, B, C, D, z, dt_bias,
                          train_with="selective_scan_fn")  # fmt: skip


def _same_grouping(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C (batch, dstate) or (batch, g, dstate), g dividing dim, as (batch, lcm(gB, gC), dstate) each: channel
    d reads group d // (dim / g) either way (small copies, one row per group)."""
    groups = [t.shape[1] if t.dim() == 3 else 1 for t in (B, C)]
    common = math.lcm(*groups)
    return tuple(t.reshape(t.shape[0], g, -1).repeat_interleave(common // g, dim=1) for t, g in zip((B, C), groups))


def _multihead_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    """selective_state_update on (batch, nheads, headdim, dstate) states: the channels (head, p) flattened, head h's
    B / C group h // (nheads / ngroups) being the grouped layout's group of those channels."""
    fn = "selective_state_update"
    _checks.check_updated_in_place(fn, "state", state)  # (viewed flat)
    _, nheads, headdim, dstate = state.shape
    _checks.check_tensor(fn, "x", x, ndim=3, dtypes=ACT_DTYPES)
    batch = x.shape[0]
    _checks.check_shape(fn, "x", x, (batch, nheads, headdim))
    flat = {}
    for name, t, shape in (("dt", dt, (batch, nheads, headdim)), ("A", A, (nheads, headdim, dstate)),
                           ("z", z, (batch, nheads, headdim)), ("D", D, (nheads, headdim)),
                           ("dt_bias", dt_bias, (nheads, headdim))):  # fmt: skip
        if t is not None or name in ("dt", "A"):
            _checks.check_tensor(fn, name, t, ndim=len(shape))
            _checks.check_shape(fn, name, t, shape)
            if name == "A":  # (constant along dstate: one value per channel, see selective_state_update)
                flat[name] = t[..., 0].reshape(-1) if t.stride(-1) == 0 else t.reshape(-1, dstate)
            else:
                flat[name] = t.reshape(*shape[:-2], shape[-2] * shape[-1])
    for name, t in (("B", B), ("C", C)):
        _checks.check_tensor(fn, name, t)
        groups = t.shape[1] if t.dim() == 3 else 1
        if t.dim() not in (2, 3) or groups < 1 or nheads % groups != 0:
            raise ValueError(
                f"llmkernels.{fn}: {name} must be (batch, dstate) or (batch, ngroups, dstate) with ngroups dividing "
                f"nheads = {nheads} for a multi-head state, got {tuple(t.shape)}"
            )
    y = selective_state_update(
        state.view(state.shape[0], nheads * headdim, dstate), x.reshape(batch, nheads * headdim), flat["dt"],
        flat["A"], B, C, flat.get("D"), flat.get("z"), flat.get("dt_bias"), dt_softplus, state_batch_indices,
    )  # fmt: skip
    return y.view(batch, nheads, headdim)


# ---------------------------------------------------------------------------------------------------------
# Fakes and autograd of the C++ ops (they exist only when the extension is loaded).
# ---------------------------------------------------------------------------------------------------------
if _ext.loaded:

    @register_fake("llmkernels::selective_scan_fwd")
    def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx=None):
        last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        if u.device.type == "cpu":  # the CPU kernel's output takes u's layout (at::empty_like), CUDA's is contiguous
            return torch.empty_like(u), last
        return torch.empty_like(u, memory_format=torch.contiguous_format), last

    @register_fake("llmkernels::selective_scan_bwd")
    def _scan_bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                       seq_idx=None):  # fmt: skip
        def like(t, keep_layout=False):
            if t is None:
                return u.new_empty(0, dtype=torch.float32)
            return torch.empty_like(t) if keep_layout else torch.empty_like(t, memory_format=torch.contiguous_format)

        cpu = u.device.type == "cpu"  # the CPU kernel's du, ddelta, dz take their inputs' layouts (at::empty_like)
        return (like(u, cpu), like(delta, cpu), *(like(t) for t in (A, B, C, D)), like(z, cpu),
                *(like(t) for t in (delta_bias, initial_state)))  # fmt: skip

    @register_fake("llmkernels::selective_state_update")
    def _update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _scan_setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        ctx.delta_softplus = delta_softplus

    def _scan_backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        grads = torch.ops.llmkernels.selective_scan_bwd(
            dout if dout.device.type == "cpu" else dout.contiguous(),  # (the CPU kernel reads any strides)
            None if dlast_state is None else dlast_state.contiguous(),
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            ctx.delta_softplus,
            initial_state,
            seq_idx,
        )
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = grads
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None,
            dinit if initial_state is not None else None,
            None,
        )

    torch.library.register_autograd("llmkernels::selective_scan_fwd", _scan_backward, setup_context=_scan_setup_context)
    _checks.refuse_double_backward("llmkernels::selective_scan_bwd")
