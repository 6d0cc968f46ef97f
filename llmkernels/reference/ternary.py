"""Reference ternary (BitNet b1.58) linear layers: the definition every ternary backend is tested against.

Quantisation (BitNet b1.58 training notes):
- weights, per tensor: gamma = max(mean|W|, 1e-5), W_t = clamp(round(W / gamma), -1, 1), int8 in {-1, 0, 1};
- activations, per token (last dim): s = max(max|x|, 1e-5), x_q = clamp(round((x * 127) / s), -128, 127).
  Everything in fp32, in exactly that order ((x * 127) first, then one IEEE division by s), and round()
  is round-half-to-even (torch.round, C rint / nearbyint, CUDA rintf): x_q is bit-identical on every backend.

Linear:
- act_bits=8:    y = (x_q @ W_t^T, exact int32) * ((s * gamma) / 127) (+ bias), fp32 epilogue, y in x's dtype;
- act_bits=None: y = (x @ W_t^T in fp32) * gamma (+ bias), y in x's dtype (weight-only).

Packed layout (2 bits a weight, what the CPU / CUDA / Triton kernels read):
- in_features is padded to K_pad = ceil(in_features / 256) * 256 with zero weights;
- w_packed: uint8 (out_features, K_pad // 4). Each 256-weight block b of a row is 64 bytes; byte j of block b
  holds the weights k = 256 b + 64 s + j for s = 0..3 in bits 2s..2s+1, as the code w + 1 in {0, 1, 2}
  (3 never occurs). Shifting a block's 64 bytes by 2s and masking with 3 gives 64 consecutive weights,
  which is what one AVX-512 register, two AVX2 registers or four 16-byte CUDA loads want.
"""

from __future__ import annotations

import torch

PACK_BLOCK = 256  # weights per packed block (64 bytes): in_features is padded to a multiple of this
WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def padded_in_features(in_features: int) -> int:
    """in_features rounded up to whole 256-weight packing blocks (K_pad)."""
    return (in_features + PACK_BLOCK - 1) // PACK_BLOCK * PACK_BLOCK


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The packed weights' shape, (out_features, K_pad // 4) uint8: four 2-bit weights a byte."""
    return out_features, padded_in_features(in_features) // 4


def pack_ternary_ref(w_t: torch.Tensor) -> torch.Tensor:
    """w_t: (out_features, in_features) integer in {-1, 0, 1} -> uint8 (out_features, K_pad // 4)."""
    n, k = w_t.shape
    k_pad = padded_in_features(k)
    codes = torch.ones(n, k_pad, dtype=torch.uint8, device=w_t.device)  # padding: weight 0 = code 1
    codes[:, :k] = (w_t.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.view(n, k_pad // PACK_BLOCK, 4, 64)  # (row, block b, s, byte j)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=w_t.device).view(1, 1, 4, 1)
    packed = (codes << shifts).sum(dim=2, dtype=torch.uint8)  # disjoint bit fields: sum == bitwise or
    return packed.reshape(n, k_pad // 4)


def unpack_ternary_ref(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """packed: uint8 (out_features, K_pad // 4) -> int8 (out_features, in_features) in {-1, 0, 1}.

    Code 3 (not a ternary value) unpacks to 2, so a caller can detect it."""
    n = packed.shape[0]
    k_pad = packed.shape[1] * 4
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    codes = (packed.view(n, k_pad // PACK_BLOCK, 1, 64) >> shifts) & 3  # (row, block, s, byte)
    return (codes.reshape(n, k_pad).to(torch.int8) - 1)[:, :in_features]


def quantize_weight_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out_features, in_features) float -> (W_t int8 in {-1, 0, 1}, gamma fp32 0-dim)."""
    wf = w.float()
    gamma = wf.abs().mean().clamp_min(WEIGHT_EPS)
    w_t = torch.round(wf / gamma).clamp_(-1, 1).to(torch.int8)
    return w_t, gamma


def quantize_activation_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., in_features) float -> (x_q int8 (..., in_features), s fp32 (...))."""
    xf = x.float()
    s = xf.abs().amax(dim=-1).clamp_min(ACT_EPS)
    # A row holding a NaN or inf gets s = NaN / inf, so its x * 127 / s is 0 or NaN: NaN -> 0 explicitly (a NaN's
    # cast to int8 is undefined), and the row's outputs (0 * s) come out NaN on every backend.
    x_q = torch.round(xf * 127.0 / s.unsqueeze(-1)).nan_to_num_(nan=0.0).clamp_(-128, 127).to(torch.int8)
    return x_q, s


def ternary_matmul_int8_ref(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x_q: (m, in_features) int8 -> int32 (m, out_features), x_q @ W_t^T exactly.

    float64 holds every partial sum exactly (|sum| <= 128 * in_features < 2^53) and runs on any device."""
    w_t = unpack_ternary_ref(w_packed, in_features)
    return (x_q.double() @ w_t.double().T).to(torch.int32)


def ternary_linear_a8_ref(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, in_features: int
) -> torch.Tensor:
    """x: (m, in_features) -> (m, out_features) in x's dtype; 8-bit activations (BitNet b1.58 exactly)."""
    x_q, s = quantize_activation_ref(x)
    acc = ternary_matmul_int8_ref(x_q, w_packed, in_features)
    y = acc.float() * (s.unsqueeze(-1) * w_scale.float() / 127.0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def ternary_linear_w2_ref(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, in_features: int
) -> torch.Tensor:
    """x: (m, in_features) -> (m, out_features) in x's dtype; full-precision activations, fp32 accumulation."""
    w_t = unpack_ternary_ref(w_packed, in_features)
    y = (x.float() @ w_t.float().T) * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------------
# Naive twins, only for testing the reference: Python scalars and loops, tiny inputs.
# ------------------------------------------------------------------------------------------------------


def quantize_activation_naive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row with Python's round() (half to even) on the fp32 value of (x * 127) / s."""
    rows = x.float().reshape(-1, x.shape[-1])
    x_q = torch.empty(rows.shape, dtype=torch.int8)
    s_all = torch.empty(rows.shape[0], dtype=torch.float32)
    for i, row in enumerate(rows):
        s = torch.tensor(max(max(abs(v) for v in row.tolist()), ACT_EPS), dtype=torch.float32)
        s_all[i] = s
        for j, v in enumerate(row):
            q = ((v * torch.tensor(127.0)) / s).item()  # fp32 ops, in the documented order
            x_q[i, j] = max(-128, min(127, round(q)))
    return x_q.reshape(x.shape), s_all.reshape(x.shape[:-1])


def ternary_linear_naive(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act_bits: int | None
) -> torch.Tensor:
    """From latent float weights w (out, in): quantise W with Python loops, then int / float64 dot products."""
    w64 = w.double()
    gamma = max(sum(abs(v) for v in w64.flatten().tolist()) / w64.numel(), WEIGHT_EPS)
    w_t = [[max(-1, min(1, round(v / gamma))) for v in row] for row in w64.tolist()]
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], w.shape[0], dtype=torch.float64)
    if act_bits == 8:
        x_q, s = quantize_activation_naive(rows)
        for i in range(rows.shape[0]):
            for n, wrow in enumerate(w_t):
                acc = sum(int(a) * b for a, b in zip(x_q[i].tolist(), wrow))
                out[i, n] = acc * float(s[i]) * gamma / 127
    else:
        for i, row in enumerate(rows.double().tolist()):
            for n, wrow in enumerate(w_t):
                out[i, n] = sum(a * b for a, b in zip(row, wrow)) * gamma
    if bias is not None:
        out += bias.double()
    return out.reshape(*x.shape[:-1], w.shape[0])
