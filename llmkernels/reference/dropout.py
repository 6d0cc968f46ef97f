"""Attention dropout: which probabilities are kept, as a pure function of (seed, batch, head, query, key).

Every backend (this reference, the C++ CPU kernels, the Triton kernels) draws the same mask, so a backend's
dropout output is compared with the reference's exactly as without dropout, and the backward recomputes the
forward's mask from the seed instead of storing it (O(seqlen) memory, as flash_attn).

The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), a
counter-based generator: four 32-bit words out of a 128-bit counter and a 64-bit key, no state. For the
probability p_ij of (batch or packed sequence b, query head h, query row i, key j), both counted from 0 within
the sequence:

    key     = (seed[0], seed[1])                          # dropout_seed: int64 (2,) of 32-bit words
    counter = (j // 8, i, b * nheads + h, 0)               # as uint32
    words   = philox4x32_10(counter, key)                  # 128 bits: eight 16-bit draws for keys 8g .. 8g + 7
    draw    = (words[(j % 8) // 2] >> (16 * (j % 2))) & 0xFFFF
    kept    = draw >= threshold,  threshold = min(floor(dropout_p * 2**16), 2**16 - 1)

and a kept probability is scaled by 1 / P(kept) = 2**16 / (2**16 - threshold) (~ 1 / (1 - dropout_p), exactly
unbiased for the 16-bit draws): out_i = sum_j p_ij kept_ij keep_scale v_j.
softmax_lse is that of the scores, before dropout (as flash_attn's). Eight keys share one Philox call: a call costs
~100 integer operations, more than a score's share of the tensor-core work, so the kernels amortise it (flash_attn
splits its words into 8-bit draws, 16 per call, and rounds dropout_p to 1/256; 16-bit draws keep P(kept) within
2**-16 of 1 - dropout_p).
"""

from __future__ import annotations

import math
import numbers

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a * b, b an int64 tensor of values in [0, 2**32), in int64
    arithmetic: b is split into 16-bit halves so that no partial product overflows."""
    lo_part = a * (b & 0xFFFF)  # < 2**48
    hi_part = a * (b >> 16)  # < 2**48
    t = (lo_part >> 16) + hi_part  # the product >> 16, < 2**49
    low = (lo_part & 0xFFFF) | ((t & 0xFFFF) << 16)
    return t >> 16, low


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 as int64 tensors in [0, 2**32). counter: four int64 tensors (or ints)
    broadcast together, key: two ints or int64 tensors, all in [0, 2**32)."""
    # (tensors kept where they are: as_tensor would move them to a torch.device(...) context's device)
    as_int64 = lambda c: c.long() if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.int64)  # noqa: E731
    c0, c1, c2, c3 = (as_int64(c) for c in counter)
    k0, k1 = (as_int64(k) for k in key)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def keep_threshold(dropout_p: float) -> int:
    """The 16-bit draw below which a probability is dropped (so P(kept) = 1 - dropout_p up to 2**-16)."""
    return min(math.floor(float(dropout_p) * 2.0**16), 0xFFFF)


def keep_scale(dropout_p: float) -> float:
    """The factor of a kept probability: 1 / P(kept), so that the expected output is the undropped one."""
    return 65536.0 / (65536.0 - keep_threshold(dropout_p))


def seed_words(dropout_seed: torch.Tensor) -> tuple[int, int]:
    """The Philox key from an int64 (2,) dropout_seed (each taken modulo 2**32)."""
    s0, s1 = (int(x) for x in dropout_seed.reshape(-1)[:2].tolist())
    return s0 & MASK32, s1 & MASK32


def new_dropout_seed() -> torch.Tensor:
    """A fresh int64 (2,) CPU seed from torch's default generator (so torch.manual_seed makes runs repeatable)."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device="cpu")  # (not the default device's generator)


def dropout_keep(dropout_seed: torch.Tensor, dropout_p: float, bh: torch.Tensor, i: torch.Tensor,
                 j: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Bool tensor: whether probability (b * nheads + h = bh, query i, key j) is kept; bh, i, j int64 tensors
    broadcast together (on any device)."""
    device = torch.broadcast_tensors(bh, i, j)[0].device
    key = tuple(torch.tensor(w, dtype=torch.int64, device=device) for w in seed_words(dropout_seed))
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32_10(((j >> 3) & MASK32, i & MASK32, bh & MASK32, zero), key)
    lane = (j & 7) >> 1
    word = torch.where(lane < 2, torch.where(lane == 0, words[0], words[1]), torch.where(lane == 2, words[2], words[3]))
    draw = (word >> (16 * (j & 1))) & 0xFFFF
    return draw >= keep_threshold(dropout_p)


def dropout_scale(dropout_seed: torch.Tensor, dropout_p: float, batch: int, nheads: int, seqlen_q: int,
                  seqlen_k: int, device: torch.device | str = "cpu", first_b: int = 0) -> torch.Tensor:  # fmt: skip
    """(batch, nheads, seqlen_q, seqlen_k) fp32: keep_scale(dropout_p) where kept, 0 where dropped. first_b: the
    index of the first batch row (a packed sequence's number)."""
    b = torch.arange(first_b, first_b + batch, device=device)[:, None, None, None]
    h = torch.arange(nheads, device=device)[None, :, None, None]
    i = torch.arange(seqlen_q, device=device)[None, None, :, None]
    j = torch.arange(seqlen_k, device=device)[None, None, None, :]
    kept = dropout_keep(dropout_seed, dropout_p, b * nheads + h, i, j)
    return kept.to(torch.float32) * keep_scale(dropout_p)


def check_dropout_p(fn: str, dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"llmkernels.{fn}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
