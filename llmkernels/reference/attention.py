"""Reference flash attention: the definition every attention backend is tested against.

Semantics are flash_attn 2.x's:
- q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0
  and query head h reads KV head h // (nheads // nheads_k) (GQA; MQA when nheads_k == 1).
- scores s_ij = softmax_scale * q_i . k_j, softmax_scale defaulting to headdim ** -0.5; with softcap > 0,
  s_ij <- softcap * tanh(s_ij / softcap).
- key j is visible to query i when i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right
  (window_size = (left, right), -1 meaning unbounded; causal=True means right = 0). The band is aligned to
  the bottom-right corner, so the last query always sits at the last key.
- ALiBi (alibi_slopes, fp32 (nheads,) or (batch, nheads)): s_ij <- s_ij - slope[b, h] * |i + seqlen_k - seqlen_q - j|,
  after the soft-cap, the distance measured from the query's bottom-right-aligned position (flash_attn's bias).
  flash_attn's causal kernel adds slope * j instead, which differs by a constant per row: the same output, but
  its softmax_lse differs from this one's by slope * (i + seqlen_k - seqlen_q); here lse is that of the scores
  defined above in every case.
- out_i = sum_j softmax(s_i)_j v_j over visible keys; a row that sees no key returns 0 (and its
  log-sum-exp is -inf).
"""

from __future__ import annotations

import math

import torch

from .dropout import dropout_scale


def normalize_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """(left, right) with causal folded in as right = 0; -1 stays unbounded."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def visible_mask(
    seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool: True where key j is visible to query i (bottom-right aligned band)."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    shift = seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    # A bound that excludes no key (left >= seqlen_k, right >= seqlen_q) is none: i + shift +- a bound near 2^63
    # would wrap in int64 and hide every key (the kernels fold it the same way: attention_window.h).
    window_left = -1 if window_left >= seqlen_k else window_left
    window_right = -1 if window_right >= seqlen_q else window_right
    if window_left >= 0:
        mask &= j >= i + shift - window_left
    if window_right >= 0:
        mask &= j <= i + shift + window_right
    return mask


def alibi_bias(
    alibi_slopes: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype
) -> torch.Tensor:
    """-slope[b, h] * |i + seqlen_k - seqlen_q - j| as (batch or 1, nheads, seqlen_q, seqlen_k) in `dtype`."""
    device = alibi_slopes.device
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    distance = (i + seqlen_k - seqlen_q - j).abs().to(torch.float64)
    slopes = alibi_slopes.to(torch.float64).reshape(-1, nheads)[:, :, None, None]
    return (-slopes * distance).to(dtype)


def slopes_of_row(alibi_slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """The (nheads,) slopes of batch row b from (nheads,) or (batch, nheads) alibi_slopes (None stays None)."""
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked, scaled (soft-capped, ALiBi-biased) scores (batch, nheads, seqlen_q, seqlen_k); -inf where hidden."""
    nheads, nheads_k = q.shape[2], k.shape[2]
    k = k.repeat_interleave(nheads // nheads_k, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.shape[0], nheads, q.shape[1], k.shape[1], scores.dtype)
    mask = visible_mask(q.shape[1], k.shape[1], window_left, window_right, q.device)
    return scores.masked_fill(~mask, float("-inf"))


def flash_attn_fwd_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    upcast: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    first_b: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (b, sq, h, d) in q's dtype, softmax_lse (b, h, sq) fp32).

    upcast=True computes in fp32 (fp64 inputs stay fp64): the ground truth. upcast=False computes in the
    inputs' own precision, which is what "the same-precision PyTorch reference" of the tests means.
    dropout_p > 0 drops probabilities as reference/dropout.py draws them from dropout_seed (int64 (2,)), batch
    row b counted as first_b + b; softmax_lse is unchanged by it.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scores = attention_scores(q, k, softmax_scale, window_left, window_right, softcap, alibi_slopes)
    lse = torch.logsumexp(scores.float(), dim=-1)  # -inf for rows that see nothing
    # rows with no visible key (every score -inf) are all-NaN after the softmax: 0. A NaN from the inputs stays NaN.
    probs = torch.softmax(scores, dim=-1).masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    if dropout_p > 0:
        batch, seqlen_q, nheads, _ = q.shape
        keep = dropout_scale(dropout_seed, dropout_p, batch, nheads, seqlen_q, k.shape[1], q.device, first_b)
        probs = probs * keep.to(probs.dtype)
    nheads, nheads_k = q.shape[2], v.shape[2]
    v = v.repeat_interleave(nheads // nheads_k, dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(dtype), lse.float() if lse.dtype != torch.float64 else lse


def flash_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with flash_attn_func's arguments; differentiable through autograd. See the module doc."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    return flash_attn_fwd_ref(q, k, v, scale, left, right, softcap, upcast, alibi_slopes, dropout_p, dropout_seed)[0]


def flash_attn_with_kvcache_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    return_softmax_lse: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_with_kvcache semantics, one batch row at a time (rows may hold different lengths).

    k_cache, v_cache: (batch, max_seqlen, nheads_k, headdim); cache_seqlens: int or (batch,) int32, the
    tokens already in each row's cache (the whole cache when None). k, v: (batch, seqlen_new, nheads_k,
    headdim), written in place at cache_seqlens[i] before attending. q (batch, seqlen_q, nheads, headdim)
    then attends to keys 0 .. cache_seqlens[i] + seqlen_new - 1, the window aligned bottom-right.

    cache_batch_idx ((batch,) int): row i of q uses row cache_batch_idx[i] of the caches. block_table
    ((batch, max_pages) int32, paged KV): the caches are (num_pages, page_size, nheads_k, headdim) and position p
    of row i lives at slot p % page_size of page block_table[i, p // page_size].
    return_softmax_lse: also the log-sum-exp of each row's scores, (batch, nheads, seqlen_q) (-inf where a row
    sees no key), as flash_attn_fwd_ref's. alibi_slopes ((nheads,) or (batch, nheads)): the distance counts from
    each row's own key count cache_seqlens[i] + seqlen_new.
    cache_leftpad ((batch,) int, flash_attn's): row i's cache starts at slot cache_leftpad[i] (a left-padded batch):
    slots before it are not keys, so q attends to slots cache_leftpad[i] .. cache_seqlens[i] + seqlen_new - 1. The
    new tokens still go to slot cache_seqlens[i]; the band and the ALiBi distances are relative, so they do not move.
    """
    batch = q.shape[0]
    if block_table is not None:
        pages, page_size = block_table.long(), k_cache.shape[1]
        capacity = pages.shape[1] * page_size
    else:
        rows = cache_batch_idx.long().tolist() if cache_batch_idx is not None else list(range(batch))
        capacity = k_cache.shape[1]

    def where(i: int, positions: torch.Tensor) -> tuple:
        """Index of row i's cache positions in k_cache / v_cache."""
        if block_table is not None:
            return pages[i, positions // page_size], positions % page_size
        return rows[i], positions

    if cache_seqlens is None:
        lens = [capacity - (k.shape[1] if k is not None else 0)] * batch
    elif isinstance(cache_seqlens, int):
        lens = [cache_seqlens] * batch
    else:
        lens = [int(n) for n in cache_seqlens.tolist()]
    s_new = k.shape[1] if k is not None else 0
    if k is not None:
        for i, n in enumerate(lens):
            at = where(i, torch.arange(n, n + s_new, device=k_cache.device))
            k_cache[at] = k[i]
            v_cache[at] = v[i]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    starts = [0] * batch if cache_leftpad is None else [int(n) for n in cache_leftpad.tolist()]
    outs, lses = [], []
    for i, n in enumerate(lens):
        at = where(i, torch.arange(starts[i], n + s_new, device=k_cache.device))
        slopes = slopes_of_row(alibi_slopes, i)
        out, lse = flash_attn_fwd_ref(
            q[i : i + 1], k_cache[at].unsqueeze(0), v_cache[at].unsqueeze(0), scale, left, right, softcap, upcast,
            slopes,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    if batch == 0:  # (torch.cat refuses an empty list)
        out = q.new_empty(q.shape)
        lse = torch.empty((0, q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        return (out, lse) if return_softmax_lse else out
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=0)) if return_softmax_lse else out


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """flash_attn's rotary embedding (the rotary_cos / rotary_sin of flash_attn_with_kvcache), in fp32.

    x: (batch, seqlen, nheads, headdim); cos, sin: (seqlen_ro, rotary_dim / 2) tables; positions: (batch, seqlen)
    integer rows of the tables. The first rotary_dim channels of each vector are rotated, pairs (2c, 2c + 1) when
    interleaved (GPT-J), else (c, c + rotary_dim / 2) (GPT-NeoX); the other channels pass through.
    """
    half = cos.shape[-1]
    c = cos.float()[positions].unsqueeze(2)  # (batch, seqlen, 1, half)
    s = sin.float()[positions].unsqueeze(2)
    rot = x[..., : 2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)


def attention_naive(
    q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None
) -> torch.Tensor:
    """Explicit loops in float64: an independent formulation to test the reference itself (tiny shapes)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                scores, values = [], []
                for j in range(sk):
                    lo = i + sk - sq - window_left if window_left >= 0 else -math.inf
                    hi_ = i + sk - sq + window_right if window_right >= 0 else math.inf
                    if lo <= j <= hi_:
                        s = softmax_scale * float((q[bi, i, hi].double() * k[bi, j, kh].double()).sum())
                        if softcap > 0:
                            s = softcap * math.tanh(s / softcap)
                        if alibi_slopes is not None:
                            slope = float(slopes_of_row(alibi_slopes, bi)[hi])
                            s -= slope * abs(i + sk - sq - j)
                        scores.append(s)
                        values.append(v[bi, j, kh].double())
                if scores:
                    m = max(scores)
                    w = [math.exp(s - m) for s in scores]
                    z = sum(w)
                    out[bi, i, hi] = sum(wi / z * vj for wi, vj in zip(w, values))
    return out


def flash_attn_varlen_fwd_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    upcast: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_varlen_func semantics: (out (total_q, h, d) in q's dtype, softmax_lse (h, total_q) fp32).

    q: (total_q, nheads, headdim) and k, v: (total_k, nheads_k, headdim) hold a batch of sequences packed end to
    end; sequence i is rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1 of q and cu_seqlens_k[i] .. of k and v
    (cu_seqlens: (batch + 1,) int32, starting at 0, non-decreasing). Each sequence attends only to its own keys,
    with flash_attn_fwd_ref's semantics (the band aligned bottom-right per sequence). Rows before
    cu_seqlens_q[0] or from cu_seqlens_q[-1] on belong to no sequence: out 0, lse -inf. alibi_slopes: (nheads,)
    or (batch, nheads), row i for sequence i, distances within the sequence. Dropout draws sequence i's mask as
    batch row i's (rows and keys counted within the sequence).
    """
    starts_q, starts_k = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    # Zeros in q's graph (masked_fill: NaN rows outside the sequences stay out), so the result stays differentiable
    # even when no sequence has a query row.
    out = q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0.0)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    if q.dtype == torch.float64 and upcast:
        lse = lse.double()
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 == q0:
            continue
        slopes = slopes_of_row(alibi_slopes, i)
        o, s = flash_attn_fwd_ref(
            q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0), v[k0:k1].unsqueeze(0),
            softmax_scale, window_left, window_right, softcap, upcast, slopes, dropout_p, dropout_seed, i,
        )  # fmt: skip
        out[q0:q1] = o[0]
        lse[:, q0:q1] = s[0].to(lse.dtype)
    return out, lse


def flash_attn_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash_attn_varlen_func's arguments -> its output (flash_attn_varlen_fwd_ref's); differentiable."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    return flash_attn_varlen_fwd_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right, softcap, upcast, alibi_slopes, dropout_p, dropout_seed
    )[0]
