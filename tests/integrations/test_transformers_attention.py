"""attn_implementation="llmkernels" in tiny randomly initialised Llama / Mistral models (no downloads)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkernels.integrations.transformers as lk_hf  # noqa: E402

lk_hf.register()


def _tiny(model_type: str, **extra):
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[model_type]
    cfg = cfg_cls(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **extra,
    )
    torch.manual_seed(0)
    # Separate config objects: from_config records attn_implementation on the config it is given.
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="llmkernels").eval()
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == "llmkernels"
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.mark.hf
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_logits_match_eager(model_type, extra):
    eager, ours = _tiny(model_type, **extra)
    ids = torch.randint(0, 97, (2, 29))  # longer than the sliding window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
def test_padding_mask_matches_eager():
    eager, ours = _tiny("llama")
    ids = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 5:], want[0, 5:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_greedy_generation_matches_eager(model_type, extra):
    eager, ours = _tiny(model_type, **extra)
    ids = torch.randint(0, 97, (1, 7))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


@pytest.mark.hf
def test_llmkernels_attention_is_really_used():
    import llmkernels

    eager, ours = _tiny("llama")
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad(), llmkernels.use_backend("cuda"):
        eager(ids)
        with pytest.raises(llmkernels.BackendError):
            ours(ids)


@pytest.mark.hf
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_match_separate_runs(how):
    """Two sequences packed into one row (padding-free training's batches) give each its own logits: attention
    does not cross from one into the other (the varlen path), whether given by restarting position_ids or by
    explicit cu_seq_lens (as DataCollatorWithFlattening supplies them)."""
    eager, ours = _tiny("mistral", sliding_window=8)
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 19))
    ids = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(11), torch.arange(19)])[None]
    kw = {"position_ids": position_ids}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 11, 30], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19, max_length_k=19)
    with torch.no_grad():
        got = ours(ids, **kw).logits
        want = torch.cat([eager(a).logits, eager(b).logits], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_eager(model_type, extra, padded):
    """generate(cache_implementation="static"): the cache hands attention all max_cache_len slots, with no mask
    when nothing is padding (then the queries' position_ids say which slots hold tokens) or with a 2D mask
    shorter than the keys (transformers' rule: slice the keys to it). Both once attended to empty slots."""
    eager, ours = _tiny(model_type, **extra)
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
              attention_mask=mask)  # fmt: skip
    with torch.no_grad():
        want = eager.generate(ids, cache_implementation="dynamic", **kw).logits
        got = ours.generate(ids, cache_implementation="static", **kw).logits
    for step_got, step_want in zip(got, want):
        torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
def test_a_4d_mask_is_refused_by_name():
    _, ours = _tiny("llama")
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="2D padding mask"):
        lk_hf.llmkernels_attention_forward(ours.model.layers[0].self_attn, q, k, v, torch.ones(1, 1, 5, 5))


@pytest.mark.hf
@pytest.mark.parametrize("give_positions,grad", [(True, True), (False, False)])
def test_static_cache_chunked_forward_matches_eager(give_positions, grad):
    """A StaticCache filled chunk by chunk by hand, no mask: eval() with grad mode on (weights require grad) and
    calls without position_ids (transformers then passes (1, q_len) ones) must take the filled slots only too."""
    eager, ours = _tiny("llama")
    ids = torch.randint(1, 97, (2, 9))

    def run(model):
        cache = transformers.StaticCache(config=model.config, max_batch_size=2, max_cache_len=13)
        outs, start = [], 0
        with torch.set_grad_enabled(grad):
            for end in (5, 9):
                kw = {"position_ids": torch.arange(start, end).expand(2, -1)} if give_positions else {}
                outs.append(model(ids[:, start:end], past_key_values=cache, use_cache=True,
                                  cache_position=torch.arange(start, end), **kw).logits.detach())  # fmt: skip
                start = end
        return torch.cat(outs, 1)

    torch.testing.assert_close(run(ours), run(eager), rtol=1e-4, atol=1e-4)


def _masked_sdpa(q, k, v, mask):
    """What a decode step with a 2D padding mask means: query i (the last q_len positions) sees key j when mask[b, j]
    and j <= its position; GQA by repeating the KV heads. q: (b, h, q_len, d); k, v: (b, hk, kv_len, d)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    causal = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    visible = causal[None, None] & mask[:, None, None, :].bool()
    out = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=visible)
    return out.transpose(1, 2)


@pytest.mark.hf
@pytest.mark.parametrize("mask_rows,route", [
    ([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [0] * 7 + [1, 1]], "kvcache"),  # left padding, as generate() makes it
    ([[1, 1, 0, 0, 1, 1, 1, 1, 1], [1] * 9, [0, 1, 1, 1, 0, 1, 1, 1, 1]], "varlen"),  # holes: not leading blocks
])  # fmt: skip
def test_padded_decode_step_routes(monkeypatch, mask_rows, route):
    """A decode step (2 queries against 9 cached keys) with a padding mask: left padding goes to the kvcache op
    with cache_leftpad (the cache read in place), any other padding to the varlen path; both give what the mask
    means."""
    _, ours = _tiny("llama")
    calls = []
    for name in ("flash_attn_with_kvcache", "flash_attn_varlen_func"):
        real = getattr(lk_hf, name)
        counted = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(lk_hf, name, counted)
    mask = torch.tensor(mask_rows)
    q, k, v = torch.randn(3, 4, 2, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    out, _ = lk_hf.llmkernels_attention_forward(ours.model.layers[0].self_attn, q, k, v, mask, scaling=0.25)
    want = _masked_sdpa(q * 0.25 / 16**-0.5, k, v, mask)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert calls == [{"kvcache": "flash_attn_with_kvcache", "varlen": "flash_attn_varlen_func"}[route]]


@pytest.mark.hf
def test_padded_decode_step_stays_differentiable_with_grad():
    """eval() with gradients wanted (q requires grad): the left-padded step keeps the varlen path, whose backward
    works, instead of the inference-only kvcache op."""
    _, ours = _tiny("llama")
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    q = torch.randn(2, 4, 2, 16, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    out, _ = lk_hf.llmkernels_attention_forward(ours.model.layers[0].self_attn, q, k, v, mask, scaling=0.25)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach().double(), _masked_sdpa(q.detach() * 0.25 / 16**-0.5, k, v, mask),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.hf
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_left_padded_batch_generation_matches_eager(model_type, extra):
    """generate() on a left-padded batch of three prompts (dynamic cache): every step's logits equal eager's."""
    eager, ours = _tiny(model_type, **extra)
    ids = torch.randint(1, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
              attention_mask=mask)  # fmt: skip
    with torch.no_grad():
        want = eager.generate(ids, **kw).logits
        got = ours.generate(ids, **kw).logits
    for step_got, step_want in zip(got, want):
        torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
def test_a_hole_in_the_mask_with_a_sliding_window_matches_eager():
    """Right padding continued from a cache leaves a hole: the window counts positions (transformers), not packed
    tokens, so such masks take the explicit-mask path."""
    eager, ours = _tiny("mistral", sliding_window=3)
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)
        outs = {}
        for name, m in (("eager", eager), ("ours", ours)):
            cache = transformers.DynamicCache(config=m.config)
            m(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True)
            outs[name] = m(ids[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(outs["ours"], outs["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("mode", ["train", "eval-with-grad"])
def test_cached_forward_with_gradients_matches_eager(mode):
    """Keys from a cache with gradients wanted (train(), or eval() with grad on): a static cache's empty slots are
    not attended, and a dynamic cache's step is differentiable; logits and gradients equal eager's."""
    eager, ours = _tiny("llama")
    ids = torch.randint(1, 97, (2, 9))
    results = {}
    for name, m in (("eager", eager), ("ours", ours)):
        m.train() if mode == "train" else m.eval()
        m.zero_grad()
        static = transformers.StaticCache(config=m.config, max_batch_size=2, max_cache_len=14)
        first = m(ids[:, :6], past_key_values=static, use_cache=True).logits
        dynamic = transformers.DynamicCache(config=m.config)
        with torch.no_grad():
            m(ids[:, :6], past_key_values=dynamic, use_cache=True)
        second = m(ids[:, 6:], past_key_values=dynamic, use_cache=True).logits
        (first.square().sum() + second.sum()).backward()
        grad = m.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results[name] = (first.detach(), second.detach(), grad)
    for got, want in zip(results["ours"], results["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_attention_dropout_in_training(padded):
    """config.attention_dropout reaches the kernels in train() (dense and packed-padding paths): a seed repeats the
    logits and gradients, the C++ kernels' equal the reference backend's under the same seed, other seeds differ,
    and eval() drops nothing (eager's logits)."""
    import llmkernels

    eager, ours = _tiny("llama", attention_dropout=0.3)
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padded:
        mask[1, :4] = 0  # left padding: the varlen path
    ours.train()

    def run(seed, backend="auto"):
        ours.zero_grad()
        torch.manual_seed(seed)
        with llmkernels.use_backend(backend):
            logits = ours(ids, attention_mask=mask).logits
        logits[mask.bool()].square().sum().backward()
        return logits.detach(), ours.model.layers[0].self_attn.q_proj.weight.grad.clone()

    first, again, reference, other = run(1), run(1), run(1, "reference"), run(2)
    for got, want in zip(first, again):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(first, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (first[0] - other[0])[mask.bool()].abs().max() > 1e-3
    ours.eval()
    with torch.no_grad():
        valid = mask.bool()
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[valid],
                                   eager(ids, attention_mask=mask).logits[valid], rtol=1e-4, atol=1e-4)  # fmt: skip


class _CrossAttention(torch.nn.Module):
    is_causal = False


@pytest.mark.hf
@pytest.mark.parametrize("q_len", [1, 5])
def test_cross_attention_with_a_padded_encoder_keeps_every_decoder_query(q_len):
    """Cross-attention (non-causal, the mask the encoder's): every decoder query is valid. The query mask was sliced
    from the encoder's, which zeroed decoder rows of a padded encoder batch (a BART generate() with padding)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0  # right padding, as an encoder batch has it
    out, _ = lk_hf.llmkernels_attention_forward(_CrossAttention(), q, k, v, mask, is_causal=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None])
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.hf
def test_attention_sinks_are_refused():
    _, ours = _tiny("llama")
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        lk_hf.llmkernels_attention_forward(ours.model.layers[0].self_attn, q, k, k, None, s_aux=torch.zeros(4))


@pytest.mark.hf
def test_patch_model_refuses_models_without_flash_attention_support(monkeypatch):
    """Models whose masks are more than padding (transformers refuses flash_attention_2 for them): attention=True
    would silently lose those masks (Llama4's chunked attention changed its logits by ~0.5)."""
    eager, _ = _tiny("llama")
    monkeypatch.setattr(type(eager), "_supports_flash_attn", False)  # (Llama4, Gemma3 multimodal, ...)
    with pytest.raises(ValueError, match="does not declare FlashAttention support"):
        lk_hf.patch_model(eager, attention=True)


@pytest.mark.hf
def test_patch_model_attention_passes_attention_free_models():
    """Mamba declares neither an attention backend nor FlashAttention support: nothing to refuse."""
    cfg = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1)
    counts = lk_hf.patch_model(transformers.MambaForCausalLM(cfg), attention=True)
    assert counts.get("attn_implementation") == 1


@pytest.mark.hf
def test_patch_model_refuses_t5():
    """T5 declares no FlashAttention support and no attention backend, yet has attention whose mask carries its
    relative-position bias: refused (the rule on the backend flag alone let it through, logits moved by ~0.3)."""
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="does not declare FlashAttention support"):
        lk_hf.patch_model(transformers.T5ForConditionalGeneration(cfg), attention=True)
