"""Selective scan (Mamba) benchmarks: the scan forward, forward + backward, and the decode step.

    python bench/run.py --op selective_scan [--quick]

GPU (bf16, dstate 16, per-token B/C, with z, D, delta_bias, softplus, as in Mamba): batch 8, dim 2048 and
5120, seqlen 512..16k. GB/s counts the bytes that must move: u, delta, z (batch, dim, seqlen), B, C
(batch, dstate, seqlen) in and out (batch, dim, seqlen); forward + backward adds dout in, the same inputs
read again and du, ddelta, dz, dB, dC out. The limit is copy_bandwidth_gbps(). Backends: cuda, triton,
cuda with LLMKERNELS_SCAN_BWD=fast ("llmkernels-cuda-fastbwd", forward + backward only), and the reference
where it finishes in reasonable time (seqlen <= 2048). Decode: one state-update step, batch 1..256, dim 5120;
bytes = the fp32 state read and written plus x, dt, z, B, C, y. Mamba-2 decode (selective_state_update_mamba2):
the multi-head step of Mamba-2 2.7B's layer (80 heads of 64, dstate 128, per-head A / dt / D / dt_bias expanded as
mamba_ssm's Mamba2.step passes them) through the 4-D entry, against the same step with every tied argument
copied out per channel first (llmkernels-copied: the route before the kernels took one A per channel) and the
reference; bytes = the fp32 state read and written. Mamba-2 prefill (mamba_chunk_scan_combined): the
scan over flattened heads, forward and forward + backward; bytes = x, z, y (batch, seqlen, nheads, headdim) and B, C
(batch, seqlen, ngroups, dstate) moved once; against the reference recurrence where it finishes (CPU, short).
Packed Mamba-2 prefill (mamba_chunk_scan_combined_packed): sequences of uneven lengths end to end in one row with
seq_idx (padding-free training), forward + backward, against the same sequences as a zero-padded batch
(padded-batch: the usual layout, longest length times count) and one call per sequence (per-sequence-loop), both
through llmkernels too.
CPU: small cases, the C++ kernels against the reference, including seqlen 2048 (the speedup is the point).
Colleagues' kernels are called inside try/except, so the benchmark runs whatever state they are in.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmkernels  # noqa: E402
from bench.common import copy_bandwidth_gbps, env_var, measure_ms, on_gpu, switched_kernels_enabled  # noqa: E402
from llmkernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref  # noqa: E402

OP = "selective_scan"
DSTATE = 16


def _row(op, case, impl, ms, metric=None, value=None, limit=None, peer=None, **extra):
    return {"op": op, "case": case, "impl": impl, "time_ms": ms, "metric": metric, "value": value, "limit": limit,
            "peer": peer, **extra}


def _try(rows, op, case, impl, fn, nbytes=None, limit=None, peer=None, **measure_kw):
    """Time fn and add a row (GB/s when nbytes is given); a failing backend just leaves a note."""
    try:
        ms = measure_ms(fn, **measure_kw)
    except Exception as exc:  # noqa: BLE001  (NotImplementedError, BackendError, OOM: all reported the same)
        print(f"  [{case}] {impl}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    value = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
    rows.append(_row(op, case, impl, ms, "GB/s" if nbytes else None, value, limit, peer))
    return ms


def scan_inputs(batch, dim, seqlen, dtype, device):
    def act(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return dict(
        u=act(batch, dim, seqlen),
        delta=(0.5 * torch.rand(batch, dim, seqlen, device=device)).to(dtype),
        A=-0.5 - torch.rand(dim, DSTATE, device=device),
        B=act(batch, DSTATE, seqlen),
        C=act(batch, DSTATE, seqlen),
        D=torch.randn(dim, device=device),
        z=act(batch, dim, seqlen),
        delta_bias=0.5 * torch.rand(dim, device=device),
        delta_softplus=True,
    )


def scan_bytes(batch, dim, seqlen, elem, backward=False):
    """Bytes that must move: forward u, delta, z, B, C in and out out; backward adds dout, the inputs again
    and du, ddelta, dz, dB, dC out."""
    big, small = batch * dim * seqlen * elem, batch * DSTATE * seqlen * elem
    fwd = 4 * big + 2 * small
    return fwd + (3 * big + 2 * small) + (4 * big + 2 * small) if backward else fwd


def _scan_fn(backend, kw, backward):
    leaves = [kw[k] for k in ("u", "delta", "B", "C", "z")]

    def run():
        if backward:
            for t in leaves:
                t.requires_grad_(True)
                t.grad = None
        if backend == "reference":
            out = selective_scan_ref(**kw)
        else:
            with llmkernels.use_backend(backend):
                out = llmkernels.selective_scan_fn(**kw)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return run


def _reference_backward_fits(batch, dim, seqlen) -> bool:
    """Whether the reference's autograd graph fits in free GPU memory (always on CPU: small cases only).

    Autograd keeps about 7 fp32 (batch, dim, dstate) tensors per timestep (dt A, its exp, the decayed state, dt B,
    dt B u, the new state, C x), ~38 GB at batch 8, dim 5120, seqlen 2048; the backward frees them as it walks
    back, so a quarter more covers its temporaries. If the guess is short, the row reports the OOM and is skipped.
    """
    if not on_gpu():
        return True
    need = 1.25 * 7 * batch * dim * DSTATE * 4 * seqlen
    free, _ = torch.cuda.mem_get_info()
    return need < free


def _scan_cases(rows, batch, dim, seqlen, dtype, device, backends, ref_ok, limit, measure_kw):
    elem = torch.tensor([], dtype=dtype).element_size()
    kw = scan_inputs(batch, dim, seqlen, dtype, device)
    for backward in (False, True):
        op = "selective_scan_fwd_bwd" if backward else "selective_scan_fwd"
        case = f"b={batch} dim={dim} L={seqlen} n={DSTATE} {str(dtype)[6:]} z"
        nbytes = scan_bytes(batch, dim, seqlen, elem, backward)
        for backend in backends:
            _try(rows, op, case, f"llmkernels-{backend}", _scan_fn(backend, kw, backward), nbytes, limit,
                 peer="reference", **measure_kw)
        if backward and "cuda" in backends and switched_kernels_enabled():  # opt-in until measured on a GPU
            with env_var("LLMKERNELS_SCAN_BWD", "fast"):
                _try(rows, op, case, "llmkernels-cuda-fastbwd", _scan_fn("cuda", kw, backward), nbytes, limit,
                     peer="reference", **measure_kw)
        if ref_ok and (not backward or _reference_backward_fits(batch, dim, seqlen)):
            _try(rows, op, case, "reference", _scan_fn("reference", kw, backward), nbytes, limit,
                 warmup=0, rep=2, min_time_s=0)
        for t in kw.values():
            if isinstance(t, torch.Tensor):
                t.grad = None


def _decode_case(rows, batch, dim, dtype, device, backends, limit, measure_kw):
    state = torch.randn(batch, dim, DSTATE, device=device)
    args = dict(
        x=torch.randn(batch, dim, device=device, dtype=dtype),
        dt=(0.5 * torch.rand(batch, dim, device=device)).to(dtype),
        A=-0.5 - torch.rand(dim, DSTATE, device=device),
        B=torch.randn(batch, DSTATE, device=device, dtype=dtype),
        C=torch.randn(batch, DSTATE, device=device, dtype=dtype),
        D=torch.randn(dim, device=device),
        z=torch.randn(batch, dim, device=device, dtype=dtype),
        dt_bias=0.5 * torch.rand(dim, device=device),
        dt_softplus=True,
    )
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = 2 * state.numel() * 4 + (4 * batch * dim + 2 * batch * DSTATE) * elem
    case = f"decode b={batch} dim={dim} n={DSTATE} {str(dtype)[6:]}"
    for backend in backends:

        def step(backend=backend):
            with llmkernels.use_backend(backend):
                return llmkernels.selective_state_update(state, **args)

        _try(rows, "selective_state_update", case, f"llmkernels-{backend}", step, nbytes, limit, peer="reference",
             **measure_kw)
    _try(rows, "selective_state_update", case, "reference", lambda: selective_state_update_ref(state, **args),
         nbytes, limit, **measure_kw)


def _mamba2_decode_case(rows, batch, device, backends, limit, measure_kw, nheads=80, headdim=64, dstate=128):
    dim = nheads * headdim
    state = torch.randn(batch, nheads, headdim, dstate, device=device)
    args = dict(
        x=torch.randn(batch, nheads, headdim, device=device),
        dt=(0.5 * torch.rand(batch, nheads, device=device))[..., None].expand(batch, nheads, headdim),
        A=(-0.5 - torch.rand(nheads, device=device))[:, None, None].expand(nheads, headdim, dstate),
        B=torch.randn(batch, 1, dstate, device=device),
        C=torch.randn(batch, 1, dstate, device=device),
        D=torch.randn(nheads, device=device)[:, None].expand(nheads, headdim),
        z=torch.randn(batch, nheads, headdim, device=device),
        dt_bias=(0.5 * torch.rand(nheads, device=device))[:, None].expand(nheads, headdim),
        dt_softplus=True,
    )
    flat = state.view(batch, dim, dstate)

    def flat_step(fn):  # the 3-D step with every tied argument copied out per channel, A to (dim, dstate)
        a = args
        return fn(
            flat, a["x"].reshape(batch, dim), a["dt"].reshape(batch, dim), a["A"].reshape(dim, dstate), a["B"], a["C"],
            a["D"].reshape(dim), a["z"].reshape(batch, dim), a["dt_bias"].reshape(dim), True,
        )  # fmt: skip

    nbytes = 2 * state.numel() * 4
    case = f"mamba2 decode b={batch} h={nheads} p={headdim} n={dstate} fp32"
    op = "selective_state_update_mamba2"
    for backend in backends:

        def step(backend=backend):
            with llmkernels.use_backend(backend):
                return llmkernels.selective_state_update(state, **args)

        _try(rows, op, case, f"llmkernels-{backend}", step, nbytes, limit, peer="llmkernels-copied", **measure_kw)
    with llmkernels.use_backend(backends[0]):
        _try(rows, op, case, "llmkernels-copied", lambda: flat_step(llmkernels.selective_state_update), nbytes, limit,
             **measure_kw)
    _try(rows, op, case, "reference", lambda: flat_step(selective_state_update_ref), nbytes, limit, **measure_kw)


@contextlib.contextmanager
def _mamba2_route(route: str):
    """mamba_chunk_scan_combined's route (ops/mamba_chunk_scan.py ROUTE) inside the block."""
    import llmkernels.ops.mamba_chunk_scan as chunk_scan_op

    old, chunk_scan_op.ROUTE = chunk_scan_op.ROUTE, route
    try:
        yield
    finally:
        chunk_scan_op.ROUTE = old


def _mamba2_prefill_case(rows, batch, seqlen, nheads, headdim, dstate, dtype, device, backends, limit, measure_kw,
                         reference=False):  # fmt: skip
    from llmkernels.reference.mamba_chunk_scan import mamba_chunk_scan_ref

    act = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    kw = dict(x=act(batch, seqlen, nheads, headdim), dt=act(batch, seqlen, nheads),
              A=-0.5 - torch.rand(nheads, device=device), B=act(batch, seqlen, 1, dstate),
              C=act(batch, seqlen, 1, dstate), D=torch.randn(nheads, device=device),
              z=act(batch, seqlen, nheads, headdim), dt_bias=torch.rand(nheads, device=device))  # fmt: skip
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = (3 * batch * seqlen * nheads * headdim + 2 * batch * seqlen * dstate) * elem
    case = f"mamba2 prefill b={batch} L={seqlen} h={nheads} p={headdim} n={dstate} {str(dtype)[6:]}"
    for backward in (False, True):
        op = "mamba_chunk_scan_combined" + ("_fwd_bwd" if backward else "_fwd")
        leaves = {k: v.detach().clone().requires_grad_(backward) for k, v in kw.items()}

        def call(fn, leaves=leaves, backward=backward):
            y = fn(**leaves)
            if backward:
                y.float().sum().backward()
            return y

        for backend in backends:

            def ours(backend=backend, call=call):
                with llmkernels.use_backend(backend):
                    return call(lambda **a: llmkernels.mamba_chunk_scan_combined(**a, chunk_size=256,
                                                                                 dt_softplus=True))  # fmt: skip

            _try(rows, op, case, f"llmkernels-{backend}", ours, nbytes * (3 if backward else 1), limit,
                 peer="reference" if reference else None, **measure_kw)  # fmt: skip

        # the chunked routes beside the scan kernels; the Triton one runs CUDA tensors (or the interpreter)
        for route in ("chunked", "chunked-triton") if device == "cuda" else ("chunked",):

            def chunked(call=call, route=route):
                with _mamba2_route(route):
                    return call(lambda **a: llmkernels.mamba_chunk_scan_combined(**a, chunk_size=256,
                                                                                 dt_softplus=True))  # fmt: skip

            _try(rows, op, case, f"llmkernels-{route}", chunked, nbytes * (3 if backward else 1), limit,
                 peer=f"llmkernels-{backends[0]}", **measure_kw)  # fmt: skip
        if reference:
            _try(rows, op, case, "reference", lambda call=call: call(lambda **a: mamba_chunk_scan_ref(
                **a, dt_softplus=True)), nbytes * (3 if backward else 1), limit, **measure_kw)  # fmt: skip


def _mamba2_packed_case(rows, lengths, nheads, headdim, dstate, dtype, device, limit, measure_kw):
    """Padding-free training's layout against padding and a loop; bytes as _mamba2_prefill_case's, real tokens only."""
    total, longest, count = sum(lengths), max(lengths), len(lengths)
    act = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()  # noqa: E731
    params = dict(A=-0.5 - torch.rand(nheads, device=device), D=torch.randn(nheads, device=device),
                  dt_bias=torch.rand(nheads, device=device))  # fmt: skip

    def tokens(batch, seqlen):
        return dict(x=act(batch, seqlen, nheads, headdim), dt=act(batch, seqlen, nheads),
                    B=act(batch, seqlen, 1, dstate), C=act(batch, seqlen, 1, dstate),
                    z=act(batch, seqlen, nheads, headdim))  # fmt: skip

    packed, padded = tokens(1, total), tokens(count, longest)
    seq_idx = torch.repeat_interleave(torch.arange(count, device=device), torch.tensor(lengths, device=device))
    seq_idx = seq_idx[None].int()
    singles = [tokens(1, n) for n in lengths]

    def fwd_bwd(kw, **extra):
        y = llmkernels.mamba_chunk_scan_combined(**kw, **params, chunk_size=256, dt_softplus=True, **extra)
        y.float().sum().backward()

    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = 3 * (3 * total * nheads * headdim + 2 * total * dstate) * elem
    case = f"mamba2 packed {count} seqs {total} tokens (longest {longest}) h={nheads} p={headdim} n={dstate}"
    op = "mamba_chunk_scan_combined_packed_fwd_bwd"
    _try(rows, op, case, "llmkernels-packed", lambda: fwd_bwd(packed, seq_idx=seq_idx), nbytes, limit,
         peer="padded-batch", **measure_kw)  # fmt: skip
    _try(rows, op, case, "padded-batch", lambda: fwd_bwd(padded), nbytes, limit, **measure_kw)
    _try(rows, op, case, "per-sequence-loop", lambda: [fwd_bwd(kw) for kw in singles], nbytes, limit, **measure_kw)


def _hf_hybrid_case(rows, seqlen, measure_kw):
    """A randomly initialised transformers Bamba model (Mamba-2 layers around one attention layer; hidden 1024, 32
    Mamba heads of 64, dstate 64) on CPU, fp32, one prefill forward: the model as transformers runs it (its PyTorch
    SSD and conv, SDPA attention) against the same weights through llmkernels (patch_model + the attention)."""
    try:
        import transformers

        import llmkernels.integrations.transformers as lk_hf
    except ImportError as exc:
        print(f"  [hf hybrid] skipped ({exc})")
        return
    cfg = dict(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, attn_layer_indices=[2],
               num_attention_heads=16, num_key_value_heads=4, mamba_n_heads=32, mamba_d_head=64, mamba_n_groups=1,
               mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256)  # fmt: skip
    lk_hf.register()
    torch.manual_seed(0)
    ref = transformers.BambaForCausalLM(transformers.BambaConfig(**cfg, attn_implementation="sdpa")).eval()
    ours = transformers.BambaForCausalLM(transformers.BambaConfig(**cfg, attn_implementation=lk_hf.NAME)).eval()
    ours.load_state_dict(ref.state_dict())
    lk_hf.patch_model(ours)
    ids = torch.randint(3, 1000, (1, seqlen))
    case = f"Bamba 4 layers hidden 1024, 32 x 64 Mamba heads n=64, prefill {seqlen} tokens fp32"
    with torch.no_grad():
        _try(rows, "hf_bamba_prefill_cpu", case, "llmkernels-patched", lambda: ours(ids).logits,
             peer="transformers-torch", **measure_kw)  # fmt: skip
        _try(rows, "hf_bamba_prefill_cpu", case, "transformers-torch", lambda: ref(ids).logits, **measure_kw)


def _hf_mamba2_train_case(rows, seqlen, dtype, measure_kw, with_hf_norm=False):
    """A randomly initialised transformers Mamba2ForCausalLM (2 layers, hidden 1024, 32 heads of 64, dstate 128) on
    CPU, one training step (forward + backward of the LM loss): through llmkernels (patch_model: conv, scan and gated
    norm) against transformers' own PyTorch path with the same weights; with_hf_norm adds the patched model with
    transformers' gated norms put back (what patch_model did before it took the norms too)."""
    try:
        import transformers

        import llmkernels.integrations.transformers as lk_hf
    except ImportError as exc:
        print(f"  [hf mamba2] skipped ({exc})")
        return
    cfg = transformers.Mamba2Config(vocab_size=1000, hidden_size=1024, state_size=128, num_hidden_layers=2, expand=2,
                                    head_dim=64, num_heads=32, n_groups=1, conv_kernel=4, chunk_size=256)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.Mamba2ForCausalLM(cfg).to(dtype).train()
    ours = transformers.Mamba2ForCausalLM(cfg).to(dtype).train()
    ours.load_state_dict(ref.state_dict())
    lk_hf.patch_model(ours)
    ids = torch.randint(0, 1000, (1, seqlen))

    def step(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    op, dt = "hf_mamba2_train_cpu", str(dtype).replace("torch.", "")
    case = f"Mamba2ForCausalLM 2 layers hidden 1024, 32 x 64 heads n=128, train step {seqlen} tokens {dt}"
    _try(rows, op, case, "llmkernels-patched", lambda: step(ours), peer="transformers-torch", **measure_kw)
    if with_hf_norm:
        norms = [m for m in ours.modules() if "forward" in vars(m) and type(m).__name__.endswith("RMSNormGated")]
        for norm in norms:
            del norm.forward  # (back to transformers' norm)
        _try(rows, op, case, "llmkernels-patched-hf-norm", lambda: step(ours), **measure_kw)
    _try(rows, op, case, "transformers-torch", lambda: step(ref), **measure_kw)


def _hf_decode_case(rows, family: str, new_tokens: int, measure_kw):
    """Greedy generate() of `new_tokens` tokens after an 8-token prompt on the CPU, fp32, batch 1: a randomly
    initialised transformers model as transformers runs it (its PyTorch conv and decode step) against the same
    weights through patch_model. family: "mamba" (MambaForCausalLM, 4 layers, hidden 768), "mamba2"
    (Mamba2ForCausalLM, 2 layers, hidden 1024, 32 heads of 64, dstate 128) or "lfm2" (Lfm2ForCausalLM, 4 layers of
    which 3 short-conv, hidden 1024). The row's time is generate()'s wall time over new_tokens (the 8-token prefill
    included); a warning is printed when the two models' tokens differ."""
    try:
        import transformers

        import llmkernels.integrations.transformers as lk_hf
    except ImportError as exc:
        print(f"  [hf {family} decode] skipped ({exc})")
        return
    torch.manual_seed(0)
    if family == "mamba":
        cfg = transformers.MambaConfig(vocab_size=1000, hidden_size=768, state_size=16, num_hidden_layers=4, expand=2,
                                       conv_kernel=4)  # fmt: skip
        ref = transformers.MambaForCausalLM(cfg).eval()
        label = "MambaForCausalLM 4 layers hidden 768"
    elif family == "mamba2":
        cfg = transformers.Mamba2Config(vocab_size=1000, hidden_size=1024, state_size=128, num_hidden_layers=2,
                                        expand=2, head_dim=64, num_heads=32, n_groups=1, conv_kernel=4,
                                        chunk_size=256)  # fmt: skip
        ref = transformers.Mamba2ForCausalLM(cfg).eval()
        label = "Mamba2ForCausalLM 2 layers hidden 1024, 32 x 64 heads n=128"
    else:
        cfg = transformers.Lfm2Config(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=4, conv_L_cache=3,
                                      layer_types=["conv", "conv", "full_attention", "conv"], pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)  # fmt: skip
        ref = transformers.Lfm2ForCausalLM(cfg).eval()
        label = "Lfm2ForCausalLM 4 layers (3 short-conv) hidden 1024"
    ours = copy.deepcopy(ref)
    lk_hf.patch_model(ours)
    ids = torch.randint(3, 1000, (1, 8))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def generate(model):
        with torch.no_grad():
            return model.generate(ids, **kw)

    if not torch.equal(generate(ours), generate(ref)):
        print(f"  [hf {family} decode] warning: the patched model generated other tokens than transformers")
    op, case = f"hf_{family}_decode_cpu", f"{label}, generate {new_tokens} tokens fp32 (time per token)"
    for impl, model, peer in (("llmkernels-patched", ours, "transformers-torch"), ("transformers-torch", ref, None)):
        try:
            ms = measure_ms(lambda model=model: generate(model), **measure_kw) / new_tokens
        except Exception as exc:  # noqa: BLE001
            print(f"  [{case}] {impl}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append(_row(op, case, impl, ms, peer=peer))


def run(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    limit = copy_bandwidth_gbps()
    if on_gpu():
        backends = ("cuda", "triton")
        seqlens = (2048,) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        for dim in (5120,) if quick else (2048, 5120):  # quick: the target case (batch 8, dim 5120, seqlen 2048)
            for seqlen in seqlens:
                _scan_cases(rows, 8, dim, seqlen, torch.bfloat16, "cuda", backends, seqlen <= 2048, limit, {})
                torch.cuda.empty_cache()
        for batch in (1, 16, 256) if quick else (1, 4, 16, 64, 256):
            _decode_case(rows, batch, 5120, torch.bfloat16, "cuda", backends, limit, {})
        for batch in (1, 16) if quick else (1, 4, 16, 64):
            _mamba2_decode_case(rows, batch, "cuda", backends, limit, {})
        for seqlen in (2048,) if quick else (512, 2048, 8192):  # Mamba-2 2.7B's layer
            _mamba2_prefill_case(rows, 1, seqlen, 80, 64, 128, torch.bfloat16, "cuda", backends, limit, {})
        _mamba2_packed_case(rows, [1800, 900, 700, 400, 200, 60, 30, 6], 80, 64, 128, torch.bfloat16, "cuda", limit,
                            {})  # fmt: skip
    else:
        small = dict(warmup=1, rep=5, min_time_s=0)
        cases = [(1, 64, 2048, torch.float32), (2, 128, 2048, torch.bfloat16)]
        if not quick:
            cases += [(1, 256, 512, torch.float32), (4, 256, 2048, torch.bfloat16), (1, 128, 8192, torch.float32)]
        for batch, dim, seqlen, dtype in cases:
            _scan_cases(rows, batch, dim, seqlen, dtype, "cpu", ("cpu",), True, limit, small)
        for batch in (1, 16) if quick else (1, 16, 64):
            _decode_case(rows, batch, 1024, torch.float32, "cpu", ("cpu",), limit, small)
        for batch in (1,) if quick else (1, 8):
            _mamba2_decode_case(rows, batch, "cpu", ("cpu",), limit, dict(warmup=2, rep=10, min_time_s=0.1))
        _mamba2_prefill_case(rows, 1, 256, 8, 64, 64, torch.float32, "cpu", ("cpu",), limit, small, reference=True)
        _mamba2_packed_case(rows, [450, 220, 180, 100, 50, 12, 6, 2], 8, 64, 64, torch.float32, "cpu", limit, small)
        _hf_hybrid_case(rows, 512 if quick else 2048, small)
        for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
            _conv1d_case(rows, 4, 1536, 2048, 4, dtype, limit, small)
        for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16):
            _conv1d_time_major_case(rows, 1, 2304, 1024, dtype, limit, small)
            _rmsnorm_case(rows, 1024, 2048, dtype, limit, small)
        for tokens, backward in ((1, False), (1024, False), (1024, True)):  # (1 token: ~15 us, many reps)
            _add_norm_case(rows, tokens, 2560, backward, limit,
                           dict(warmup=20, rep=200, min_time_s=0.2) if tokens == 1 else small)  # fmt: skip
            _mamba2_mixer_train_case(rows, 1024, dtype, small)
        _hf_mamba2_train_case(rows, 1024, torch.bfloat16, small, with_hf_norm=not quick)
        for family in ("mamba2",) if quick else ("mamba", "mamba2", "lfm2"):
            _hf_decode_case(rows, family, 32, dict(warmup=1, rep=3, min_time_s=0))
    return rows


def _conv1d_case(rows, batch, dim, seqlen, width, dtype, limit, measure_kw):
    """causal_conv1d_fn (SiLU) on CPU against PyTorch's depthwise conv1d + SiLU in the same dtype."""
    import torch.nn.functional as F

    x = torch.randn(batch, dim, seqlen, dtype=dtype)
    w, b = torch.randn(dim, width, dtype=dtype), torch.randn(dim, dtype=dtype)
    case = f"b={batch} dim={dim} L={seqlen} width={width} silu {str(dtype).replace('torch.', '')}"
    nbytes = 2 * x.nbytes
    fns = {
        "llmkernels-cpu": lambda: llmkernels.causal_conv1d_fn(x, w, b, activation="silu"),
        "torch-conv1d": lambda: F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=width - 1, groups=dim)[..., :seqlen]),
    }
    for impl, fn in fns.items():
        _try(rows, "causal_conv1d_fwd_cpu", case, impl, fn, nbytes, limit, peer=None, **measure_kw)



def _conv1d_time_major_case(rows, batch, dim, seqlen, dtype, limit, measure_kw):
    """Forward + backward of causal_conv1d_fn (width 4, SiLU) on time-major x, a slice of wider (batch, seqlen, .) rows
    as Mamba2Mixer's conv reads it after in_proj, against PyTorch's depthwise conv1d + SiLU on the same view."""
    import torch.nn.functional as F

    wide = torch.randn(batch, seqlen, dim + 2080, dtype=dtype)
    w, b = torch.randn(dim, 4, dtype=dtype, requires_grad=True), torch.randn(dim, dtype=dtype, requires_grad=True)
    case = f"time-major b={batch} dim={dim} L={seqlen} width=4 silu {str(dtype).replace('torch.', '')}"
    nbytes = 5 * batch * dim * seqlen * wide.element_size()  # x, out; x, dout, dx again in the backward

    def step(conv):
        x = wide[..., 1024 : 1024 + dim].transpose(1, 2).detach().requires_grad_()
        out = conv(x)
        out.backward(torch.ones_like(out))

    def torch_conv(x):
        return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=3, groups=dim)[..., :seqlen])

    fns = {
        "llmkernels-cpu": lambda: step(lambda x: llmkernels.causal_conv1d_fn(x, w, b, activation="silu")),
        "torch-conv1d": lambda: step(torch_conv),
    }
    for impl, fn in fns.items():
        _try(rows, "causal_conv1d_fwd_bwd_cpu", case, impl, fn, nbytes, limit,
             peer=None if impl == "torch-conv1d" else "torch-conv1d", **measure_kw)  # fmt: skip


def _rmsnorm_case(rows, tokens, hidden, dtype, limit, measure_kw):
    """Forward + backward of rmsnorm_fn as Mamba2Mixer's norm (gate first, one group) against the same math in
    PyTorch ops (the reference: what transformers' MambaRMSNormGated does)."""
    x = torch.randn(1, tokens, hidden, dtype=dtype, requires_grad=True)
    z = torch.randn(1, tokens, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(hidden, dtype=dtype, requires_grad=True)
    case = f"gated rmsnorm {tokens} tokens x {hidden}, gate first {str(dtype).replace('torch.', '')}"
    nbytes = 7 * x.nbytes  # x, z, out; x, z, dout, dx, dz: 8 passes, one saved by recomputing nothing twice

    def step(backend):
        with llmkernels.use_backend(backend):
            out = llmkernels.rmsnorm_fn(x, w, None, z, 1e-5, None, False)
        out.backward(torch.ones_like(out))

    for impl, backend in (("llmkernels-cpu", "cpu"), ("torch-ops", "reference")):
        _try(rows, "rmsnorm_gated_fwd_bwd_cpu", case, impl, lambda backend=backend: step(backend), nbytes, limit,
             peer=None if impl == "torch-ops" else "torch-ops", **measure_kw)  # fmt: skip


def _add_norm_case(rows, tokens, hidden, backward, limit, measure_kw):
    """A Mamba block's fused add-norm (mamba_ssm's Block with fused_add_norm and residual_in_fp32): bf16 mixer output
    plus the fp32 residual stream, RMSNorm, prenorm (the new residual returned), at Mamba 2.8B's width. Peers: the
    reference (PyTorch ops) and torch's own F.rms_norm after the add."""
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=backward)
    res = torch.randn(1, tokens, hidden, requires_grad=backward)
    w = torch.randn(hidden, requires_grad=backward)
    what = "fwd+bwd" if backward else "fwd"
    case = f"{what} {tokens} tokens x {hidden}, bf16 x + fp32 residual, prenorm"
    # forward: x, residual in; y, new residual out. backward: dy, dresidual_out, x, residual in; dx, dresidual out
    nbytes = 2 * x.nbytes + 2 * res.nbytes + (3 * x.nbytes + 3 * res.nbytes if backward else 0)

    def ours(backend):
        # (the C++ op without use_backend: auto-dispatch picks it for CPU tensors, and entering the context costs a
        # few microseconds, as much as the 1-token kernel)
        with llmkernels.use_backend(backend) if backend != "auto" else contextlib.nullcontext():
            y, new_res = llmkernels.rms_norm_fn(x, w, None, residual=res, eps=1e-5, prenorm=True,
                                                residual_in_fp32=True)  # fmt: skip
        if backward:
            torch.autograd.backward([y, new_res], [torch.ones_like(y), torch.ones_like(new_res)])

    def torch_rms_norm():
        new_res = x.float() + res
        y = torch.nn.functional.rms_norm(new_res, (hidden,), w, 1e-5).to(x.dtype)
        if backward:
            torch.autograd.backward([y, new_res], [torch.ones_like(y), torch.ones_like(new_res)])

    fns = {"llmkernels-cpu": lambda: ours("auto"), "torch-ops": lambda: ours("reference"), "F.rms_norm": torch_rms_norm}
    for impl, fn in fns.items():
        _try(rows, "add_rmsnorm_cpu", case, impl, fn, nbytes, limit,
             peer=None if impl == "F.rms_norm" else "F.rms_norm", **measure_kw)  # fmt: skip


def _mamba2_mixer_train_case(rows, seqlen, dtype, measure_kw):
    """One training step (forward + backward) of a Mamba-2 mixer (hidden 1024, 32 heads of 64, dstate 128) on CPU:
    llmkernels' Mamba2Mixer against transformers' Mamba2Mixer (its PyTorch path) with the same weights."""
    try:
        import transformers
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer
    except ImportError as exc:
        print(f"  [mamba2 mixer] skipped ({exc})")
        return
    from llmkernels.nn import Mamba2Mixer

    cfg = transformers.Mamba2Config(hidden_size=1024, num_heads=32, head_dim=64, state_size=128, n_groups=1,
                                    expand=2, chunk_size=256)  # fmt: skip
    torch.manual_seed(0)
    hf = HFMixer(cfg, layer_idx=0).to(dtype)
    ours = Mamba2Mixer.from_config(cfg).to(dtype)
    ours.load_state_dict(hf.state_dict())
    h = torch.randn(1, seqlen, 1024, dtype=dtype, requires_grad=True)
    case = f"Mamba2Mixer train step, hidden 1024, 32 x 64 heads, n=128, {seqlen} tokens {dtype}".replace("torch.", "")

    def step(mixer):
        mixer(h).float().sum().backward()

    _try(rows, "mamba2_mixer_train_cpu", case, "llmkernels", lambda: step(ours), peer="transformers-torch",
         **measure_kw)  # fmt: skip
    _try(rows, "mamba2_mixer_train_cpu", case, "transformers-torch", lambda: step(hf), **measure_kw)


if __name__ == "__main__":
    from bench.common import add_speedups, format_table

    print(format_table(add_speedups(run(quick="--quick" in sys.argv))))
