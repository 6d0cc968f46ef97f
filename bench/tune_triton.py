"""Times candidate tiles of the Triton flash attention kernels on a GPU and writes the winners to
llmkernels/triton/tuned_configs.json, which llmkernels/triton/flash_attn.py then uses on GPUs of that name.

    python bench/tune_triton.py [--budget-s 240] [--jobs N] [--headdims 128,64,256] [--out PATH]
    python bench/tune_triton.py --smoke [--out PATH]   # CI: tiny shapes under TRITON_INTERPRET=1, 2 candidates

For each kernel (fwd, bwd_dkdv, bwd_dq), head-dim bucket (64, 128, 256) and mask (full, causal), every
candidate (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant: forward 1, 2 = TMA kernel; dK/dV 1, 2 = atomic dq
through pointers / a TMA reduce]) runs once, its outputs are checked against the static table's config (the
default) on the same inputs, and accepted ones are timed with triton.testing.do_bench (median). bf16 only: fp16
takes the same tiles, fp32 keeps its own tables (no tensor cores). Head dim 128 is also tuned at batch 16 x
seqlen 1024, stored as "full_short" / "causal_short" (flash_attn.py uses those up to SHORT_SEQLEN keys), and its
forward with Mistral's sliding window (16k tokens, window 4096, GQA 4), stored as "window".
What is timed: `fwd` the forward op; `bwd_*` the whole backward op (preprocess + dK/dV + dQ) with the other
backward kernel at its default, so the difference between two candidates is their kernel's difference (an
atomic-dq dK/dV candidate runs no dQ kernel: its time is the whole backward's).
Candidates that fail to compile or launch (shared memory) or disagree with the default are recorded, not used.

Compiles dominate (1-3 s each, about 160 here): they run first in --jobs worker processes that launch every
candidate once, which fills Triton's on-disk cache; the main process then loads them from there. The whole run
stops starting new work after --budget-s and always writes what it has (`complete` says whether it finished).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "llmkernels", "triton", "tuned_configs.json")
SMOKE_OUT = os.path.join(tempfile.gettempdir(), "llmkernels_tuned_configs_smoke.json")

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "decode")
HEADDIMS = (128, 64, 256)  # most used first: what a budget cut leaves out matters least
# Heads per head dim at batch 4 x seqlen 4096 = 16k tokens: a 2048-wide attention layer for every head dim.
NHEADS = {64: 32, 128: 16, 256: 8}

# Candidates per kernel and head-dim bucket, besides the static table's default (always timed first).
# Constraints (flash_attn_kernels.py): BLOCK_M, BLOCK_N powers of two (tl.arange) and >= 16 (every tl.dot has
# both as an M, N or K side); the kernels impose nothing between BLOCK_M and BLOCK_N (the band's tile ranges
# are computed per side). Shared memory (227 KiB on H100) and registers bound the tiles: every entry below was
# compiled offline for sm_90a with triton 3.8 (full and causal): all fit in 200 KiB of shared memory, and
# candidates spilling over ~200 bytes of registers were dropped. wgmma wants BLOCK_M (fwd, dQ) / BLOCK_N (dK/dV,
# the M side of its dots) to be a multiple of 64: smaller tiles run mma.sync, slower on Hopper.
# fwd: holds q (BLOCK_M x d) and an fp32 accumulator; streams K, V tiles (BLOCK_N x d) through num_stages buffers.
# dK/dV: one program per BLOCK_N keys holds k, v and two fp32 (BLOCK_N x d) accumulators; streams q, do tiles.
# dQ: one program per BLOCK_M queries holds q, do and an fp32 accumulator; streams k, v tiles.
# A 5th field selects the forward's TMA variant (flash_attn_fwd_tma_kernel: K/V through tensor descriptors, the
# scale folded into the exp2's FMA): 1 for the unmasked tiles, 2 for every tile (causal and short sequences have
# a larger share of masked tiles). Its tiles are the best plain ones and BLOCK_N 128, which TMA's cheaper loads
# may now afford. Every one compiled offline for sm_90a with triton 3.8 and 3.6: <= 225 KiB shared memory, spills
# of 8-32 bytes at most (128 x 128 at head dim 128, 128 x 64 at 256, causal); (128, 128, 8, 3, 1) at head dim 64
# is left out: triton 3.6's ptxas crashes on it (full mask).
# A 5th dK/dV field adds dq in that kernel and drops the dQ kernel: five tile products instead of seven, against
# BLOCK_M x d fp32 adds per tile, 1 as pointer atomics, 2 as one TMA reduce. Its dq product has BLOCK_M as its M
# side, so BLOCK_M 64 lets all three products use wgmma; BLOCK_N 128 halves the adds per product. Timed as the
# whole backward like the others (the dQ kernel then does not run), and checked on dq too. Compiled for sm_90a
# with triton 3.8 (full / causal spill bytes): the pointer atomics' 64-bit addresses cost registers (head dim 128
# 64 x 64 x 8 warps: 240 / 404; 64 x 128 and 4-warp tiles 424-1956, left out), the TMA reduce far fewer (44 / 256;
# 64 x 128: 164 / 332; head dim 64: 0-140; 256: 308 / 740).
CANDIDATES: dict[str, dict[int, list[tuple[int, ...]]]] = {
    "fwd": {
        64: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3),
             (128, 32, 4, 3), (128, 64, 8, 3, 1), (128, 128, 8, 2, 1), (128, 64, 4, 3, 1)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3),
              (64, 128, 4, 2), (128, 64, 8, 3, 1), (128, 128, 8, 2, 1), (128, 128, 8, 3, 1), (64, 64, 4, 3, 1),
              (128, 64, 8, 4, 1), (128, 64, 8, 3, 2), (64, 64, 4, 3, 2), (128, 128, 8, 2, 2)],
        256: [(64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3),
              (128, 16, 8, 2), (128, 64, 8, 2, 1), (64, 32, 4, 2, 1)],
    },
    "bwd_dkdv": {
        64: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (16, 64, 4, 2),
             (32, 64, 4, 3, 1), (64, 128, 8, 2, 1), (64, 64, 4, 2, 2), (64, 128, 8, 2, 2)],
        128: [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 3), (64, 64, 8, 2, 1),
              (64, 64, 8, 2, 2), (64, 128, 8, 2, 2)],
        256: [(32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2, 2)],
    },
    # decode split kernel (flash_attn_with_kvcache): (most packed rows, BLOCK_N, warps, stages); memory-bound, so
    # the question is bytes in flight per SM: wider key tiles, more stages, fewer warps per program. Timed at head
    # dim 128 only (DECODE_CASE): the other buckets keep the static table.
    "decode": {
        128: [(16, 128, 8, 3), (16, 128, 4, 3), (16, 64, 4, 4), (16, 64, 8, 4), (16, 32, 4, 4), (16, 128, 8, 2)],
    },
    "bwd_dq": {
        64: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2), (64, 32, 8, 3)],
    },
}  # fmt: skip
SMOKE_CANDIDATES = [(16, 16, 1, 1), (32, 16, 1, 1)]  # the interpreter's default and one other


@dataclass(frozen=True)
class Case:
    headdim: int
    causal: bool
    batch: int = 4
    seqlen: int = 4096
    nheads: int = 16
    dtype: str = "bfloat16"
    short: bool = False  # winners stored as "<mask>_short": flash_attn uses them up to SHORT_SEQLEN keys
    window: int = 0  # > 0: causal with that many keys per query (window_size (window - 1, 0)), stored as "window"
    nheads_k: int | None = None  # GQA: KV heads (None: nheads)
    decode: bool = False  # flash_attn_with_kvcache: one query per row against seqlen cached keys ("full")

    @property
    def mask(self) -> str:
        if self.decode:  # one query per row: the causal band is every cached key, so no mask class of its own
            return "full"
        if self.window > 0:
            return "window"
        return ("causal" if self.causal else "full") + ("_short" if self.short else "")

    def kernels(self, kernels: tuple[str, ...]) -> tuple[str, ...]:
        """A decode case tunes the decode kernel only; the window case the forward only (the prefill it stands for
        does not train); the others every attention kernel but decode."""
        if self.decode:
            return tuple(k for k in kernels if k == "decode")
        return tuple(k for k in kernels if k != "decode" and (k == "fwd" or self.window <= 0))

    def fwd_flops(self) -> float:
        """Matmul FLOPs of the forward (QK^T and PV) over the visible (query, key) pairs."""
        s, w = self.seqlen, self.window
        if self.decode:
            pairs = s
        else:
            pairs = s * w - w * (w - 1) / 2 if w > 0 else s * s * (0.5 if self.causal else 1)
        return 4.0 * self.batch * self.nheads * pairs * self.headdim


# Head dim 128 also at batch 16 x seqlen 1024: fewer keys per query (key) block favour other tiles, and the
# backward's dQ kernel costs relatively more there.
SHORT_HEADDIMS = (128,)


# Mistral 7B's prefill (issue 5's target shape): 16k tokens, window 4096, 32 query / 8 KV heads of 128. Its tiles
# see ~4k keys per query block where the causal case's see ~2k on average, and masked tiles at both band edges.
WINDOW_CASE = dict(headdim=128, causal=True, batch=1, seqlen=16384, nheads=32, nheads_k=8, window=4096)
# Issue 4's decode target shape: batch 64 x 4096 cached keys, 32 / 8 heads of 128 (65% of copy bandwidth so far).
DECODE_CASE = dict(headdim=128, causal=True, batch=64, seqlen=4096, nheads=32, nheads_k=8, decode=True)


def gpu_cases(headdims=HEADDIMS) -> list[Case]:
    cases = [Case(d, causal, nheads=NHEADS[d]) for d in headdims for causal in (False, True)]
    window = [Case(**WINDOW_CASE)] if WINDOW_CASE["headdim"] in headdims else []
    decode = [Case(**DECODE_CASE)] if DECODE_CASE["headdim"] in headdims else []
    short = [Case(d, causal, batch=16, seqlen=1024, nheads=NHEADS[d], short=True) for d in headdims
             if d in SHORT_HEADDIMS for causal in (False, True)]  # fmt: skip
    return cases + window + decode + short  # last: a budget cut leaves the short cases out first


def smoke_cases() -> list[Case]:
    # Head dim 40 pads to BLOCK_D 64 (the 64 bucket); seqlen 40 crosses ragged 16- and 32-row tiles.
    # fp16: the interpreter's bf16 tl.dot is not faithful.
    return [Case(40, causal, batch=1, seqlen=40, nheads=2, dtype="float16") for causal in (False, True)]


def bucket(headdim: int) -> int:
    return min(b for b in (64, 128, 256) if b >= max(16, 1 << (headdim - 1).bit_length()))


def fa():
    from llmkernels.triton import flash_attn

    return flash_attn


def default_config(kernel: str, headdim: int) -> tuple[int, int, int, int]:
    """The config the package uses without a tuned file: the static table's (the interpreter's under it)."""
    m = fa()
    if m._INTERPRET:
        return m._INTERPRET_CONFIG
    table = {"fwd": m._FWD_CONFIGS, "bwd_dkdv": m._DKDV_CONFIGS, "bwd_dq": m._DQ_CONFIGS,
             "decode": m._DECODE_CONFIGS}[kernel]  # fmt: skip
    return m._pick(table, bucket(headdim))


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    import torch

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    if case.decode:
        cache = (case.batch, case.seqlen, case.nheads_k or case.nheads, case.headdim)
        q, k_cache, v_cache = (torch.randn(s, device=device, generator=gen, dtype=torch.float32).to(dtype)
                               for s in ((case.batch, 1, case.nheads, case.headdim), cache, cache))  # fmt: skip
        lens = torch.full((case.batch,), case.seqlen, dtype=torch.int32, device=device)
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, lens=lens, scale=case.headdim**-0.5)
    shape = (case.batch, case.seqlen, case.nheads, case.headdim)
    kv_shape = (case.batch, case.seqlen, case.nheads_k or case.nheads, case.headdim)
    q, k, v, dout = (torch.randn(s, device=device, generator=gen, dtype=torch.float32).to(dtype)
                     for s in (shape, kv_shape, kv_shape, shape))  # fmt: skip
    return dict(q=q, k=k, v=v, dout=dout, scale=case.headdim**-0.5, window_right=0 if case.causal else -1,
                window_left=case.window - 1 if case.window > 0 else -1)  # fmt: skip


def _fwd(inp: dict, cfg) -> tuple:
    import torch

    with fa().config_override(fwd=cfg):
        out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(
            inp["q"], inp["k"], inp["v"], inp["scale"], inp["window_left"], inp["window_right"], 0.0
        )
    return out, lse


def _bwd(inp: dict, dkdv_cfg, dq_cfg) -> tuple:
    import torch

    with fa().config_override(bwd_dkdv=dkdv_cfg, bwd_dq=dq_cfg):
        return torch.ops.llmkernels.flash_attn_bwd_triton(
            inp["dout"], inp["q"], inp["k"], inp["v"], inp["out"], inp["lse"], inp["scale"], inp["window_left"],
            inp["window_right"], 0.0,
        )  # fmt: skip


def _decode(inp: dict, cfg):
    import torch

    with fa().config_override(decode=cfg):  # the cache holds every key already: nothing is appended
        return torch.ops.llmkernels.flash_attn_with_kvcache_triton(
            inp["q"], inp["k_cache"], inp["v_cache"], None, None, inp["lens"], inp["scale"], -1, 0, 0.0
        )


# kernel -> (run(inputs, candidate config, headdim) -> named outputs to compare); the other backward kernel
# keeps its default. The tests swap entries to inject a wrong kernel.
RUNNERS: dict[str, Callable] = {
    "decode": lambda inp, cfg, d: dict(out=_decode(inp, cfg)),
    "fwd": lambda inp, cfg, d: dict(zip(("out", "lse"), _fwd(inp, cfg))),
    # dq too: a 5th field 1 computes it in the dK/dV kernel
    "bwd_dkdv": lambda inp, cfg, d: dict(zip(("dq", "dk", "dv"), _bwd(inp, cfg, default_config("bwd_dq", d)))),
    "bwd_dq": lambda inp, cfg, d: dict(dq=_bwd(inp, default_config("bwd_dkdv", d), cfg)[0]),
}


def mismatch(got: dict, ref: dict, rtol: float = 2e-2) -> str | None:
    """Why got differs from ref beyond reordered fp32 sums (at most an ulp or two of the output dtype), or None.

    Scaled by the largest reference value: a dropped or doubled key tile moves whole rows by far more.
    """
    for name, r in ref.items():
        g = got[name].float()
        r = r.float()
        if g.shape != r.shape:
            return f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        finite = r.isfinite()
        if not bool((g.isfinite() == finite).all()) or not bool((g[~finite] == r[~finite]).all()):
            return f"{name}: non-finite values differ from the default's"
        err = float((g[finite] - r[finite]).abs().max()) if bool(finite.any()) else 0.0
        limit = rtol * float(r[finite].abs().max()) + 1e-6 if bool(finite.any()) else 0.0
        if not err <= limit:
            return f"{name}: max |diff| {err:.3g} > {limit:.3g} ({rtol} x max |default|)"
    return None


def do_bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def wall_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# --- precompile workers: launch each candidate once so Triton's disk cache holds its binary -------------------

_worker_state: dict = {}


def _precompile(kernel: str, case: Case, cfg) -> tuple[str | None, float]:
    """(error or None, seconds). Runs in a worker process: same shapes and arguments as the main process, so the
    cache key (which includes the integer arguments' divisibility) is the same."""
    import torch

    if _worker_state.get("poisoned"):
        return "not precompiled (an earlier launch broke this worker's CUDA context)", 0.0
    device = "cpu" if fa()._INTERPRET else "cuda"  # cpu: the smoke test of this machinery
    if _worker_state.get("case") != case:
        _worker_state.clear()
        inp = make_inputs(case, device)
        # Backward launches need out and lse of the right shape only: their values do not change the binary.
        inp["out"] = torch.randn_like(inp["q"])
        inp["lse"] = torch.full((case.batch, case.nheads, case.seqlen), float(case.seqlen), device=device)
        _worker_state.update(case=case, inputs=inp)
    t0 = time.perf_counter()
    try:
        RUNNERS[kernel](_worker_state["inputs"], cfg, case.headdim)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # compile error, out of shared memory, a CUDA fault: recorded, never fatal
        if "CUDA" in str(exc) or exc.__class__.__name__ == "AcceleratorError":
            _worker_state["poisoned"] = True
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", 0.0
    return None, time.perf_counter() - t0


def precompile(tasks: list[tuple[str, Case, tuple]], jobs: int, timeout_s: float, log=print) -> tuple[dict, str]:
    """{(kernel, case, cfg): error or None} for the tasks the workers finished, and a one-line summary."""
    import multiprocessing

    done: dict = {}
    if jobs <= 0 or not tasks:
        return done, "none (compiled in the main process)"
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_precompile, *task): task for task in tasks}
        finished, _ = wait(futures, timeout=timeout_s)
        for f in finished:
            try:
                done[futures[f]] = f.result()[0]
            except Exception as exc:  # a worker died (BrokenProcessPool): the main process compiles those
                log(f"  precompile worker failed: {exc.__class__.__name__}: {exc}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may still launch while the main process times
    failed = sum(1 for e in done.values() if e is not None)
    return done, (f"{len(done)}/{len(tasks)} launches in {jobs} workers, {time.perf_counter() - t0:.0f} s, "
                  f"{failed} failed")  # fmt: skip


# --- the sweep ---------------------------------------------------------------------------------------------------


def candidate_list(kernel: str, case: Case, smoke: bool) -> list[tuple[int, ...]]:
    default = default_config(kernel, case.headdim)
    extra = SMOKE_CANDIDATES if smoke else CANDIDATES[kernel][bucket(case.headdim)]
    return list(dict.fromkeys([tuple(default), *map(tuple, extra)]))


def sweep(
    cases: list[Case],
    *,
    smoke: bool = False,
    timer: Callable[[Callable[[], object]], float] = do_bench_ms,
    budget_s: float = 240.0,
    jobs: int = 0,
    kernels: tuple[str, ...] = KERNELS,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Checks and times every candidate; returns the JSON document (winners, every candidate, metadata)."""
    import torch

    t_start = time.perf_counter()
    device = "cpu" if fa()._INTERPRET else "cuda"
    doc = _metadata(device, smoke, budget_s)
    doc["cases"] = [dict(headdim=c.headdim, bucket=bucket(c.headdim), mask=c.mask, batch=c.batch, seqlen=c.seqlen,
                         nheads=c.nheads, nheads_k=c.nheads_k or c.nheads, window=c.window, decode=c.decode,
                         dtype=c.dtype)
                    for c in cases]  # fmt: skip
    records: list[dict] = doc["candidates"]
    try:
        tasks = [(k, c, cfg) for c in cases for k in c.kernels(kernels) for cfg in candidate_list(k, c, smoke)]
        pre, doc["precompile"] = precompile(tasks, jobs, timeout_s=0.6 * budget_s, log=log)
        log(f"precompile: {doc['precompile']}")
        for case in cases:
            inputs = make_inputs(case, device)
            for kernel in case.kernels(kernels):
                if time.perf_counter() - t_start > budget_s:
                    break
                _sweep_one(kernel, case, inputs, pre, smoke, timer, budget_s, t_start, records, log)
            del inputs
            if checkpoint is not None:  # a killed run still leaves every finished case on disk
                doc["winners"], doc["summary"] = _winners(records)
                checkpoint(doc)
            if device == "cuda":
                torch.cuda.empty_cache()
        doc["complete"] = all(r["status"] != "skipped" for r in records) and time.perf_counter() - t_start <= budget_s
    except Exception:  # still write what was measured: the GPU session has one shot
        doc["error"] = traceback.format_exc()
        log(doc["error"])
    doc["winners"], doc["summary"] = _winners(records)
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return doc


def _sweep_one(kernel, case, inputs, pre, smoke, timer, budget_s, t_start, records, log) -> None:
    """Every candidate of one (kernel, case): check against the default's outputs, then time."""
    import torch

    sync = torch.cuda.synchronize if inputs["q"].is_cuda else (lambda: None)
    run = RUNNERS[kernel]
    if kernel.startswith("bwd"):  # the backward needs the forward's out and lse: from the default forward
        inputs["out"], inputs["lse"] = _fwd(inputs, default_config("fwd", case.headdim))
    flops = case.fwd_flops() * (2.5 if kernel.startswith("bwd") else 1.0)  # the convention: backward = 2.5 x fwd
    ref, ref_note = None, "default"
    for i, cfg in enumerate(candidate_list(kernel, case, smoke)):
        rec = dict(kernel=kernel, headdim=case.headdim, bucket=bucket(case.headdim), mask=case.mask,
                   config=list(cfg), default=i == 0, status="skipped", ms=None, tflops=None, error=None)  # fmt: skip
        records.append(rec)
        if time.perf_counter() - t_start > budget_s:
            rec["error"] = "budget exhausted"
            continue
        err = pre.get((kernel, case, cfg))
        if err is not None and not err.startswith("not precompiled"):
            rec.update(status="failed", error=err)
            log(f"  {kernel} d{case.headdim} {case.mask} {cfg}: FAILED {err}")
            continue
        try:
            t0 = time.perf_counter()
            got = run(inputs, cfg, case.headdim)
            sync()
            rec["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile (or cache load) + one launch
        except Exception as exc:
            rec.update(status="failed", error=f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
            log(f"  {kernel} d{case.headdim} {case.mask} {cfg}: FAILED {rec['error']}")
            continue
        if ref is None:
            ref = {name: t.clone() for name, t in got.items()}
            if i != 0:
                ref_note = f"{list(cfg)} (the default failed)"
            rec["reference"] = True
        else:
            why = mismatch(got, ref)
            if why is not None:
                rec.update(status="rejected", error=f"differs from {ref_note}: {why}")
                log(f"  {kernel} d{case.headdim} {case.mask} {cfg}: REJECTED {why}")
                continue
        del got
        ms = timer(lambda cfg=cfg: run(inputs, cfg, case.headdim))
        rec.update(status="ok", ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 1) if ms > 0 else None)
        log(f"  {kernel} d{case.headdim} {case.mask} {cfg}: {ms:.3f} ms, {rec['tflops']} TFLOP/s")


def _winners(records: list[dict]) -> tuple[dict, list[dict]]:
    winners: dict = {}
    summary = []
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kernel"], r["bucket"], r["mask"]), []).append(r)
    for (kernel, b, mask), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["ms"])
        winners.setdefault(kernel, {}).setdefault(str(b), {})[mask] = best["config"]
        default = next((r for r in recs if r["default"]), None)
        default_ms = default["ms"] if default and default["status"] == "ok" else None
        summary.append(dict(kernel=kernel, bucket=b, mask=mask, winner=best["config"], ms=best["ms"],
                            tflops=best["tflops"], default=default["config"] if default else None,
                            default_ms=default_ms,
                            speedup=round(default_ms / best["ms"], 3) if default_ms else None))  # fmt: skip
    return winners, summary


def _metadata(device: str, smoke: bool, budget_s: float) -> dict:
    import torch
    import triton

    if device == "cuda":
        name, cap = torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())
    else:
        name, cap = f"cpu (TRITON_INTERPRET=1, {platform.machine()})", [0, 0]
    return {
        "format": fa().TUNED_FORMAT,
        "device": name,
        "capability": cap,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "smoke": smoke,
        "budget_s": budget_s,
        "dtype_note": "measured in bf16; fp16 uses the same tiles, fp32 keeps its static tables",
        "timing": "triton.testing.do_bench median (ms); fwd: the forward op; bwd_dkdv / bwd_dq: the whole backward "
        "op with the other backward kernel at its default; TFLOP/s: 4*b*h*s*s*d (x0.5 causal, x2.5 backward)",
        "complete": False,
        "candidates": [],
    }


def reference_timings(cases: list[Case], timer, log=print) -> list[dict]:
    """torch SDPA (FlashAttention-2 / cuDNN kernels) on the same shapes, for scale: not used to pick anything."""
    rows = []
    for case in cases:
        if case.window > 0 or case.decode:  # no window in SDPA; decode peers: bench/bench_attention.py
            continue
        try:
            fwd, bwd = _sdpa_ms(case, timer)
            rows.append(dict(impl="torch sdpa", headdim=case.headdim, mask=case.mask, fwd_ms=round(fwd, 4),
                             bwd_ms=round(bwd, 4), fwd_tflops=round(case.fwd_flops() / fwd / 1e9, 1),
                             bwd_tflops=round(2.5 * case.fwd_flops() / bwd / 1e9, 1)))  # fmt: skip
            log(f"  sdpa d{case.headdim} {case.mask}: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms")
        except Exception as exc:
            rows.append(dict(impl="torch sdpa", headdim=case.headdim, mask=case.mask, error=repr(exc)[:300]))
    return rows


def _sdpa_ms(case: Case, timer) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    inp = make_inputs(case, "cuda")
    q, k, v = (inp[n].transpose(1, 2).detach().requires_grad_() for n in ("q", "k", "v"))
    dout = inp["dout"].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    with torch.no_grad():
        fwd = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal))
    bwd = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    return fwd, bwd


def write(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help=f"JSON to write (default: {DEFAULT_OUT}; --smoke: {SMOKE_OUT})")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new work after this many seconds")
    p.add_argument("--jobs", type=int, default=None, help="precompile processes (default: CPUs - 2, at most 12)")
    p.add_argument("--headdims", default=",".join(map(str, HEADDIMS)), help="head dims to tune, in this order")
    p.add_argument("--kernels", default=",".join(KERNELS), help="subset of " + ",".join(KERNELS))
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA timings (context only)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes under TRITON_INTERPRET=1, 2 candidates")
    args = p.parse_args(argv)
    args.out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)  # never a CPU file where the package reads
    kernels = tuple(k for k in args.kernels.split(",") if k)
    if set(kernels) - set(KERNELS):
        p.error(f"--kernels: choose from {KERNELS}")
    if args.smoke:
        # Triton reads this when the kernels are defined: before llmkernels.triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        if "llmkernels.triton.flash_attn" in sys.modules and not fa()._INTERPRET:
            p.error("--smoke: llmkernels.triton was imported without TRITON_INTERPRET=1")
        cases, timer, jobs = smoke_cases(), wall_ms, args.jobs or 0
    else:
        import torch

        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            p.error("needs a CUDA GPU and TRITON_INTERPRET unset (use --smoke on CPU)")
        headdims = tuple(int(d) for d in args.headdims.split(",") if d)
        if set(headdims) - set(NHEADS):
            p.error(f"--headdims: choose from {sorted(NHEADS)}")
        cases, timer = gpu_cases(headdims), do_bench_ms
        jobs = args.jobs if args.jobs is not None else max(0, min(12, (os.cpu_count() or 1) - 2))
    log = functools.partial(print, flush=True)
    doc = sweep(cases, smoke=args.smoke, timer=timer, budget_s=args.budget_s, jobs=jobs, kernels=kernels, log=log,
                checkpoint=lambda d: write(d, args.out))  # fmt: skip
    if not args.smoke and not args.no_sdpa and "error" not in doc:
        doc["reference"] = reference_timings(cases, timer, log)
    write(doc, args.out)
    for r in doc["summary"]:
        print(f"{r['kernel']:>8} d{r['bucket']:<3} {r['mask']:>6}: {r['winner']} {r['ms']} ms {r['tflops']} TFLOP/s "
              f"(default {r['default']} {r['default_ms']} ms, x{r['speedup']})")  # fmt: skip
    print(
        f"wrote {args.out}: {len(doc['candidates'])} candidates, complete={doc['complete']}, "
        f"{doc['elapsed_s']} s{' ERROR: see the file' if 'error' in doc else ''}"
    )
    return 0 if "error" not in doc else 1


if __name__ == "__main__":
    sys.exit(main())
