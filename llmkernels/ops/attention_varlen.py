"""Flash attention over packed variable-length batches, and flash_attn's packed-qkv entry points.

    import llmkernels
    # three sequences of 5, 17 and 1 tokens, packed end to end: q (23, h, d), k, v (23, h_kv, d)
    cu = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    out = llmkernels.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True)  # (23, h, d), differentiable

Sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] .. of k and v, and sees only
its own keys, with flash_attn_func's semantics per sequence (llmkernels/reference/attention.py,
flash_attn_varlen_fwd_ref). Padding-free batches are what flash_attn's users (Hugging Face's padding-free
training, serving engines' prefill) pass this function. Backends: the C++ CPU ops
`llmkernels::flash_attn_varlen_{fwd,bwd}`, Triton on GPUs (llmkernels/triton/flash_attn.py) and the reference;
the CUDA C++ kernels have no varlen mode, so on a GPU the Triton kernels run it.

cu_seqlens values are checked by the CPU backend (they are on the host already) and the reference. The Triton
kernels do not read them on the host (on a GPU that would synchronise every call, as flash_attn does not): they
clamp every sequence into its tensor, so nonsense offsets cannot read or write out of bounds, and max_seqlen_q /
max_seqlen_k only size the launch; results are correct even when they are too small.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import check_same_dtype, check_shape, check_tensor, register_fake
from ..reference.attention import flash_attn_varlen_fwd_ref, normalize_window
from .attention import (
    _DTYPES,
    _check_common,
    _cpu_supports,
    _triton_function,
    _triton_supports_for,
    checked_alibi,
    dropout_args,
    flash_attn_func,
    reference_slopes,
    register_attention_autograd,
)

# --------------------------------------------------------------------------------------------------
# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap)
#   -> (out (total_q, h, d), softmax_lse (h, total_q))
# --------------------------------------------------------------------------------------------------
flash_attn_varlen = Dispatcher("flash_attn_varlen_func")


@flash_attn_varlen.register("reference")
def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap,
                      deterministic=False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    # The kernels check (CPU) or clamp (GPU) the offsets; here nonsense ones would slice silently, and this path
    # reads them back anyway.
    for name, cu, rows in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        offsets = cu.tolist()
        if offsets[0] < 0 or offsets[-1] > rows or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"llmkernels.flash_attn_varlen_func: {name} must be non-decreasing offsets in "
                             f"[0, {rows}] (its tensor's rows), got {offsets}")  # fmt: skip
    return flash_attn_varlen_fwd_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right, softcap, alibi_slopes=reference_slopes(alibi_slopes),
        dropout_p=dropout_p, dropout_seed=dropout_seed,
    )  # fmt: skip


@flash_attn_varlen.register("cpu", kernel="flash_attn_varlen_fwd", supports=_cpu_supports)
def _varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap,
                deterministic=False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    return torch.ops.llmkernels.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap, alibi_slopes,
        dropout_p, dropout_seed,
    )  # fmt: skip


@flash_attn_varlen.register("triton", supports=_triton_supports_for("flash_attn_varlen_triton"))
def _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap,
                   deterministic=False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    _triton_function("flash_attn_varlen_triton")  # imports the module, which registers the op
    return torch.ops.llmkernels.flash_attn_varlen_fwd_triton(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, scale, left, right,
        softcap, deterministic, alibi_slopes, dropout_p, dropout_seed,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _check_varlen_args(
    fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, softcap
) -> None:
    check_tensor(fn, "q", q, ndim=3, dtypes=_DTYPES, last_dim_contiguous=True)
    # The shared checks read the head dim from the last axis and take any rank: view q as one 4-D batch.
    _check_common(fn, q.unsqueeze(0), softmax_scale, window_size, softcap)
    for name, t in (("k", k), ("v", v)):
        check_tensor(fn, name, t, ndim=3, device=q.device, last_dim_contiguous=True)
        check_same_dtype(fn, name, t, "q", q)
    check_shape(fn, "k", k, (k.shape[0], k.shape[1], q.shape[2]))
    check_shape(fn, "v", v, k.shape)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"llmkernels.{fn}: k's nheads_k ({k.shape[1]}) must divide q's nheads ({q.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(fn, name, cu, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cu.shape[0] < 1:
            raise ValueError(f"llmkernels.{fn}: {name} must hold batch + 1 >= 1 offsets, got shape {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"llmkernels.{fn}: cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}, "
            f"got {tuple(cu_seqlens_k.shape)}"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if _checks.known_true(n < 0):  # (from .item() in a trace it is unknown there: no guard on its value)
            raise ValueError(f"llmkernels.{fn}: {name} must be an int >= 0, got {n!r}")


def _length(fn: str, name: str, n, bound: Callable[[], int]):
    """max_seqlen as an int: a Python or NumPy int, or a 0-d integer tensor (what transformers passes:
    cu_seqlens.diff().max()), as flash_attn's int arguments take them. Under torch.compile a symbolic int stays
    symbolic (the ops take a SymInt: no graph per batch's longest sequence), and a tensor, whose value a trace
    cannot read, becomes bound() (the rows a sequence can have at most: a launch size never too small, which is all
    it sizes)."""
    bad = isinstance(n, bool) or (isinstance(n, torch.Tensor) and (
        n.dim() != 0 or n.dtype == torch.bool or n.dtype.is_floating_point or n.dtype.is_complex))  # fmt: skip
    if not bad:
        if isinstance(n, (int, torch.SymInt)):  # (as is: operator.index would specialise a symbolic one)
            return n
        if isinstance(n, torch.Tensor) and torch.compiler.is_compiling():
            return bound()
        try:
            return operator.index(n)
        except TypeError:
            pass
    raise ValueError(f"llmkernels.{fn}: {name} must be an int >= 0, got {n!r}")


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over a packed batch of sequences, like flash_attn.flash_attn_varlen_func; differentiable.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0; cu_seqlens_q,
    cu_seqlens_k: (batch + 1,) int32 on q's device, the sequences' first rows and then the end (non-decreasing);
    max_seqlen_q / max_seqlen_k: the longest sequence's length (a launch-size hint). Each sequence attends only
    to its own keys, the causal / window band aligned bottom-right per sequence. Rows of q outside every
    sequence get 0. Returns (total_q, nheads, headdim) in q's dtype, or with return_attn_probs=True
    (out, softmax_lse (nheads, total_q) fp32, None), lse differentiable. The other arguments (deterministic too)
    are flash_attn_func's; alibi_slopes ((nheads,) or (batch, nheads), row b for sequence b) counts distances
    within each sequence, as flash_attn's.

    block_table ((batch, max_pages) int32, paged KV as in flash_attn): k and v are then (num_pages, page_size,
    nheads_k, headdim) pages and key p of sequence b (p < cu_seqlens_k[b + 1] - cu_seqlens_k[b]) is slot
    p % page_size of page block_table[b, p // page_size]; a sequence may hold at most max_pages * page_size keys.
    The pages are gathered into packed rows first (one copy of the keys, differentiable into the pages; on a GPU
    or under torch.compile, of the table's whole capacity, batch * max_pages * page_size rows, since the total is
    on the device), then the packed kernels run: decoding against a paged cache without that copy is
    flash_attn_with_kvcache(block_table=...).
    """
    fn = "flash_attn_varlen_func"
    max_seqlen_q = _length(fn, "max_seqlen_q", max_seqlen_q, lambda: q.shape[0])
    # (a paged k: a block_table row's capacity)
    k_rows = lambda: k.shape[0] if block_table is None else block_table.shape[1] * k.shape[1]  # noqa: E731
    max_seqlen_k = _length(fn, "max_seqlen_k", max_seqlen_k, k_rows)
    if block_table is not None:
        check_tensor(fn, "q", q, ndim=3, dtypes=_DTYPES, last_dim_contiguous=True)
        k, v = _gather_pages(fn, q, k, v, cu_seqlens_k, block_table, max_seqlen_k)
    _check_varlen_args(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, softcap
    )
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    drop = dropout_args(fn, dropout_p)
    out, lse = flash_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, float(softcap),
        deterministic=bool(deterministic), alibi_slopes=checked_alibi(fn, alibi_slopes, q, cu_seqlens_q.shape[0] - 1),
        **drop,
    )  # fmt: skip
    return (out, lse, None) if return_attn_probs else out


def _gather_pages(fn: str, q, k_pages, v_pages, cu_seqlens_k, block_table,
                  max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Packed (rows, nheads_k, headdim) K and V from a paged cache: row cu_seqlens_k[b] + p holds key p of
    sequence b. On the CPU (and not under torch.compile) the offsets are read and the rows are exactly
    cu_seqlens_k[-1]; elsewhere the table's capacity, batch * max_pages * page_size, a bound known from shapes
    (nothing read back from the device; rows past cu_seqlens_k[-1] belong to no sequence and are never read).
    On the CPU the entries the sequences use are checked; elsewhere they are clamped into range (bad ones give wrong
    keys, never an indexing fault)."""
    check_tensor(fn, "k", k_pages, ndim=4, device=q.device, last_dim_contiguous=True)
    check_tensor(fn, "v", v_pages, ndim=4, device=q.device, last_dim_contiguous=True)
    check_same_dtype(fn, "k", k_pages, "q", q)
    check_same_dtype(fn, "v", v_pages, "q", q)
    check_shape(fn, "k", k_pages, (*k_pages.shape[:3], q.shape[-1]))
    check_shape(fn, "v", v_pages, k_pages.shape)
    check_tensor(fn, "cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens_k.shape[0] < 1:
        raise ValueError(f"llmkernels.{fn}: cu_seqlens_k must hold batch + 1 >= 1 offsets, got shape "
                         f"{tuple(cu_seqlens_k.shape)}")  # fmt: skip
    check_tensor(fn, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=q.device)
    batch = cu_seqlens_k.shape[0] - 1
    check_shape(fn, "block_table", block_table, (batch, block_table.shape[1]))
    num_pages, page_size = k_pages.shape[:2]
    if num_pages == 0 or page_size == 0:
        raise ValueError(f"llmkernels.{fn}: with a block_table, k must hold pages (num_pages, page_size, nheads_k, "
                         f"headdim), got {tuple(k_pages.shape)}")  # fmt: skip
    capacity = block_table.shape[1] * page_size
    if isinstance(max_seqlen_k, int) and _checks.known_true(max_seqlen_k > capacity):
        raise ValueError(f"llmkernels.{fn}: max_seqlen_k ({max_seqlen_k}) passes what a block_table row holds "
                         f"({block_table.shape[1]} pages of {page_size})")  # fmt: skip
    cu = cu_seqlens_k.long()
    total = batch * capacity
    if cu.device.type == "cpu" and batch > 0 and not torch.compiler.is_compiling():
        longest = int((cu[1:] - cu[:-1]).max())  # host values: no sync to read
        if longest > capacity:
            raise ValueError(f"llmkernels.{fn}: a sequence of cu_seqlens_k has {longest} keys, more than a "
                             f"block_table row holds ({block_table.shape[1]} pages of {page_size})")  # fmt: skip
        total = max(int(cu[-1]), 0)
        # The entries the sequences use must be pages, as flash_attn_with_kvcache's CPU op checks (the rest may
        # hold anything, e.g. -1 padding); on a device they stay unread and are clamped below.
        used = ((cu[1:] - cu[:-1]).clamp(min=0) + page_size - 1) // page_size
        entries = block_table[torch.arange(block_table.shape[1]) < used[:, None]]
        if entries.numel() and not (int(entries.min()) >= 0 and int(entries.max()) < num_pages):
            raise ValueError(f"llmkernels.{fn}: block_table entries a sequence uses must be page indices in [0, "
                             f"{num_pages}), got {entries.tolist()}")  # fmt: skip
    if batch <= 0 or capacity == 0 or total == 0:  # no sequence, or no key
        return k_pages.new_zeros((0, *k_pages.shape[2:])), v_pages.new_zeros((0, *v_pages.shape[2:]))
    rows = torch.arange(total, device=q.device)
    seq = torch.searchsorted(cu[1:], rows, right=True).clamp(0, batch - 1)  # the sequence row r belongs to
    pos = (rows - cu[seq]).clamp(0, capacity - 1)
    page = block_table.long()[seq, pos // page_size].clamp(0, num_pages - 1)
    slot = pos % page_size
    return k_pages[page, slot], v_pages[page, slot]


def _unpack(fn: str, name: str, packed: torch.Tensor, parts: int, axis: int) -> tuple[torch.Tensor, ...]:
    if not isinstance(packed, torch.Tensor) or packed.dim() <= axis or packed.shape[axis] != parts:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"llmkernels.{fn}: {name} must have {parts} at dimension {axis}, got {shape}")
    return packed.unbind(axis)  # views: gradients flow back into the packed tensor


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, headdim), like flash_attn.flash_attn_qkvpacked_func."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", "qkv", qkv, 3, 2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim), like flash_attn.flash_attn_kvpacked_func."""
    k, v = _unpack("flash_attn_kvpacked_func", "kv", kv, 2, 2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_varlen_func on qkv (total, 3, nheads, headdim), like flash_attn.flash_attn_varlen_qkvpacked_func."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", "qkv", qkv, 3, 1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim), like flash_attn's varlen_kvpacked_func."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", "kv", kv, 2, 1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd of the C++ ops
# --------------------------------------------------------------------------------------------------
if _ext.loaded:

    @register_fake("llmkernels::flash_attn_varlen_fwd")
    def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, cap,
                         alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @register_fake("llmkernels::flash_attn_varlen_bwd")
    def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, cap, dlse=None,
                         alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    register_attention_autograd("llmkernels::flash_attn_varlen_fwd", torch.ops.llmkernels.flash_attn_varlen_bwd, 5)
    _checks.refuse_double_backward("llmkernels::flash_attn_varlen_bwd")
