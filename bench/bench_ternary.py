"""Ternary (BitNet b1.58) linear benchmarks: decode GEMV and prefill GEMM against F.linear.

    python bench/run.py --op ternary [--quick]

Shapes out x in: 2560x2560, 6912x2560, 2560x6912 (BitNet b1.58 2B4T), 4096x4096, 11008x4096 (Llama-2 7B),
28672x8192 (Llama-3 70B MLP). Tokens: 1 (decode) and 16, 128, 512, 2048 (prefill).
GPU: llmkernels cuda / triton (act_bits=8, and weight-only for decode) against F.linear in bf16 (cuBLAS);
prefill also times the C++ path with LLMKERNELS_TERNARY_GEMM=cublaslt (at::_int_mm instead of our mma GEMM).
CPU: the C++ kernels on 2 threads against F.linear (2 threads): decode in fp32 (the issue's peer), and prefill
(16, 128, 512 tokens at 2560x2560 and 4096x4096) in fp32 and in bf16, each against F.linear in the same dtype.
Decode reports weight GB/s (packed bytes for ours, bf16 / fp32 bytes for the peer) against
copy_bandwidth_gbps(); prefill reports TFLOP/s (2 * tokens * out * in). Several weight sets are rotated so
that the L2 cache (50 MB on H100) cannot serve the weights from one call to the next.
Every row carries the bytes of one layer's weights (ours packed vs bf16).
"""

from __future__ import annotations

import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmkernels  # noqa: E402
from bench.common import copy_bandwidth_gbps, env_var, measure_graph_ms, measure_ms, on_gpu, peak_tflops  # noqa: E402

OP = "ternary_linear"
SHAPES = [(2560, 2560), (6912, 2560), (2560, 6912), (4096, 4096), (11008, 4096), (28672, 8192)]
PREFILL_TOKENS = (16, 128, 512, 2048)
L2_BYTES = 50 * 2**20
CPU_THREADS = 2


def _row(case, impl, ms, metric=None, value=None, limit=None, peer=None, **extra):
    return {
        "op": OP,
        "case": case,
        "impl": impl,
        "time_ms": ms,
        "metric": metric,
        "value": value,
        "limit": limit,
        "peer": peer,
        **extra,
    }


def _sets(bytes_per_set: int) -> int:
    """Weight sets to rotate so their total is at least twice the L2 cache (at most 16)."""
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


def _rotating(fn, n_sets: int):
    """fn(i) for i = 0, 1, ..., n_sets - 1, 0, ... on successive calls."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % n_sets
        return fn(state["i"])

    return call


def _try(rows, case, impl, fn, to_value, graph=False, **kw):
    """Times fn eagerly (one row under `case`); with graph=True (decode on a GPU) also replayed from a CUDA graph
    (a row under `case [CUDA graph]`): a 1-token layer's eager time is mostly Python and launch latency."""
    try:
        ms = measure_ms(fn)
        graph_ms = measure_graph_ms(fn) if graph else None
    except Exception as exc:  # noqa: BLE001  (BackendError, OOM: reported, not fatal)
        print(f"  [{case}] {impl}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    for label, t in ((case, ms), (f"{case} [CUDA graph]", graph_ms)):
        if t is not None:
            metric, value = to_value(t)
            rows.append(_row(label, impl, t, metric, value, **kw))
    return ms


def _case(device, tokens, n, k, dtype, peer_dtype, backends, limit_gbps, weight_only=False, label="") -> list[dict]:
    rows: list[dict] = []
    packed_bytes = n * llmkernels.ternary.padded_in_features(k) // 4
    peer_bytes = n * k * torch.finfo(peer_dtype).bits // 8
    mem = {"weight_bytes": packed_bytes, "bf16_bytes": n * k * 2, "bf16_over_packed": n * k * 2 / packed_bytes}
    n_sets = _sets(packed_bytes)
    ours_sets = [llmkernels.ternary.quantize_weight(torch.randn(n, k, device=device)) for _ in range(n_sets)]
    peer_sets = [torch.randn(n, k, device=device, dtype=peer_dtype) for _ in range(_sets(peer_bytes))]
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    xp = x.to(peer_dtype)
    decode = tokens == 1
    case = f"{'decode' if decode else 'prefill'} tokens={tokens} {n}x{k}{label}"
    flops = 2 * tokens * n * k

    def value(nbytes):
        if decode:
            return lambda ms: ("GB/s", nbytes / (ms * 1e-3) / 1e9)
        return lambda ms: ("TFLOP/s", flops / (ms * 1e-3) / 1e12)

    limit = limit_gbps if decode else peak_tflops()
    peer = f"F.linear-{str(peer_dtype).replace('torch.', '')}"
    modes = [(8, "")] + ([(None, "-w2")] if weight_only else [])
    variants = [(b, bits, suffix) for b in backends for bits, suffix in modes]
    if "cuda" in backends and tokens > 16:  # the cuBLASLt int8 baseline of the C++ prefill path
        variants.append(("cuda", 8, "-cublaslt"))
    graph = decode and device == "cuda"
    for backend, act_bits, suffix in variants:

        def fn(i, act_bits=act_bits):
            w_packed, w_scale = ours_sets[i]
            return llmkernels.ternary_linear(x, w_packed, w_scale, act_bits=act_bits)

        # Backend and GEMM choice set once around the timing, so the timed call is what a model's layer does.
        gemm = "cublaslt" if suffix == "-cublaslt" else "mma"
        with env_var("LLMKERNELS_TERNARY_GEMM", gemm), llmkernels.use_backend(backend):
            ours = _rotating(fn, len(ours_sets))
            _try(
                rows,
                case,
                f"llmkernels-{backend}{suffix}",
                ours,
                value(packed_bytes),
                graph,
                limit=limit,
                peer=peer,
                **mem,
            )
    peer_fn = _rotating(lambda i: F.linear(xp, peer_sets[i]), len(peer_sets))
    _try(rows, case, peer, peer_fn, value(peer_bytes), graph, limit=limit, **mem)
    return rows


def run(quick: bool) -> list[dict]:
    rows: list[dict] = []
    if on_gpu():
        limit = copy_bandwidth_gbps()
        shapes = [(4096, 4096), (28672, 8192)] if quick else SHAPES
        for n, k in shapes:
            rows += _case("cuda", 1, n, k, torch.bfloat16, torch.bfloat16, ("cuda", "triton"), limit, weight_only=True)
            for tokens in (2048,) if quick else PREFILL_TOKENS:  # quick: the target cases
                rows += _case("cuda", tokens, n, k, torch.bfloat16, torch.bfloat16, ("cuda", "triton"), limit)
            torch.cuda.empty_cache()
        # (not in --quick, gpu_check.sh's run: transformers' BitLinear compiles its quantiser with torch.compile,
        # which could outlast the op's share of the device call and lose the target rows with it)
        for tokens in () if quick else (1, 2048):
            rows += _hf_bitnet_case(tokens, "cuda")
        return rows
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        limit = copy_bandwidth_gbps()
        shapes = [(2560, 2560), (4096, 4096)] if quick else SHAPES
        for n, k in shapes:
            rows += _case("cpu", 1, n, k, torch.float32, torch.float32, ("cpu",), limit, weight_only=True)
        # prefill: few shapes (a 512-token fp32 F.linear at 4096x4096 is ~80 ms a call here)
        for n, k in [(4096, 4096)] if quick else [(2560, 2560), (4096, 4096)]:
            for tokens in (128,) if quick else (16, 128, 512):
                for dtype, label in ((torch.float32, " fp32"), (torch.bfloat16, " bf16")):
                    rows += _case("cpu", tokens, n, k, dtype, dtype, ("cpu",), limit, weight_only=True, label=label)
        for tokens in (1,) if quick else (1, 128):
            rows += _hf_bitnet_case(tokens, "cpu")
    finally:
        torch.set_num_threads(threads)
    return rows


def _hf_bitnet_case(tokens: int, device: str) -> list[dict]:
    """_hf_bitnet_rows, with a failure to build the models reported rather than raised (the other rows stay)."""
    try:
        return _hf_bitnet_rows(tokens, device)
    except Exception as exc:  # noqa: BLE001  (an OOM, a transformers release without BitNet's pieces)
        print(f"  [hf bitnet {tokens} tokens] skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return []


def _hf_bitnet_rows(tokens: int, device: str) -> list[dict]:
    """A transformers BitNetForCausalLM with BitNet b1.58 2B4T's layer shapes (hidden 2560, MLP 6912, 20 heads, 5 KV
    heads; 2 layers, vocab 1000) and random packed ternary weights, bf16, one forward of `tokens` tokens on `device`:
    as transformers runs it (BitLinear: the weights unpacked every call, the activation quantiser under
    torch.compile, a bf16 matmul) and with the weights dequantised into bf16 nn.Linear layers (F.linear), against the
    same model after llmkernels' patch_model (TernaryLinear)."""
    try:
        import transformers
        from transformers.integrations.bitnet import BitLinear, pack_weights, replace_with_bitnet_linear, unpack_weights

        import llmkernels.integrations.transformers as lk_hf
    except ImportError as exc:
        print(f"  [hf bitnet] skipped ({exc})")
        return []
    cfg = transformers.BitNetConfig(vocab_size=1000, hidden_size=2560, intermediate_size=6912, num_hidden_layers=2,
                                    num_attention_heads=20, num_key_value_heads=5, bos_token_id=0, eos_token_id=1,
                                    pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.BitNetForCausalLM(cfg).eval().to(torch.bfloat16)
    qc = transformers.BitNetQuantConfig()
    replace_with_bitnet_linear(ref, modules_to_not_convert=["lm_head"], quantization_config=qc)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, BitLinear):
                m.weight.copy_(pack_weights(torch.randint(-1, 2, (m.out_features, m.in_features))))
                m.weight_scale.fill_(20.0)
    ours = copy.deepcopy(ref)
    lk_hf.patch_model(ours)
    dense = copy.deepcopy(ref)  # the same weights dequantised into bf16 nn.Linear layers: F.linear's time
    for name, m in list(dense.named_modules()):
        if isinstance(m, BitLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                linear.weight.copy_(unpack_weights(m.weight, torch.float32)[: m.out_features] / m.weight_scale.float())
            dense.set_submodule(name, linear)
    ref, ours, dense = (m.to(device) for m in (ref, ours, dense))
    ids = torch.randint(2, 1000, (1, tokens), device=device)
    case = f"BitNetForCausalLM 2B4T layers x2 bf16 forward {tokens} token{'s' if tokens > 1 else ''}"
    rows: list[dict] = []
    impls = (("llmkernels-patched", ours, "transformers-bitlinear"), ("transformers-bitlinear", ref, None),
             ("dense-bf16-linear", dense, None))  # fmt: skip
    for impl, model, peer in impls:
        def fn(model=model):
            with torch.no_grad():
                return model(ids).logits

        try:
            ms = measure_ms(fn, warmup=2, rep=5, min_time_s=0)
        except Exception as exc:  # noqa: BLE001
            print(f"  [{case}] {impl}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append(_row(case, impl, ms, peer=peer, op=f"hf_bitnet_{device}"))  # (op: extra keys win)
    return rows


if __name__ == "__main__":
    from bench.common import add_speedups, format_table

    print(format_table(add_speedups(run(quick="--quick" in sys.argv))))
