"""llmkernels.bert_padding (flash_attn.bert_padding's names): packing a padded batch for flash_attn_varlen_func
and back. The point of the helpers is that attention over the packed rows equals attention over each sequence
alone, so that is what is tested, beside the round trip and the returned offsets."""

from __future__ import annotations

import pytest
import torch

import llmkernels
from llmkernels.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from llmkernels.reference.attention import flash_attn_ref


def _mask(lengths, seqlen, left=False):
    pos = torch.arange(seqlen)[None, :]
    n = torch.tensor(lengths)[:, None]
    return (pos >= seqlen - n) if left else (pos < n)


def test_unpad_pad_round_trip_and_offsets():
    x = torch.randn(3, 7, 2, 5)
    mask = _mask([7, 0, 4], 7)
    rows, indices, cu, max_seqlen, seqused = unpad_input(x, mask.int())
    assert rows.shape == (11, 2, 5) and indices.dtype == torch.int64
    assert cu.tolist() == [0, 7, 7, 11] and cu.dtype == torch.int32 and max_seqlen == 7
    assert seqused.tolist() == [7, 0, 4] and seqused.dtype == torch.int32
    torch.testing.assert_close(rows, x[mask], rtol=0, atol=0)
    back = pad_input(rows, indices, 3, 7)
    torch.testing.assert_close(back, x * mask[:, :, None, None], rtol=0, atol=0)
    assert torch.equal(index_put_first_axis(index_first_axis(x.reshape(21, 2, 5), indices), indices, 21),
                       back.reshape(21, 2, 5))  # fmt: skip


def test_unused_tokens_are_packed_but_not_counted():
    x = torch.randn(2, 6, 3)
    mask, unused = _mask([3, 5], 6), torch.zeros(2, 6, dtype=torch.bool)
    unused[0, 3:5] = True  # allocated slots after the real tokens
    rows, _, cu, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 5, 10] and seqused.tolist() == [3, 5] and max_seqlen == 5 and rows.shape == (10, 3)
    with pytest.raises(ValueError, match="unused_mask must have"):
        unpad_input(x, mask, unused[:, :5])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        unpad_input(x, mask[:1])


def test_varlen_attention_over_unpadded_rows_equals_each_sequence_alone():
    """Right- and left-padded batches (left padding is what generation uses), causal, GQA; gradients reach the
    padded inputs through the packing."""
    for left in (False, True):
        lengths, seqlen = [9, 1, 6], 9
        mask = _mask(lengths, seqlen, left)
        q = torch.randn(3, seqlen, 4, 16, requires_grad=True)
        k = torch.randn(3, seqlen, 2, 16, requires_grad=True)
        v = torch.randn(3, seqlen, 2, 16, requires_grad=True)
        q_u, idx, cu, max_s, _ = unpad_input(q, mask)
        k_u, v_u = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
        out = pad_input(llmkernels.flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_s, max_s, causal=True), idx, 3,
                        seqlen)  # fmt: skip
        out.sum().backward()
        for b in range(len(lengths)):
            rows = mask[b]
            alone = flash_attn_ref(q[b : b + 1, rows], k[b : b + 1, rows], v[b : b + 1, rows], causal=True)[0]
            torch.testing.assert_close(out[b, rows], alone, rtol=1e-5, atol=1e-5)
            assert bool((out[b, ~rows] == 0).all())
            assert bool((q.grad[b, ~rows] == 0).all()) and bool((q.grad[b, rows] != 0).any())
