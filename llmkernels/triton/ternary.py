"""Triton GEMM for ternary linear layers: int8 activations x 2-bit packed weights, tl.dot with int32 accumulation.

Math: out[m, n] = sum_k x[m, k] * W_t[n, k], W_t unpacked in registers from the packed layout of
llmkernels/reference/ternary.py (byte (k // 256) * 64 + k % 64 of a row, bits 2 * ((k % 256) // 64)).
Epilogues: MODE_INT32 stores the exact accumulator; MODE_A8 scales by (s[m] * gamma) / 127 (+ bias) in fp32;
MODE_W2 takes fp16/bf16/fp32 x (fp32 accumulate, IEEE fp32 dot for fp32 x) and scales by gamma (+ bias).

Tiling: (BLOCK_M x BLOCK_N) output tile per program, K in steps of 64 (one s-slab of a packed block, so a
weight tile is 64 consecutive bytes of each row, read once and unpacked with a shift and a mask). Prefill is
bound by the int8 tensor cores; decode by the packed weight stream (K / 4 bytes a row).
Activations for act_bits=8 are quantised by the reference code (torch ops) so x_q is bit-identical.

Tiles of the int8 modes are a TileConfig: the default is the inline rule below (measured on H100: 135 TFLOP/s at
4096x4096, 317 at 28672x8192, 2048 tokens). bench/tune_ternary.py times candidates on a GPU and writes
tuned_ternary.json next to this file, whose winners replace the rule for prefill shapes (m > 64) on that GPU.
What limits the default on Hopper, and what the candidates change:
- BLOCK_K 64 = two k32 int8 wgmma steps per iteration: barriers, the unpack's shared-memory store and the loop
  overhead are paid per 64 k. Candidates: BLOCK_K 128 / 256.
- the unpack runs per element in int32 (load byte, shift by a per-column amount, mask, subtract, narrow: ~5 ALU
  ops per weight, issued by the same warps that issue wgmma) and is shared by BLOCK_M rows of MACs only: at
  BLOCK_M 128 it costs about as many issue slots as the int8 wgmma it feeds. And each packed byte is loaded
  once per 2-bit slab, 4 times in all. Candidates: UNPACK_SLAB (a 256-k step loads its 64 bytes a row once and
  unpacks 4 slabs with a uniform shift), UNPACK_SLAB_ASM (the same, 4 weights per 32-bit register op in inline
  PTX: ~1 op per weight), and BLOCK_M 256 (half the unpack per MAC).
- layouts: x (K-major) and the unpacked W^T (K-major) are what int8 wgmma needs (8-bit wgmma takes K-major
  operands only), but W is produced in registers and wgmma reads B from shared memory only: every k-step stores
  the unpacked tile, fences, and waits for that wgmma before the next unpack (triton 3.8 TTGIR: pendings = 0),
  so ALU and tensor cores overlap only across blocks on an SM. Candidates: `swap` (out^T = W x^T: the weights
  become wgmma's A operand, unpacked in registers in the operand layout, no store or fence), and tiles of <= 128
  registers and <= 113 KiB that fit two blocks an SM. num_stages overlaps the x tiles and packed-byte loads.
- the activation quantisation is 5-6 torch kernels over x before the GEMM (about 0.05 ms of the 0.5 ms at
  4096x4096, 2048 tokens, by HBM traffic); bench/tune_ternary.py times it on its own. The epilogue (one fp32
  scale per row and output, one bf16 store) is small next to the K loop at these K.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..reference.ternary import quantize_activation_ref
from .launch import INTERPRET, launch
from .tuned_file import read_tuned

# constexpr globals: a compiled kernel may only read globals that are tl.constexpr (the interpreter reads any).
MODE_INT32, MODE_A8, MODE_W2 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# How the K loop unpacks weights (int8 modes): ELEMENT is the default (any BLOCK_K dividing 256); the SLAB
# variants step K by 256 (BLOCK_K must be 256).
UNPACK_ELEMENT, UNPACK_SLAB, UNPACK_SLAB_ASM = 0, 1, 2
_UNPACK_ELEMENT, _UNPACK_SLAB = tl.constexpr(UNPACK_ELEMENT), tl.constexpr(UNPACK_SLAB)

# code c -> c - 1 in each byte of a 32-bit register, for the 2-bit field at bit 2S: (c | 0x80) - 1 never borrows
# from the next byte, the xor takes the 0x80 back off (c = 3, never written by the packer, gives 2 like the
# reference's unpack). ptxas merges the and/or into one lop3.
_SLAB_ASM = tuple(
    tl.constexpr(
        "{ .reg .b32 t; "
        + (f"shr.b32 t, $1, {2 * slab}; and.b32 t, t, 0x03030303; " if slab else "and.b32 t, $1, 0x03030303; ")
        + "or.b32 t, t, 0x80808080; sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }"
    )
    for slab in range(4)
)
_SLAB_ASM0, _SLAB_ASM1, _SLAB_ASM2, _SLAB_ASM3 = _SLAB_ASM


@triton.jit
def _unpack_slab(wb, S: tl.constexpr, ASM: tl.constexpr):
    """uint8 packed bytes -> int8 weights of slab S (bits 2S..2S+1)."""
    if ASM:  # elementwise, so which 4 bytes Triton packs into a register does not matter
        if S == 0:
            w = tl.inline_asm_elementwise(_SLAB_ASM0, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        elif S == 1:
            w = tl.inline_asm_elementwise(_SLAB_ASM1, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        elif S == 2:
            w = tl.inline_asm_elementwise(_SLAB_ASM2, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        else:
            w = tl.inline_asm_elementwise(_SLAB_ASM3, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
    else:
        w = ((wb >> (2 * S)) & 3).to(tl.int8) - 1
    return w


@triton.jit
def _ternary_matmul_kernel(
    x_ptr, w_ptr, out_ptr, s_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UNPACK: tl.constexpr = 0, ASM: tl.constexpr = False, SWAP: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # m * stride_om passes int32 for a 65536 x 128256 output (an LM head prefill): the tile's first row is an
    # int64 scalar step, offsets inside the tile stay int32 (a 2-D int64 pointer tile costs registers and ALU).
    tile_m = tl.arange(0, BLOCK_M)
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    x_tile = x_ptr + first_row * stride_xm
    if MODE == MODE_W2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif SWAP:  # int8 modes: acc^T = W x^T, the unpacked weights are wgmma's A operand (registers)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if UNPACK == _UNPACK_SLAB:  # int8 modes, BLOCK_K == 256: a packed block's 64 bytes a row, loaded once
        acc = _slab_k_loop(x_tile, w_ptr, offs_n, mask_n, tile_m, mask_m, K, stride_xm, stride_wn, acc, ASM, SWAP)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_tile + tile_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0
            )
            byte = (offs_k // 256) * 64 + offs_k % 64  # < K_pad / 4 for every k < K_pad: in bounds
            shift = ((offs_k % 256) // 64) * 2
            wb = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :], mask=mask_n[:, None], other=0x55)
            codes = (wb.to(tl.int32) >> shift[None, :]) & 3
            if MODE == MODE_W2:
                w = (codes - 1).to(tl.float32).to(x.dtype)  # exact in every float dtype
                if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong (triton 3.8): do that one in fp32
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE_FP32 or UPCAST:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
            else:
                w = (codes - 1).to(tl.int8)
                # out_dtype spelled out: triton < 3.7 does not infer int32 from the accumulator
                if SWAP:
                    acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    if SWAP:
        acc = tl.trans(acc)
    out_ptrs = out_ptr + first_row * stride_om + (tile_m[:, None] * stride_om + offs_n[None, :])
    out_mask = mask_m[:, None] & mask_n[None, :]
    if MODE == MODE_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        gamma = tl.load(w_scale_ptr)
        if MODE == MODE_A8:
            s = tl.load(s_ptr + offs_m, mask=mask_m, other=1.0)
            y = acc.to(tl.float32) * ((s * gamma) / 127.0)[:, None]
        else:
            y = acc * gamma
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _slab_k_loop(
    x_tile, w_ptr, offs_n, mask_n, tile_m, mask_m, K, stride_xm, stride_wn, acc, ASM: tl.constexpr, SWAP: tl.constexpr
):
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    for k0 in range(0, K, 256):
        # k0 < K <= K_pad and K_pad % 256 == 0: bytes k0 / 4 .. k0 / 4 + 63 exist in every row
        wb = tl.load(w_rows + (k0 // 4 + tl.arange(0, 64))[None, :], mask=mask_n[:, None], other=0x55)
        for s in tl.static_range(4):
            offs_k = k0 + s * 64 + tl.arange(0, 64)
            mask = mask_m[:, None] & (offs_k < K)[None, :]  # zero x past K: the padding codes never count
            x = tl.load(x_tile + tile_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0)
            w = _unpack_slab(wb, s, ASM)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    return acc


class TileConfig(NamedTuple):
    """One launch's tiles. stages None: Triton's default (what the inline rule launches with)."""

    block_m: int
    block_n: int
    block_k: int = 64
    warps: int = 4
    stages: Optional[int] = None  # noqa: UP045  (matches the file's Optional style)
    unpack: int = UNPACK_ELEMENT
    swap: int = 0  # 1: compute out^T = W x^T (the unpacked weights feed wgmma from registers, not shared memory)


def default_config(m: int) -> TileConfig:
    """The untuned rule. Decode: thin tiles over many programs (weight-stream bound); prefill: larger tiles for
    tensor-core reuse."""
    block_m, block_n, warps = (16, 64, 4) if m <= 16 else (64, 64, 4) if m <= 64 else (128, 128, 8)
    return TileConfig(block_m, block_n, 64, warps)


def valid_config(cfg) -> bool:
    """Shapes the kernel accepts: powers of two (tl.arange), tl.dot sides >= 16, BLOCK_K a divisor of 256 (one
    packed block; the ELEMENT unpack's byte index needs it) and 256 for the SLAB unpacks."""
    try:
        cfg = TileConfig(*cfg)
    except TypeError:
        return False
    if not all(type(v) is int for v in cfg[:4]) or type(cfg.unpack) is not int or cfg.swap not in (0, 1):
        return False
    pow2 = all(16 <= b <= 256 and b & (b - 1) == 0 for b in (cfg.block_m, cfg.block_n))
    k_ok = cfg.block_k in (32, 64, 128, 256) and (cfg.unpack == UNPACK_ELEMENT or cfg.block_k == 256)
    stages_ok = cfg.stages is None or (type(cfg.stages) is int and 1 <= cfg.stages <= 8)
    unpack_ok = cfg.unpack in (UNPACK_ELEMENT, UNPACK_SLAB, UNPACK_SLAB_ASM)
    return pow2 and k_ok and stages_ok and unpack_ok and cfg.warps in (1, 2, 4, 8, 16)


# Measured tiles: bench/tune_ternary.py writes tuned_ternary.json next to this file (or where
# LLMKERNELS_TERNARY_CONFIGS points). Its winners, per shape bucket, replace the rule for the int8 modes when the
# file was measured on a GPU of this one's compute capability (tuned_file.py) with the same triton
# major.minor. Anything else, a missing or corrupt file included, keeps the rule. The weight-only mode (float
# tl.dot) always keeps the rule: the candidates were timed for int8 tensor cores.
TUNED_ENV = "LLMKERNELS_TERNARY_CONFIGS"
TUNED_FORMAT = 1
BUCKETS = ("prefill_small", "prefill_large")
_override: list[TileConfig] = []


def shape_bucket(m: int, n: int, k: int) -> Optional[str]:  # noqa: UP045
    """Tuned buckets: prefill (m > 64) by weight size (4096x4096 is small, 28672x8192 large); decode: None."""
    if m <= 64:
        return None
    return "prefill_small" if n * k <= 1 << 25 else "prefill_large"


class config_override:  # noqa: N801  (used like a function: `with config_override(cfg):`)
    """Force one TileConfig on every int8-mode launch in this process: how bench/tune_ternary.py times candidates."""

    def __init__(self, cfg):
        if not valid_config(cfg):
            raise ValueError(f"config_override: invalid ternary tile config {cfg!r}")
        self.cfg = TileConfig(*cfg)

    def __enter__(self):
        _override.append(self.cfg)

    def __exit__(self, *exc):
        _override.pop()


def tuned_path() -> str:
    return os.environ.get(TUNED_ENV) or os.path.join(os.path.dirname(__file__), "tuned_ternary.json")


def _parse_winners(entries: dict) -> dict:
    winners = {}
    for bucket, cfg in entries.items():
        if bucket not in BUCKETS or not valid_config(cfg):
            raise ValueError(f"bad winner {bucket}: {cfg!r}")
        winners[bucket] = TileConfig(*cfg)
    return winners


def load_tuned(path: str, device_name: str, capability, triton_version: str) -> tuple[Optional[dict], str]:  # noqa: UP045
    """({bucket: TileConfig} or None, what was used and why) for this GPU."""
    return read_tuned(path, device_name, capability, triton_version, expected_format=TUNED_FORMAT,
                      fallback="inline rule", parse_winners=_parse_winners)


@functools.cache
def _tuned() -> tuple[Optional[dict], str]:  # noqa: UP045
    """Read once, at the first prefill launch (never at import: the device query initialises CUDA)."""
    if INTERPRET or not torch.cuda.is_available():
        return None, "inline rule (no GPU)"
    name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    return load_tuned(tuned_path(), name, cap, triton.__version__)


def config_source() -> str:
    return _tuned()[1]


def pick_config(mode, m: int, n: int, k: int) -> TileConfig:
    if mode.value == MODE_W2.value:
        return default_config(m)
    if _override:
        return _override[-1]
    bucket = shape_bucket(m, n, k)
    if bucket is None:  # decode: nothing tuned, and no device query for it
        return default_config(m)
    return (_tuned()[0] or {}).get(bucket) or default_config(m)


def _launch(mode: tl.constexpr, x, w_packed, in_features, out, s=None, w_scale=None, bias=None) -> None:
    m, n = x.shape[0], w_packed.shape[0]
    if m == 0 or n == 0:
        return
    cfg = pick_config(mode, m, n, in_features)
    dummy = out  # never read: the constexpr flags switch those loads off
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    stages = {} if cfg.stages is None else {"num_stages": cfg.stages}
    launch(_ternary_matmul_kernel, grid,
        x, w_packed, out, s if s is not None else dummy, w_scale if w_scale is not None else dummy,
        bias.contiguous() if bias is not None else dummy,  # (the kernel reads bias[n] at unit stride)
        m, n, in_features, x.stride(0), w_packed.stride(0), out.stride(0),
        MODE=mode.value, HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        # the interpreter has no inline PTX: there SLAB_ASM runs the SLAB code (same results by construction)
        UNPACK=int(cfg.unpack != UNPACK_ELEMENT), ASM=cfg.unpack == UNPACK_SLAB_ASM and not INTERPRET,
        SWAP=bool(cfg.swap) and mode.value != MODE_W2.value,
        num_warps=cfg.warps, **stages,
    )  # fmt: skip


@torch.library.triton_op("llmkernels::ternary_matmul_int8_triton", mutates_args=())
def ternary_matmul_int8_triton(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x_q: (m, in_features) int8 contiguous -> int32 (m, out_features), exact."""
    out = torch.empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32, device=x_q.device)
    _launch(MODE_INT32, x_q, w_packed, in_features, out)
    return out


@torch.library.triton_op("llmkernels::ternary_linear_a8_triton", mutates_args=())
def ternary_linear_a8_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (Optional: what torch.library's schema inference reads)
    in_features: int,
) -> torch.Tensor:
    """x: (m, in_features) -> (m, out_features) in x's dtype, 8-bit activations."""
    x_q, s = quantize_activation_ref(x)
    out = torch.empty((x.shape[0], w_packed.shape[0]), dtype=x.dtype, device=x.device)
    _launch(MODE_A8, x_q, w_packed, in_features, out, s=s, w_scale=w_scale, bias=bias)
    return out


@torch.library.triton_op("llmkernels::ternary_linear_w2_triton", mutates_args=())
def ternary_linear_w2_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (Optional: what torch.library's schema inference reads)
    in_features: int,
) -> torch.Tensor:
    """x: (m, in_features) fp16/bf16/fp32 -> (m, out_features) in x's dtype, weight-only."""
    out = torch.empty((x.shape[0], w_packed.shape[0]), dtype=x.dtype, device=x.device)
    _launch(MODE_W2, x, w_packed, in_features, out, w_scale=w_scale, bias=bias)
    return out


# Explicit fakes: triton_op would otherwise trace the Python above with FakeTensors, which the CPU
# interpreter cannot launch (it copies tensor storages).
@ternary_matmul_int8_triton.register_fake
def _(x_q, w_packed, in_features):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32)


@ternary_linear_a8_triton.register_fake
def _(x, w_packed, w_scale, bias, in_features):
    return x.new_empty((x.shape[0], w_packed.shape[0]))


@ternary_linear_w2_triton.register_fake
def _(x, w_packed, w_scale, bias, in_features):
    return x.new_empty((x.shape[0], w_packed.shape[0]))
