"""Compile every Triton kernel of llmkernels for a GPU that is not here, with the real compiler: no GPU needed.

    python scripts/triton_aot_check.py [--all] [--arch 90] [--arch 80] [--only SUBSTRING]

The test suite runs the Triton kernels under TRITON_INTERPRET=1 on machines without a GPU, which checks their
logic but not what only the compiler sees: constexpr-only branches, layouts, tile shapes tl.dot accepts, shared
memory per block, registers and spills. This script calls the package's own Triton ops on CPU tensors with the
launches intercepted (so kernels, arguments, tile configs and warps are exactly what a GPU run would launch),
then compiles each distinct launch ahead of time for the target (sm_90a = H100 by default) and reads ptxas's
resource report. Exit status 1 when a kernel fails to compile or needs more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton and llmkernels.triton are imported: compiled kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # max dynamic shared memory per block (H100 / A100)
TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


class Launch:
    """One intercepted kernel launch: the kernel, its arguments by name, and the launch options."""

    def __init__(self, kernel, args: tuple, kwargs: dict):
        self.kernel = kernel
        self.options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = kernel.arg_names
        self.values = dict(zip(names, args)) | kwargs
        missing = [n for n in names if n not in self.values]
        for p in kernel.params:  # defaults of trailing parameters
            if p.name in missing and p.default is not p.default.__class__:
                self.values[p.name] = p.default

    def source(self):
        signature, constexprs, attrs = {}, {}, {}
        constexpr_names = {p.name for p in self.kernel.params if p.is_constexpr}
        for i, name in enumerate(self.kernel.arg_names):
            value = self.values[name]
            if name in constexpr_names or value is None or isinstance(value, (bool, str)):
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(value, int):
                if value == 1:  # Triton specialises integer arguments equal to 1 into constants
                    signature[name], constexprs[name] = "constexpr", 1
                    continue
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif isinstance(value, TensorDescriptor):
                signature[name] = f"tensordesc<{TYPES[value.base.dtype]}[{','.join(map(str, value.block_shape))}]>"
            else:
                raise TypeError(f"{self.kernel.__name__}: argument {name} of type {type(value).__name__}")
        return signature, constexprs, attrs

    def key(self) -> tuple:
        signature, constexprs, attrs = self.source()
        return (
            self.kernel.__name__,
            tuple(signature.items()),
            tuple(sorted(constexprs.items(), key=str)),
            tuple(sorted(attrs)),
            tuple(sorted(self.options.items())),
        )

    def describe(self) -> str:
        _, constexprs, _ = self.source()
        dtypes = sorted({TYPES[v.dtype] for v in self.values.values() if isinstance(v, torch.Tensor)})
        const = " ".join(f"{k}={v}" for k, v in constexprs.items() if not isinstance(v, bool) or v)
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        if isinstance(self.values.get("ALIBI"), torch.Tensor):  # a pointer, not a constexpr: name it
            const += " ALIBI"
        return f"{self.kernel.__name__} [{','.join(dtypes)}] {const} {opts}"


@contextmanager
def intercept_launches(recorded: list[Launch]):
    """torch.library.wrap_triton(kernel)[grid](*args, **kwargs) records the launch instead of running it."""
    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append(Launch(self.kernel, args, dict(kwargs)))

    saved = torch.library.wrap_triton  # what llmkernels.triton.launch calls, looked up at each launch
    torch.library.wrap_triton = Recorder
    try:
        yield
    finally:
        torch.library.wrap_triton = saved


def _body(op):
    """The Python function behind a torch.library op: called directly, so explicit fake kernels do not answer
    for meta tensors instead of it."""
    return getattr(op, "_init_fn", op)


def drive_launches(full: bool) -> list[Launch]:
    """Call each Triton op on meta tensors of representative shapes; returns the launches they make."""
    from types import SimpleNamespace

    from llmkernels.triton import flash_attn as fa
    from llmkernels.triton import selective_scan as ss
    from llmkernels.triton import sliding_window as sw
    from llmkernels.triton import ternary as tn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from tune_triton import CANDIDATES as tune_candidates

    flash_attn = SimpleNamespace(
        **{
            n: _body(getattr(fa, n))
            for n in ("flash_attn_fwd_triton", "flash_attn_bwd_triton", "flash_attn_with_kvcache_triton",
                      "flash_attn_varlen_fwd_triton", "flash_attn_varlen_bwd_triton")
        }
    )
    sliding_window = SimpleNamespace(rolling_window_attn_triton=_body(sw.rolling_window_attn_triton))
    ternary = SimpleNamespace(
        **{n: _body(getattr(tn, n)) for n in ("ternary_linear_a8_triton", "ternary_linear_w2_triton")}
    )
    selective_scan = SimpleNamespace(
        selective_scan_triton=_body(ss.selective_scan_triton),
        selective_state_update_triton=_body(ss.selective_state_update_triton),
    )

    recorded: list[Launch] = []

    def r(*shape, dtype=torch.float32):
        # Meta tensors: the host code runs (shapes, strides, configs) and nothing is allocated or computed; and
        # host code that picks a config by device ("cpu" = the interpreter) takes its GPU branch.
        return torch.empty(shape, dtype=dtype, device="meta")

    heads = [32, 64, 96, 128, 192, 256] if full else [64, 96, 128, 256]
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if full else [torch.bfloat16, torch.float32]
    masks = [(-1, -1, 0.0), (255, 0, 0.0), (-1, -1, 30.0), (64, 64, 0.0)] if full else [(-1, -1, 0.0), (255, 0, 30.0)]
    with intercept_launches(recorded), torch.no_grad():
        for dtype in dtypes:
            for d in heads if dtype != torch.float32 or full else [64, 128]:
                q, k, v = r(1, 512, 4, d, dtype=dtype), r(1, 512, 2, d, dtype=dtype), r(1, 512, 2, d, dtype=dtype)
                for left, right, cap in masks:
                    out, lse = flash_attn.flash_attn_fwd_triton(q, k, v, d**-0.5, left, right, cap)
                    flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, left, right, cap)
        # The backward's atomic-dq variant runs only where a tuned file picks it: its tune candidates' tiles.
        for d in [64, 128, 256]:
            q, k, v = r(1, 512, 4, d, dtype=torch.bfloat16), r(1, 512, 2, d, dtype=torch.bfloat16), r(1, 512, 2, d,
                                                                                                          dtype=torch.bfloat16)
            out, lse = r(*q.shape, dtype=torch.bfloat16), r(1, 4, 512)
            for cfg in (c for c in tune_candidates["bwd_dkdv"][d] if len(c) == 5):
                for left, right, cap in [(-1, -1, 0.0), (-1, 0, 0.0)] if full else [(-1, 0, 0.0)]:  # tuned masks
                    with fa.config_override(bwd_dkdv=cfg):
                        flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, left, right,
                                                         cap)  # fmt: skip
        _drive_alibi(flash_attn, fa, r, tune_candidates, full)
        _drive_dropout(flash_attn, fa, r, tune_candidates, full)
        for dtype in [torch.float16, torch.bfloat16, torch.float32] if full else [torch.bfloat16]:
            for d in [64, 128, 256] if full else [128]:
                # packed sequences (flash_attn_varlen_func): the same kernels with VARLEN=True
                q, k, v = r(700, 4, d, dtype=dtype), r(900, 2, d, dtype=dtype), r(900, 2, d, dtype=dtype)
                cu = r(4, dtype=torch.int32)
                for left, right, cap in masks:
                    out, lse = flash_attn.flash_attn_varlen_fwd_triton(q, k, v, cu, cu, 512, 512, d**-0.5, left,
                                                                       right, cap)  # fmt: skip
                    flash_attn.flash_attn_varlen_bwd_triton(torch.empty_like(q), q, k, v, out, lse, cu, cu, 512, 512,
                                                            d**-0.5, left, right, cap)  # fmt: skip
        for dtype in [torch.float16, torch.bfloat16] if full else [torch.bfloat16]:
            for d in [64, 128, 256] if full else [128]:
                q = r(4, 1, 8, d, dtype=dtype)
                kc, vc = r(4, 4096, 2, d, dtype=dtype), r(4, 4096, 2, d, dtype=dtype)
                lens = r(4, dtype=torch.int32)
                flash_attn.flash_attn_with_kvcache_triton(q, kc, vc, None, None, lens, d**-0.5, -1, 0, 0.0)
                flash_attn.flash_attn_with_kvcache_triton(q, kc, vc, None, None, lens, d**-0.5, -1, 0, 0.0, None,
                                                          None, None, r(4, dtype=torch.int32))  # cache_leftpad
                for cfg in tune_candidates["decode"].get(d, ()) if full and dtype == torch.bfloat16 else ():
                    with fa.config_override(decode=cfg):  # the decode tiles bench/tune_triton.py times
                        flash_attn.flash_attn_with_kvcache_triton(q, kc, vc, None, None, lens, d**-0.5, -1, 0, 0.0)
                if full:  # 32 packed rows (GQA 8 x 4 queries): the table's 32-row tiles at head dim 64
                    q32 = r(4, 4, 16, d, dtype=dtype)
                    flash_attn.flash_attn_with_kvcache_triton(q32, kc, vc, None, None, lens, d**-0.5, -1, 0, 0.0)
                k_ring, v_ring, seqlens = (
                    r(2, 256, 2, d, dtype=dtype),
                    r(2, 256, 2, d, dtype=dtype),
                    r(2, dtype=torch.int32),
                )
                for s in [1, 64]:
                    qs, ks, vs = r(2, s, 8, d, dtype=dtype), r(2, s, 2, d, dtype=dtype), r(2, s, 2, d, dtype=dtype)
                    sliding_window.rolling_window_attn_triton(qs, ks, vs, k_ring, v_ring, seqlens, d**-0.5, 0.0)
        for m in [1, 16, 512] if full else [1, 512]:
            x = r(m, 2560, dtype=torch.bfloat16)
            w_packed, w_scale = r(2560, 2560 // 4, dtype=torch.uint8), r()
            ternary.ternary_linear_a8_triton(x, w_packed, w_scale, None, 2560)
            ternary.ternary_linear_w2_triton(x, w_packed, w_scale, None, 2560)
        for dtype in [torch.float32, torch.bfloat16]:
            batch, dim, dstate, seqlen = 2, 256, 16, 300
            u, delta, z = (r(batch, dim, seqlen, dtype=dtype) for _ in range(3))
            a, d_skip, delta_bias = r(dim, dstate), r(dim), r(dim)
            for bc_shape in [(batch, dstate, seqlen), (dim, dstate)]:
                b, c = r(*bc_shape, dtype=dtype if len(bc_shape) == 3 else torch.float32), r(*bc_shape)
                selective_scan.selective_scan_triton(u, delta, a, b, c, d_skip, z, delta_bias, True, None)
            x, dt, zz = (r(batch, dim, dtype=dtype) for _ in range(3))
            selective_scan.selective_state_update_triton(
                r(batch, dim, dstate),
                x,
                dt,
                a,
                r(batch, dstate, dtype=dtype),
                r(batch, dstate, dtype=dtype),
                d_skip,
                zz,
                delta_bias,
                True,
            )
            selective_scan.selective_state_update_triton(  # one A per channel (Mamba-2's, flattened): stride 0
                r(batch, dim, dstate), x, dt, r(dim), r(batch, dstate, dtype=dtype), r(batch, dstate, dtype=dtype),
                d_skip, zz, delta_bias, True,
            )  # fmt: skip
            selective_scan.selective_state_update_triton(  # a pool of state rows (state_batch_indices)
                r(3 * batch, dim, dstate), x, dt, a, r(batch, dstate, dtype=dtype), r(batch, dstate, dtype=dtype),
                d_skip, zz, delta_bias, True, r(batch, dtype=torch.int32),
            )  # fmt: skip
        _drive_mamba_ssd(r, full)
        _drive_rmsnorm_gated(r, full)
        _drive_add_norm(r, full)
    return recorded


def _drive_rmsnorm_gated(r, full: bool) -> None:
    """The gated RMSNorm's forward and backward (triton/rmsnorm_gated.py) at Mamba-2 2.7B's norm (5120 channels, one
    group) and with 8 groups of 640, gate first and after, with and without bias."""
    from llmkernels.triton import rmsnorm_gated as rn

    fwd, bwd = _body(rn.rmsnorm_gated_fwd_triton), _body(rn.rmsnorm_gated_bwd_triton)
    for dtype in [torch.float32, torch.bfloat16, torch.float16] if full else [torch.bfloat16]:
        x, z, w = r(300, 5120, dtype=dtype), r(300, 5120, dtype=dtype), r(5120, dtype=dtype)
        for group, bias, nbg in [(5120, None, False), (640, r(5120, dtype=dtype), True)]:
            fwd(x, w, bias, z, 1e-5, group, nbg)
            bwd(r(300, 5120, dtype=dtype), x, w, bias, z, 1e-5, group, nbg)


def _drive_add_norm(r, full: bool) -> None:
    """The residual add + LayerNorm / RMSNorm (triton/layer_norm.py) at Mamba 2.8B's width (2560) and 8192, bf16
    activations beside an fp32 residual stream (MambaLMHeadModel's residual_in_fp32), LayerNorm with bias."""
    from llmkernels.triton import layer_norm as ln

    fwd, bwd = _body(ln.add_norm_fwd_triton), _body(ln.add_norm_bwd_triton)
    for dtype in [torch.float32, torch.bfloat16, torch.float16] if full else [torch.bfloat16]:
        for hidden in [2560, 8192]:
            x, res, w = r(300, hidden, dtype=dtype), r(300, hidden), r(hidden)
            for rms, bias in [(True, None), (False, r(hidden))]:
                fwd(x, res, w, bias, 1e-5, rms, torch.float32)
                bwd(r(300, hidden, dtype=dtype), r(300, hidden), x, res, w, bias, 1e-5, rms)


def _drive_mamba_ssd(r, full: bool) -> None:
    """Mamba-2's chunked forward (triton/mamba_ssd.py) at Mamba-2 2.7B's head shape, dense and packed."""
    from llmkernels.triton import mamba_ssd

    ssd = _body(mamba_ssd.ssd_chunked_triton)
    batch, seqlen, nheads, headdim = 2, 300, 8, 64
    for dtype in [torch.float32, torch.bfloat16, torch.float16] if full else [torch.float32, torch.bfloat16]:
        for dstate in [128, 16] if full else [128]:
            x, z = r(batch, seqlen, nheads, headdim, dtype=dtype), r(batch, seqlen, nheads, headdim, dtype=dtype)
            B, C = r(batch, seqlen, 1, dstate, dtype=dtype), r(batch, seqlen, 1, dstate, dtype=dtype)
            init = r(batch, nheads, headdim, dstate)
            for seq_idx in [None, r(batch, seqlen, dtype=torch.int32)]:
                ssd(x, r(batch, seqlen, nheads), r(nheads), B, C, r(nheads), z, init, seq_idx)


def _drive_dropout(flash_attn, fa, r, tune_candidates, full: bool) -> None:
    """Dropout variants (DROPOUT: a Philox call per score) of the dense and varlen forward and backward (both dq
    ways), bf16 (and fp16 / fp32 with --all), causal, beside their plain twins' registers / spills."""
    seed = torch.tensor([0x9E3779B9, 12345], dtype=torch.int64)  # a key word past 2^31: the int32 bit pattern
    for dtype in [torch.bfloat16, torch.float16, torch.float32] if full else [torch.bfloat16]:
        for d in [64, 128, 256] if full else [128]:
            q, k, v = r(2, 512, 4, d, dtype=dtype), r(2, 512, 2, d, dtype=dtype), r(2, 512, 2, d, dtype=dtype)
            out, lse = flash_attn.flash_attn_fwd_triton(q, k, v, d**-0.5, -1, 0, 0.0, False, None, 0.1, seed)
            flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, -1, 0, 0.0, False, None,
                                             None, 0.1, seed)  # fmt: skip
            for cfg in (c for c in tune_candidates["bwd_dkdv"][d] if len(c) == 5 and dtype != torch.float32):
                with fa.config_override(bwd_dkdv=cfg):
                    flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, -1, 0, 0.0,
                                                     False, None, None, 0.1, seed)  # fmt: skip
            qp, kp, vp = r(700, 4, d, dtype=dtype), r(900, 2, d, dtype=dtype), r(900, 2, d, dtype=dtype)
            cu = r(4, dtype=torch.int32)
            out, lse = flash_attn.flash_attn_varlen_fwd_triton(qp, kp, vp, cu, cu, 512, 512, d**-0.5, -1, 0, 0.0,
                                                               False, None, 0.1, seed)  # fmt: skip
            flash_attn.flash_attn_varlen_bwd_triton(torch.empty_like(qp), qp, kp, vp, out, lse, cu, cu, 512, 512,
                                                    d**-0.5, -1, 0, 0.0, False, None, None, 0.1, seed)  # fmt: skip


def _drive_alibi(flash_attn, fa, r, tune_candidates, full: bool) -> None:
    """ALiBi variants (HAS_ALIBI: one more FMA and abs per score) of the flash attention kernels: the dense forward
    and backward (both dq ways), varlen and decode, bf16 at the head dims of the plain cover, causal (and full
    attention with --all), (b, h) slopes; their registers / spills set beside the plain launches'."""
    dtype = torch.bfloat16
    for d in [64, 128, 256] if full else [128]:
        q, k, v = r(2, 512, 4, d, dtype=dtype), r(2, 512, 2, d, dtype=dtype), r(2, 512, 2, d, dtype=dtype)
        for left, right, cap in [(-1, -1, 0.0), (-1, 0, 0.0)] if full else [(-1, 0, 0.0)]:
            for slopes in (None, r(2, 4)):  # each ALiBi launch beside its plain twin
                out, lse = flash_attn.flash_attn_fwd_triton(q, k, v, d**-0.5, left, right, cap, False, slopes)
                flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, left, right, cap,
                                                 False, None, slopes)  # fmt: skip
                for cfg in (c for c in tune_candidates["bwd_dkdv"][d] if len(c) == 5):
                    with fa.config_override(bwd_dkdv=cfg):
                        flash_attn.flash_attn_bwd_triton(torch.empty_like(q), q, k, v, out, lse, d**-0.5, left,
                                                         right, cap, False, None, slopes)  # fmt: skip
        qp, kp, vp = r(700, 4, d, dtype=dtype), r(900, 2, d, dtype=dtype), r(900, 2, d, dtype=dtype)
        cu = r(4, dtype=torch.int32)
        qd, kc, vc = r(4, 1, 8, d, dtype=dtype), r(4, 4096, 2, d, dtype=dtype), r(4, 4096, 2, d, dtype=dtype)
        for slopes in (None, r(3, 4)):
            out, lse = flash_attn.flash_attn_varlen_fwd_triton(qp, kp, vp, cu, cu, 512, 512, d**-0.5, -1, 0, 0.0,
                                                               False, slopes)  # fmt: skip
            flash_attn.flash_attn_varlen_bwd_triton(torch.empty_like(qp), qp, kp, vp, out, lse, cu, cu, 512, 512,
                                                    d**-0.5, -1, 0, 0.0, False, None, slopes)  # fmt: skip
        for slopes in (None, r(8)):
            flash_attn.flash_attn_with_kvcache_triton(qd, kc, vc, None, None, r(4, dtype=torch.int32), d**-0.5, -1, 0,
                                                      0.0, None, None, slopes)  # fmt: skip


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v of the kernel's PTX."""
    import triton.backends.nvidia as nv

    bundled = Path(nv.__file__).parent / "bin" / "ptxas"  # the ptxas Triton itself compiles with
    ptxas = str(bundled) if bundled.exists() else "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True, check=False
        ).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return (int(regs.group(1)) if regs else -1), max(spills, default=0)


def compile_launch(launch: Launch, arch: int) -> dict:
    signature, constexprs, attrs = launch.source()
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(dict(launch.options))
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    regs, spills = ptxas_report(compiled.asm["ptx"], arch)
    return {"shared": compiled.metadata.shared, "regs": regs, "spills": spills, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every dtype / head dim / mask (slow); default: a cover")
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default 90)")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    arches = args.arch or [90]

    launches = {}
    for launch in drive_launches(args.all):
        if args.only in launch.kernel.__name__:
            launches.setdefault(launch.key(), launch)
    print(
        f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} distinct launches, "
        f"targets {', '.join(f'sm_{a}' for a in arches)}",
        flush=True,
    )
    failures = 0
    for arch in arches:
        for launch in launches.values():
            try:
                res = compile_launch(launch, arch)
            except Exception as exc:  # noqa: BLE001 (a compile error of any kind is the finding)
                failures += 1
                first = str(exc).strip().splitlines()
                print(f"FAIL sm_{arch} {launch.describe()}: {type(exc).__name__}: {first[-1] if first else ''}")
                continue
            over = res["shared"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
            failures += over
            flag = "FAIL (shared memory)" if over else ("spills" if res["spills"] else "ok")
            print(
                f"{flag:5s} sm_{arch} regs={res['regs']:3d} spill={res['spills']:4d}B "
                f"smem={res['shared'] // 1024:3d}KiB {res['seconds']:4.1f}s  {launch.describe()}",
                flush=True,
            )
    print(f"== {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
