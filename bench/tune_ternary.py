"""Times candidate tiles of the Triton ternary prefill GEMM (int8 activations x packed 2-bit weights) on a GPU and
writes the winners to llmkernels/triton/tuned_ternary.json, which llmkernels/triton/ternary.py then uses for
prefill shapes (m > 64) of the int8 modes on GPUs of that name and the same triton major.minor.

    python bench/tune_ternary.py [--budget-s 300] [--out PATH]
    python bench/tune_ternary.py --aot              # no GPU: compile every candidate for sm_90a, ptxas report
    python bench/tune_ternary.py --smoke [--out P]  # CPU: tiny shapes under TRITON_INTERPRET=1

Shapes: 2048 tokens x (4096x4096) and x (28672x8192), one per bucket of ternary.shape_bucket. Every candidate's
int32 accumulator (ternary_matmul_int8_triton) must equal the default config's bit for bit, and so must its
bf16 output of ternary_linear_a8_triton; accepted ones are timed with triton.testing.do_bench (median): `gemm_ms`
the int32 GEMM alone (picks the winner), `a8_ms` the whole op (activation quantisation included). For scale,
not used to pick: the quantisation alone, cuBLAS bf16 F.linear, torch._int_mm on pre-unpacked int8 weights.
Candidates that fail to compile or launch, or differ from the default, are recorded, not used.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "llmkernels", "triton", "tuned_ternary.json")
SMOKE_OUT = os.path.join(tempfile.gettempdir(), "llmkernels_tuned_ternary_smoke.json")

# (tokens, out_features, in_features); bucket from ternary.shape_bucket
GPU_SHAPES = [(2048, 4096, 4096), (2048, 28672, 8192)]
SMOKE_SHAPES = [(70, 19, 300), (97, 130, 513)]  # ragged m, n and k tiles, K past one packed block

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, unpack, swap): unpack 0 = per element (the default's),
# 1 = slab, 2 = slab + inline-PTX unpack; swap 1 = out^T = W x^T, so the unpacked weights are wgmma's A operand
# straight from registers (the unswapped kernel stores them to shared memory and fences before every wgmma).
# ternary.py says why each should help. Compiled for sm_90a with triton 3.8 (`--aot`): all wgmma, no spills, at
# most 216 KiB of shared memory; the (regs, smem) of each are noted, "2/SM" where two blocks fit an SM (every
# wgmma here is waited for before the next unpack, so a second block is what overlaps ALU and tensor cores;
# 2/SM needs <= 128 registers a thread at 8 warps).
CANDIDATES = [
    (128, 128, 128, 8, 3, 0, 0),  # the default's loop, half the iterations (139 regs, 96 KiB)
    (128, 128, 256, 8, 3, 1, 0),  # packed bytes loaded once per 256 k (126, 120 KiB)
    (128, 128, 256, 8, 3, 2, 0),  # + 4 weights per register op (112, 120 KiB)
    (128, 128, 256, 8, 2, 2, 0),  # (111, 80 KiB: 2/SM)
    (256, 128, 256, 8, 3, 2, 0),  # half the unpack per MAC (184, 216 KiB)
    (256, 128, 128, 8, 3, 0, 0),  # (232, 144 KiB)
    (128, 128, 64, 8, 3, 0, 1),  # the default's tiles, swapped (118, 48 KiB: 2/SM)
    (128, 128, 128, 8, 2, 0, 1),  # (145, 64 KiB)
    (128, 128, 256, 8, 2, 2, 1),  # (120, 80 KiB: 2/SM)
    (128, 128, 256, 8, 2, 1, 1),  # the one above without the PTX unpack (130, 80 KiB)
    (128, 128, 256, 8, 3, 2, 1),  # (117, 120 KiB)
    (128, 256, 256, 8, 2, 2, 1),  # 256 weight rows x 128 tokens (209, 96 KiB)
    (256, 128, 256, 8, 2, 2, 1),  # 128 weight rows x 256 tokens (187, 144 KiB)
    (128, 64, 256, 4, 3, 2, 1),  # one warpgroup (122, 108 KiB)
]
SMOKE_CANDIDATES = [
    (16, 16, 64, 1, 1, 0, 0),
    (32, 16, 128, 2, 1, 0, 1),
    (16, 32, 256, 1, 1, 1, 0),
    (32, 32, 256, 2, 1, 2, 1),
]


def tn():
    from llmkernels.triton import ternary

    return ternary


def candidate_list(m: int, smoke: bool) -> list[tuple]:
    default = tuple(tn().default_config(m))
    return list(dict.fromkeys([default, *(SMOKE_CANDIDATES if smoke else CANDIDATES)]))


def make_inputs(m: int, n: int, k: int, device: str, seed: int = 0) -> dict:
    """bf16 activations of varied row scale and random packed codes in {0, 1, 2} (the packer's alphabet)."""
    import torch

    from llmkernels.reference.ternary import padded_in_features, quantize_activation_ref

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=gen) * torch.rand(m, 1, device=device, generator=gen).mul(4).exp2()
    x = x.to(torch.bfloat16)
    codes = torch.randint(0, 3, (n, padded_in_features(k) // 4, 4), device=device, generator=gen, dtype=torch.uint8)
    w_packed = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
    w_scale = torch.rand((), device=device, generator=gen) + 0.5
    x_q, _ = quantize_activation_ref(x)
    return dict(x=x, x_q=x_q, w_packed=w_packed.contiguous(), w_scale=w_scale, k=k)


def run_int8(inp: dict, cfg):
    import torch

    with tn().config_override(cfg):
        return torch.ops.llmkernels.ternary_matmul_int8_triton(inp["x_q"], inp["w_packed"], inp["k"])


def run_a8(inp: dict, cfg):
    import torch

    with tn().config_override(cfg):
        return torch.ops.llmkernels.ternary_linear_a8_triton(inp["x"], inp["w_packed"], inp["w_scale"], None, inp["k"])


def do_bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def sweep(shapes, *, smoke: bool, timer, budget_s: float, log=print, checkpoint=None) -> dict:
    import torch

    t_start = time.perf_counter()
    device = "cpu" if smoke else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    doc = metadata(device, smoke, budget_s)
    records = doc["candidates"]
    try:
        for m, n, k in shapes:
            bucket = tn().shape_bucket(m, n, k)
            inp = make_inputs(m, n, k, device)
            tops = 2.0 * m * n * k / 1e12
            ref = None
            for i, cfg in enumerate(candidate_list(m, smoke)):
                rec = dict(shape=[m, n, k], bucket=bucket, config=list(cfg), default=i == 0, status="skipped")
                records.append(rec)
                if time.perf_counter() - t_start > budget_s:
                    rec["error"] = "budget exhausted"
                    continue
                try:
                    t0 = time.perf_counter()
                    got = (run_int8(inp, cfg), run_a8(inp, cfg))
                    sync()
                    rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                except Exception as exc:  # compile error, out of shared memory: recorded, never fatal
                    rec.update(status="failed", error=f"{exc.__class__.__name__}: {str(exc).splitlines()[:1]}"[:300])
                    log(f"  {bucket} {cfg}: FAILED {rec['error']}")
                    continue
                if ref is None:  # the default (or, if it failed, the first that ran)
                    ref, rec["reference"] = got, True
                elif not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])):
                    diff = (got[0] != ref[0]).sum().item()
                    rec.update(status="rejected", error=f"{diff} int32 outputs differ from the reference config's")
                    log(f"  {bucket} {cfg}: REJECTED {rec['error']}")
                    continue
                del got
                gemm = timer(lambda cfg=cfg, inp=inp: run_int8(inp, cfg))
                a8 = timer(lambda cfg=cfg, inp=inp: run_a8(inp, cfg))
                rec.update(status="ok", gemm_ms=round(gemm, 4), a8_ms=round(a8, 4), gemm_tops=round(tops / gemm * 1e3))
                log(f"  {bucket} {cfg}: gemm {gemm:.3f} ms ({rec['gemm_tops']} TOP/s), a8 op {a8:.3f} ms")
            if not smoke:
                doc["reference"].append(reference_timings(inp, m, n, k, timer, log))
            del inp, ref
            if checkpoint is not None:
                doc["winners"], doc["summary"] = winners(records)
                checkpoint(doc)
        doc["complete"] = all(r["status"] != "skipped" for r in records)
    except Exception:  # still write what was measured
        doc["error"] = traceback.format_exc()
        log(doc["error"])
    doc["winners"], doc["summary"] = winners(records)
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return doc


def winners(records: list[dict]) -> tuple[dict, list[dict]]:
    """{bucket: fastest accepted config by GEMM time} (a bucket's last shape decides: one shape each on the GPU)
    and one summary row per shape."""
    out, summary = {}, []
    for shape in dict.fromkeys(tuple(r["shape"]) for r in records):
        recs = [r for r in records if tuple(r["shape"]) == shape]
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["gemm_ms"])
        out[best["bucket"]] = best["config"]
        d = next((r for r in recs if r["default"] and r["status"] == "ok"), None)
        summary.append(dict(bucket=best["bucket"], shape=list(shape), winner=best["config"], gemm_ms=best["gemm_ms"],
                            a8_ms=best["a8_ms"], default_gemm_ms=d and d["gemm_ms"], default_a8_ms=d and d["a8_ms"],
                            speedup=round(d["gemm_ms"] / best["gemm_ms"], 3) if d else None))  # fmt: skip
    return out, summary


def reference_timings(inp: dict, m: int, n: int, k: int, timer, log=print) -> dict:
    """Context for the GEMM times: what the quantisation costs, and the two kernels to beat."""
    import torch
    import torch.nn.functional as F

    from llmkernels.reference.ternary import quantize_activation_ref, unpack_ternary_ref

    row = dict(shape=[m, n, k])
    try:
        row["quantize_ms"] = round(timer(lambda: quantize_activation_ref(inp["x"])), 4)
        w_i8 = unpack_ternary_ref(inp["w_packed"], k)
        w_bf16 = w_i8.to(torch.bfloat16)
        row["f_linear_bf16_ms"] = round(timer(lambda w=w_bf16: F.linear(inp["x"], w)), 4)
        del w_bf16
        row["int_mm_unpacked_ms"] = round(timer(lambda: torch._int_mm(inp["x_q"], w_i8.t())), 4)
    except Exception as exc:  # context only
        row["error"] = f"{exc.__class__.__name__}: {exc}"[:300]
    log(f"  reference {m}x{n}x{k}: {row}")
    return row


def metadata(device: str, smoke: bool, budget_s: float) -> dict:
    import platform

    import torch
    import triton

    if device == "cuda":
        name, cap = torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())
    else:
        name, cap = f"cpu (TRITON_INTERPRET=1, {platform.machine()})", [0, 0]
    return dict(
        format=tn().TUNED_FORMAT, device=name, capability=cap, torch=torch.__version__, cuda=torch.version.cuda,
        triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), smoke=smoke, budget_s=budget_s,
        config_fields="(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages or null = Triton's default, unpack, swap)",
        timing="triton.testing.do_bench median (ms); gemm: int32 GEMM op; a8: ternary_linear_a8_triton (bf16, "
        "quantisation included); TOP/s = 2*m*n*k / gemm time", complete=False, candidates=[], reference=[],
    )  # fmt: skip


def aot_report(arch: int = 90) -> int:
    """Compile the default and every candidate for sm_{arch} through the op's own launch (meta tensors): ptxas's
    registers / spills, shared memory, and whether the dots became wgmma (Hopper) or stayed mma.sync."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import torch
    import triton
    import triton_aot_check as aot  # pops TRITON_INTERPRET: before llmkernels.triton is imported
    from triton.backends.compiler import GPUTarget

    body = aot._body(tn().ternary_linear_a8_triton)
    m, n, k = GPU_SHAPES[0]  # the binary depends on the tiles, not the shape (both shapes' sizes divide by 16)
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    w = torch.empty(n, k // 4, dtype=torch.uint8, device="meta")
    failures = 0
    for cfg in candidate_list(m, smoke=False):
        recorded: list = []
        with aot.intercept_launches(recorded), tn().config_override(cfg), torch.no_grad():
            body(x, w, torch.empty((), device="meta"), None, k)
        launch = recorded[-1]
        try:
            signature, constexprs, attrs = launch.source()
            src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            target = GPUTarget("cuda", arch, 32)
            options = triton.compiler.make_backend(target).parse_options(dict(launch.options))
            compiled = triton.compile(src, target=target, options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 (the compile error is the finding)
            failures += 1
            print(f"FAIL {cfg}: {exc.__class__.__name__}: {str(exc).strip().splitlines()[-1:]}", flush=True)
            continue
        ptx = compiled.asm["ptx"]
        regs, spills = aot.ptxas_report(ptx, arch)
        shared = compiled.metadata.shared
        over = shared > aot.SHARED_LIMIT[90]
        failures += over
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
        flag = "FAIL (smem)" if over else "spills" if spills else "ok"
        print(f"{flag:6s} {cfg}: regs={regs} spill={spills}B smem={shared // 1024}KiB {mma}", flush=True)
    print(f"== {failures} failures")
    return 1 if failures else 0


def write(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help=f"JSON to write (default: {DEFAULT_OUT}; --smoke: {SMOKE_OUT})")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new candidate after this many seconds")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes under TRITON_INTERPRET=1")
    p.add_argument("--aot", action="store_true", help="no GPU: compile every candidate for sm_90a and report")
    args = p.parse_args(argv)
    if args.aot:
        return aot_report()
    args.out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)  # never a CPU file where the package reads
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before llmkernels.triton
        if "llmkernels.triton.ternary" in sys.modules and not tn().INTERPRET:
            p.error("--smoke: llmkernels.triton was imported without TRITON_INTERPRET=1")
        shapes, timer = SMOKE_SHAPES, wall_ms
    else:
        import torch

        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            p.error("needs a CUDA GPU and TRITON_INTERPRET unset (use --smoke on CPU)")
        shapes, timer = GPU_SHAPES, do_bench_ms
    log = functools.partial(print, flush=True)
    doc = sweep(shapes, smoke=args.smoke, timer=timer, budget_s=args.budget_s, log=log,
                checkpoint=lambda d: write(d, args.out))  # fmt: skip
    write(doc, args.out)
    for r in doc["summary"]:
        print(f"{r['bucket']} {r['shape']}: {r['winner']} gemm {r['gemm_ms']} ms, a8 {r['a8_ms']} ms "
              f"(default gemm {r['default_gemm_ms']} ms, a8 {r['default_a8_ms']} ms, x{r['speedup']})")  # fmt: skip
    print(f"wrote {args.out}: complete={doc['complete']}{' ERROR: see the file' if 'error' in doc else ''}")
    return 0 if "error" not in doc else 1


if __name__ == "__main__":
    sys.exit(main())
