"""patch_model + attn_implementation="llmkernels" on tiny randomly initialised Mamba-family and hybrid models of
transformers (no downloads), fp32 on CPU, against the same weights unpatched with eager attention: logits, greedy
generation with the model's cache, gradients in training (the unfused path), patch counts and proof that the
patched model (only it) calls llmkernels; packed (padding-free) batches against each sequence run alone.

Tolerances: both sides compute in fp32; ours sums in another order (chunked / sequential scans, blockwise softmax),
which moves O(1) logits by ~1e-6. rtol = atol = 1e-4 leaves room for that through a few layers while a real error
(a state or mask crossing a sequence, a dropped gate or norm) moves them by 1e-2 or more. Gradients: 1e-3 / 1e-4,
as the Mamba-2 test's (they sum over more terms)."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkernels  # noqa: E402
import llmkernels.integrations.transformers as lk_hf  # noqa: E402

lk_hf.register()

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)  # fmt: skip
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
# Mamba-2 mixers: 8 heads of 16 in 2 groups, state 16, chunks of 8 (so the test sequences span several, raggedly)
_M2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
           mamba_chunk_size=8)  # fmt: skip

# name: (config class, config kwargs, {mixer class: count patch_model must report})
# fmt: off
SPECS = {
    "mamba2": ("Mamba2Config", dict(_COMMON, state_size=16, num_hidden_layers=2, expand=2, head_dim=16, num_heads=8,
                                    n_groups=2, conv_kernel=4, chunk_size=8), {"Mamba2Mixer": 2}),
    "bamba": ("BambaConfig", dict(_COMMON, **_ATTN, **_M2, intermediate_size=128, num_hidden_layers=3,
                                  attn_layer_indices=[1]), {"BambaMixer": 2}),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(_COMMON, **_ATTN, **_M2, intermediate_size=64, shared_intermediate_size=64, num_local_experts=4,
             num_experts_per_tok=2, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"]),
        {"GraniteMoeHybridMambaLayer": 2},
    ),
    "nemotron_h": (
        "NemotronHConfig",
        dict(_COMMON, **_ATTN, head_dim=16, intermediate_size=128, num_hidden_layers=4,
             layers_block_type=["mamba", "attention", "mlp", "mamba"], mamba_num_heads=8, mamba_head_dim=16,
             n_groups=2, ssm_state_size=16, chunk_size=8),
        {"NemotronHMamba2Mixer": 2},
    ),
    "zamba2": (  # (a hybrid layer: the shared attention block, then its own Mamba-2 mixer)
        "Zamba2Config",
        dict(_COMMON, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3,
             layers_block_type=["mamba", "hybrid", "mamba"], mamba_d_state=16, n_mamba_heads=8, mamba_ngroups=2,
             chunk_size=8),
        {"Zamba2MambaMixer": 3},
    ),
    "falcon_h1": ("FalconH1Config", dict(_COMMON, **_ATTN, **_M2, intermediate_size=128, num_hidden_layers=2,
                                         mamba_d_ssm=128), {"FalconH1Mixer": 2}),
    "jamba": (
        "JambaConfig",
        dict(_COMMON, **_ATTN, intermediate_size=128, num_hidden_layers=3, attn_layer_period=2, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_dt_rank=4),
        {"JambaMambaMixer": 2},
    ),
    "falcon_mamba": ("FalconMambaConfig", dict(_COMMON, state_size=8, num_hidden_layers=2, time_step_rank=4),
                     {"FalconMambaMixer": 2}),
    "zamba": (  # (Zamba ties its shared hybrid blocks: it wants two of them; 5 layers, 2 hybrid, all with a mixer)
        "ZambaConfig",
        dict(_COMMON, **_ATTN, intermediate_size=128, num_hidden_layers=5, attn_layer_period=2, attn_layer_offset=0,
             n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=4),
        {"ZambaMambaMixer": 5},
    ),
}
# fmt: on
# Variants: FalconH1 with its gated RMS norm (without it the gate goes into the decode step as z)
VARIANTS = {"falcon_h1_rmsnorm": ("falcon_h1", dict(mamba_rms_norm=True))}
ALL = list(SPECS) + list(VARIANTS)
# Packed batches: the Mamba-2 mixers pass their kwargs (seq_idx) to the conv and the scan. The Mamba-1 mixers do not
# pass it to the scan (Jamba and FalconMamba not even to the conv): transformers cannot pack them.
PACKED = ["mamba2", "bamba", "granitemoehybrid", "nemotron_h", "zamba2", "falcon_h1"]


def _config(name: str):
    base, extra = VARIANTS.get(name, (name, {}))
    cls_name, kwargs, counts = SPECS[base]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    try:
        return cls(**kwargs, **extra), counts
    except Exception as exc:  # (a release whose config will not take these small sizes)
        pytest.skip(f"cannot build a tiny {cls_name}: {type(exc).__name__}: {exc}")


def _pair(name: str):
    """(reference: eager attention, transformers' own Mamba code; ours: llmkernels attention, patched mixers)."""
    cfg, counts = _config(name)
    torch.manual_seed(0)
    # Separate config objects: from_config records attn_implementation on the config it is given.
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=lk_hf.NAME).eval()
    ours.load_state_dict(ref.state_dict())
    assert lk_hf.patch_model(ours) == counts
    return ref, ours


@pytest.mark.hf
@pytest.mark.parametrize("name", ALL)
def test_logits_match(name):
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 21))  # several chunks of 8 and a ragged last one
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("name", ALL)
def test_greedy_generation_matches(name):
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 7))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)  # (never stop early)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.hf
@pytest.mark.parametrize("name", ALL)
def test_left_padded_batch_matches(name):
    """A left-padded batch, as generate() takes one: the mixers zero the padding themselves (the mask does not reach
    our ops); the attention gets the 2-D padding mask. Logits at the real tokens, then greedy generation."""
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.hf
@pytest.mark.parametrize("name", ALL)
def test_training_gradients_match(name):
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 19))
    grads = []
    for model in (ref, ours):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert any(n.endswith("A_log") for n in grads[0])  # the scans' parameters got gradients
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.hf
@pytest.mark.parametrize("name", list(SPECS))
def test_patched_model_really_calls_llmkernels(name):
    """Forcing a backend that cannot run CPU tensors makes the patched model, and only it, fail."""
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad(), llmkernels.use_backend("cuda"):
        ref(ids)
        with pytest.raises(llmkernels.BackendError):
            ours(ids)


@pytest.mark.hf
def test_patch_model_leaves_other_models_alone():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    assert lk_hf.patch_model(model) == {}


def _packed_support() -> str | None:
    """Why packed sequences cannot run yet (None when they can): llmkernels' conv1d and Mamba-2 scan must take
    seq_idx, and the loaded extension must match the Python sources (which can land before a rebuild). A seq_idx
    call that fails otherwise is a bug: the test runs and shows it."""
    for fn in (llmkernels.causal_conv1d_fn, llmkernels.mamba_chunk_scan_combined):
        if "seq_idx" not in inspect.signature(fn).parameters:
            return f"llmkernels.{fn.__name__} takes no seq_idx yet"

    def probe(**packed):
        llmkernels.causal_conv1d_fn(torch.zeros(1, 2, 4), torch.zeros(2, 4), **packed)
        B = C = torch.zeros(1, 4, 1, 4)
        llmkernels.mamba_chunk_scan_combined(torch.zeros(1, 4, 2, 8), torch.ones(1, 4, 2), -torch.ones(2), B, C, 2,
                                             **packed)  # fmt: skip

    try:
        probe()
    except RuntimeError as exc:
        return f"the loaded llmkernels extension is older than its Python sources, rebuild it ({str(exc)[:160]})"
    try:
        probe(seq_idx=torch.tensor([[0, 0, 1, 1]], dtype=torch.int32))
    except (NotImplementedError, TypeError) as exc:
        return f"llmkernels cannot run seq_idx yet ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def _flattened(sequences):
    """The batch transformers' DataCollatorWithFlattening makes for padding-free training (seq_idx, position_ids
    restarting per sequence, FlashAttention's cu_seq_lens / max_length), without labels."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True, return_seq_idx=True)
    batch = collate([{"input_ids": s.tolist()} for s in sequences], return_tensors="pt")
    batch.pop("labels", None)
    return dict(batch)


@pytest.mark.hf
@pytest.mark.parametrize("name", PACKED)
def test_packed_sequences_match_each_alone(name):
    """Batch 1 holding 3 sequences end to end (lengths around the chunk size of 8): each sequence's outputs equal
    those of the sequence run alone, in inference and in training (the scans restart at each sequence: seq_idx; the
    attention keeps to each sequence: cu_seq_lens). The base model's, as Mamba2ForCausalLM does not hand its kwargs
    (seq_idx) to its backbone."""
    reason = _packed_support()
    if reason is not None:
        pytest.skip(reason)
    _, ours = _pair(name)
    torch.manual_seed(1)
    sequences = [torch.randint(3, VOCAB, (n,)) for n in (9, 13, 6)]
    batch = _flattened(sequences)
    assert batch["seq_idx"].shape == (1, 28) and int(batch["seq_idx"].max()) == 2
    for training in (False, True):
        ours.train(training)
        packed = ours.base_model(**batch, use_cache=False)[0][0]
        start = 0
        for s in sequences:
            alone = ours.base_model(s[None], use_cache=False)[0][0]
            torch.testing.assert_close(packed[start : start + len(s)], alone, rtol=1e-4, atol=1e-4)
            start += len(s)


@pytest.mark.hf
def test_packed_batch_of_a_mamba1_mixer_is_refused():
    """Zamba's mixer passes seq_idx to the conv but not to the scan: a patched one refuses it rather than letting the
    state run from one sequence into the next."""
    _, ours = _pair("zamba")
    batch = _flattened([torch.randint(3, VOCAB, (n,)) for n in (5, 7)])
    with torch.no_grad(), pytest.raises(NotImplementedError, match="do not pass seq_idx to their scan"):
        ours.base_model(**batch, use_cache=False)


# The models whose Mamba-2 mixers hold a gated RMS norm (self.norm; FalconH1's only with mamba_rms_norm).
GATED_NORM_MODELS = ["mamba2", "bamba", "granitemoehybrid", "nemotron_h", "zamba2", "falcon_h1_rmsnorm"]


def _gated_norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNormGated")]


def _norm_cases(norm, dtype):
    """(x, gate) pairs: with and without the gate, as a sequence (batch, seqlen, dim) and a decode step (batch, dim);
    FalconH1's norm with the gate before and after it."""
    dim = norm.weight.shape[0]
    orders = [False, True] if hasattr(norm, "norm_before_gate") else [None]
    for order in orders:
        if order is not None:
            norm.norm_before_gate = order
        for shape in ((2, 5, dim), (3, dim)):
            x = torch.randn(shape, dtype=dtype)
            yield x, torch.randn(shape, dtype=dtype)
            yield x, None


@pytest.mark.hf
@pytest.mark.parametrize("name", GATED_NORM_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_norms_are_patched_and_match_transformers(name, dtype):
    """patch_model routes every mixer's gated RMS norm to rmsnorm_fn, which gives what transformers' forward gives,
    and the same gradients (fp32). fp32: summation order only. bf16: transformers (FalconH1 aside) rounds the
    normalised value to bf16 before the weight multiplies it and rounds again after; rmsnorm_fn rounds once (as
    mamba_ssm), so the two may differ by a few bf16 half-ulps (2^-9 each): rtol 1e-2 is 2.5 ulps, while a dropped
    weight, gate or group moves outputs by O(1)."""
    _, ours = _pair(name)
    norms = _gated_norms(ours)
    assert norms and all("forward" in vars(n) for n in norms)  # (an instance attribute: patched)
    torch.manual_seed(2)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for norm in norms:
        norm.to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn_like(norm.weight))  # (the ones it starts with would hide a dropped weight)
        for x, gate in _norm_cases(norm, dtype):
            args = [x.clone().requires_grad_(), None if gate is None else gate.clone().requires_grad_()]
            ref_args = [x.clone().requires_grad_(), None if gate is None else gate.clone().requires_grad_()]
            got, want = norm(*args), type(norm).forward(norm, *ref_args)
            assert got.dtype == want.dtype == dtype
            torch.testing.assert_close(got, want, **tol)
            if dtype != torch.float32:
                continue
            dout = torch.randn_like(got)
            got_grads = torch.autograd.grad(got, [a for a in args if a is not None] + [norm.weight], dout)
            want_grads = torch.autograd.grad(want, [a for a in ref_args if a is not None] + [norm.weight], dout)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.hf
def test_patched_gated_norm_really_calls_llmkernels_and_keeps_transformers_dtype_rule():
    """The patched norm fails when a backend that cannot run CPU tensors is forced (so it is ours); an fp32 weight on
    bf16 activations (autocast's case), where transformers' norm returns fp32, runs transformers' forward."""
    _, ours = _pair("mamba2")
    norm = _gated_norms(ours)[0]
    x, gate = torch.randn(2, 3, norm.weight.shape[0]), torch.randn(2, 3, norm.weight.shape[0])
    with llmkernels.use_backend("cuda"), pytest.raises(llmkernels.BackendError):
        norm(x, gate)
    xb, gb = x.bfloat16(), gate.bfloat16()
    got = norm(xb, gb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, type(norm).forward(norm, xb, gb), rtol=0, atol=0)


@pytest.mark.hf
@pytest.mark.parametrize("name", ALL)
def test_logits_under_bf16_autocast(name):
    """Under CPU autocast some models hand the attention fp32 queries and keys (their rotary embedding) beside bf16
    values: the patched model runs, and its logits are as close to the fp32 model's as transformers' own under the
    same autocast (at most 2x its error, plus a bf16 half-ulp of the O(1) logits)."""
    ref, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 21))
    with torch.no_grad():
        exact = ref(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs, got = ref(ids).logits.float(), ours(ids).logits.float()
    their_error = (theirs - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= 2 * their_error + 4e-3
