"""`llmkernels demo`: greedy generation with three small decoders, llmkernels against pure PyTorch.

For each model (Mistral-style sliding-window transformer, Mamba, BitNet-style ternary transformer) the
same weights generate the same number of tokens twice: once with the automatic backend choice (the
fastest llmkernels kernels usable here) and once under `use_backend("reference")` (pure PyTorch). The
tokens must agree; a disagreement is tolerated only where the reference's top two logits were a near
tie (then both continuations are right answers and the runs part ways). Prints tokens/s, memory and speedup.
"""

from __future__ import annotations

import sys
import time

import torch

from . import use_backend
from .models import BitNetConfig, BitNetLM, MambaConfig, MambaLM, MistralConfig, MistralLM
from .models.common import greedy_generate

NEAR_TIE = 1e-3  # logits closer than this are a tie that rounding may break either way


def _progress(label: str, total: int):
    def on_token(step: int) -> None:
        if step % 10 == 0 or step + 1 == total:
            done = int(30 * (step + 1) / total)
            sys.stdout.write(f"\r  {label:<28} [{'#' * done}{'.' * (30 - done)}] {step + 1}/{total}")
            sys.stdout.flush()
            if step + 1 == total:
                sys.stdout.write("\n")

    return on_token


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in obj (tensors, lists, dicts, dataclass-like objects)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(o) for o in vars(obj).values())
    return 0


def weights_and_cache_mib(model, batch: int = 1) -> tuple[float, float]:
    """(weights, generation cache) in MiB: what the model holds, on any device."""
    weights = sum(_tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))
    return weights / 2**20, _tensor_bytes(model.new_cache(batch)) / 2**20


def _run(model, prompt, tokens, label, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out, margins = greedy_generate(model, prompt, tokens, _progress(label, tokens))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return out, margins, seconds, memory


def check_agreement(ours: torch.Tensor, ref: torch.Tensor, ref_margins: torch.Tensor) -> tuple[bool, str]:
    """True when every row's token streams agree up to the end, or until a near-tie of the reference."""
    ties = []
    for row in range(ref.shape[0]):
        diff = (ours[row] != ref[row]).nonzero()
        if diff.numel():
            first = int(diff[0])
            if ref_margins[row, first] > NEAR_TIE:
                return False, f"row {row} differs at token {first} (reference margin {ref_margins[row, first]:.2e})"
            ties.append(f"row {row} up to token {first}, a near-tie ({ref_margins[row, first]:.1e})")
    return True, ("agree: " + "; ".join(ties)) if ties else "identical"


def build_models():
    torch.manual_seed(0)
    return [
        ("Mistral (SWA, GQA, rolling KV)", MistralLM(MistralConfig(window=64))),
        ("Mamba (selective scan)", MambaLM(MambaConfig())),
        ("BitNet b1.58 (ternary)", BitNetLM(BitNetConfig())),
    ]


def run_demo(tokens: int = 200, device: str | None = None, prompt_len: int = 32) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"llmkernels demo on {device} ({dtype}), {tokens} new tokens after a {prompt_len}-token prompt\n")
    rows, failures = [], []
    for name, model in build_models():
        model = model.to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device=device)
        ours, _, t_ours, mem_ours = _run(model, prompt, tokens, name + " llmkernels", device)
        with use_backend("reference"):
            ref, margins, t_ref, mem_ref = _run(model, prompt, tokens, name + " pytorch", device)
        ok, detail = check_agreement(ours, ref, margins)
        if not ok:
            failures.append(f"{name}: {detail}")
        weights, cache = weights_and_cache_mib(model)
        rows.append(
            {"model": name, "ours_tok_s": tokens / t_ours, "ref_tok_s": tokens / t_ref, "speedup": t_ref / t_ours,
             "weights_mib": weights, "cache_mib": cache, "mem_ours": mem_ours, "mem_ref": mem_ref,
             "agreement": detail}
        )
    print()
    print("| model | llmkernels tok/s | PyTorch tok/s | speedup | weights + cache (MiB) | GPU peak (MiB) ours / ref "
          "| tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        peak = f"{r['mem_ours'] / 2**20:.0f} / {r['mem_ref'] / 2**20:.0f}" if r["mem_ours"] is not None else "-"
        print(f"| {r['model']} | {r['ours_tok_s']:.1f} | {r['ref_tok_s']:.1f} | {r['speedup']:.2f}x "
              f"| {r['weights_mib']:.2f} + {r['cache_mib']:.2f} | {peak} | {r['agreement']} |")
    if failures:
        raise SystemExit("token streams disagree: " + "; ".join(failures))
    return rows
