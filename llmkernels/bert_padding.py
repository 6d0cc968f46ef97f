"""Padding helpers for the packed (varlen) attention functions, with flash_attn.bert_padding's names, so code that
packs a padded batch for flash_attn_varlen_func switches with an import change:

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)   # (total, ...) rows
    out = llmkernels.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, ...)
    out = pad_input(out, indices, batch, seqlen)                                         # back to (batch, seqlen, ...)

unpad_input returns flash_attn >= 2.6's five values. Plain torch indexing: differentiable, any device. Not
provided: unpad_input_for_concatenated_sequences and index_first_axis_residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[indices] along the first axis: (total, ...) rows of a (batch * seqlen, ...) tensor."""
    return x.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero (first_axis_dim, ...) tensor with values at rows indices (the inverse of index_first_axis)."""
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices, values)


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(rows, indices, cu_seqlens, max_seqlen_in_batch, seqused) of a padded batch.

    hidden_states: (batch, seqlen, ...); attention_mask: (batch, seqlen), nonzero where a token is real;
    unused_mask (optional, same shape): tokens that are kept in the packed rows but not counted in seqused (as
    flash_attn's; a token is kept when either mask is nonzero, where flash_attn sums them: the same for 0 / 1
    masks that do not overlap).
    rows: (total, ...) the kept tokens in batch-then-position order; indices: their flat positions (int64) in
    batch * seqlen; cu_seqlens: (batch + 1,) int32 offsets of each sequence's rows; max_seqlen_in_batch: the
    longest sequence (a Python int: read from the device once); seqused: (batch,) int32 tokens per sequence that
    attention_mask marks (the used ones).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"llmkernels.unpad_input: attention_mask must have shape (batch, seqlen) = "
                         f"{tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}")  # fmt: skip
    if unused_mask is not None and tuple(unused_mask.shape) != tuple(attention_mask.shape):
        raise ValueError(f"llmkernels.unpad_input: unused_mask must have attention_mask's shape "
                         f"{tuple(attention_mask.shape)}, got {tuple(unused_mask.shape)}")  # fmt: skip
    used = attention_mask.bool()
    keep = used | unused_mask.bool() if unused_mask is not None else used
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    seqused = used.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    rows = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return rows, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seqlen, ...) from packed rows (total, ...) at flat positions indices; zeros elsewhere."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
