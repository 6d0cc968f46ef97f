"""llmkernels.nn.MambaMixer: Hugging Face's MambaMixer math and weights, and generation with its cache."""

import pytest
import torch

from llmkernels import _ext
from llmkernels.nn import MambaMixer

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("selective_scan_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::selective_scan_fwd (extension: {_ext.load_error or 'built without it'})",
)


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    m = MambaMixer(hidden_size=32, state_size=8, conv_kernel=4, expand=2, time_step_rank=4, **kw)
    with torch.no_grad():  # random weights everywhere, not the structured init only
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _hidden(batch, seqlen):
    return torch.randn(batch, seqlen, 32)


@needs_ext
@pytest.mark.parametrize("use_conv_bias", [True, False])
def test_generation_with_cache_equals_full_forward(use_conv_bias):
    """Prompt in one call, then a chunk of 3, then single tokens: every output equals the full forward's."""
    mixer = _mixer(use_conv_bias=use_conv_bias)
    h = _hidden(2, 13)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.new_cache(2)
        pieces = [mixer(h[:, :5], cache), mixer(h[:, 5:8], cache)]
        pieces += [mixer(h[:, t : t + 1], cache) for t in range(8, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@needs_ext
def test_short_prompt_shorter_than_the_conv():
    mixer = _mixer()
    h = _hidden(1, 6)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.new_cache(1)
        pieces = [mixer(h[:, :2], cache)] + [mixer(h[:, t : t + 1], cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@needs_ext
def test_mixer_is_differentiable():
    mixer = _mixer().train()
    h = _hidden(2, 9).requires_grad_()
    mixer(h).square().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


@needs_ext
def test_bf16_mixer_runs_close_to_fp32():
    mixer = _mixer()
    h = _hidden(2, 11)
    with torch.no_grad():
        ref = mixer(h)
        out = mixer.to(torch.bfloat16)(h.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------
# Against transformers (optional): same weights, same logits; cached generation through our mixers.
# ---------------------------------------------------------------------------------------------------------
class _HFAdapter(torch.nn.Module):
    """Stands in for a transformers MambaMixer inside MambaBlock (no HF cache: full forwards only)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer
        self.cache = None

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        assert cache_params is None
        return self.mixer(hidden_states, self.cache)


def _tiny_hf():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=4, use_cache=False)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = transformers.MambaForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    for layer in ours.backbone.layers:
        mixer = MambaMixer.from_config(cfg)
        mixer.load_state_dict(layer.mixer.state_dict())  # same parameter names and shapes
        layer.mixer = _HFAdapter(mixer.eval())
    return hf, ours


@needs_ext
@pytest.mark.hf
def test_same_logits_as_transformers_mamba():
    hf, ours = _tiny_hf()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, use_cache=False).logits, hf(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.hf
def test_cached_greedy_generation_matches_full_forwards():
    """Greedy decoding with our per-layer caches picks the tokens, and logits, of transformers' full forwards."""
    hf, ours = _tiny_hf()
    ids = torch.randint(0, 97, (1, 6))
    adapters = [layer.mixer for layer in ours.backbone.layers]
    for a in adapters:
        a.cache = a.mixer.new_cache(1)
    with torch.no_grad():
        logits = ours(ids, use_cache=False).logits[:, -1]  # the prompt fills the caches
        seq = ids
        for _ in range(8):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = ours(nxt, use_cache=False).logits[:, -1]  # one token through the cached decode path
            torch.testing.assert_close(logits, hf(seq, use_cache=False).logits[:, -1], rtol=1e-4, atol=1e-4)


@needs_ext
def test_torch_compile_mixer_fullgraph():
    mixer = _mixer()
    h = _hidden(2, 7)
    with torch.no_grad():
        compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(h), mixer(h), rtol=1e-5, atol=1e-6)


def test_cache_batch_and_empty_input():
    """A cache of another batch is named (it was a raw size mismatch); an empty chunk leaves the states alone
    (x[..., -0:] once took the whole conv history)."""
    m = _mixer()
    cache = m.new_cache(3)
    with pytest.raises(ValueError, match="cache holds 3 rows"):
        m(_hidden(2, 5), cache)
    cache = m.new_cache(2)
    with torch.no_grad():
        m(_hidden(2, 5), cache)
        conv, ssm = cache.conv_state.clone(), cache.ssm_state.clone()
        out = m(_hidden(2, 0), cache)
    assert out.shape == (2, 0, 32)
    assert torch.equal(cache.conv_state, conv) and torch.equal(cache.ssm_state, ssm)


@needs_ext
def test_decode_steps_refuse_a_backward_instead_of_dropping_gradients():
    """The decode ops (selective_state_update, causal_conv1d_update) have no backward, as mamba_ssm's: a backward
    through a cached step says so rather than leaving every weight but out_proj without gradient."""
    m = _mixer()
    cache = m.new_cache(2)
    with torch.no_grad():
        m(_hidden(2, 5), cache)
    x = _hidden(2, 1).requires_grad_()
    y = m(x, cache)
    with pytest.raises(RuntimeError, match="selective_state_update is not differentiable|causal_conv1d_update is not"):
        y.sum().backward()


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="conv_kernel must be 2, 3 or 4"):
        MambaMixer(hidden_size=32, conv_kernel=5)
    with pytest.raises(ValueError, match="state_size must be in 1..256"):
        MambaMixer(hidden_size=32, state_size=300)
    with pytest.raises(ValueError, match="hidden_states must be \\(batch, seqlen, hidden_size\\)"):
        _mixer()(torch.randn(3, 32))


@needs_ext
def test_packed_sequences_equal_each_sequence_alone():
    m = _mixer()
    lengths = [5, 1, 14]
    h = torch.randn(1, sum(lengths), 32, requires_grad=True)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].int()
    packed = m(h, seq_idx=seq_idx)
    alone = torch.cat([m(part) for part in h.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(packed)
    (gp,) = torch.autograd.grad(packed, [h], g)
    (ga,) = torch.autograd.grad(alone, [h], g)
    torch.testing.assert_close(gp, ga, rtol=1e-5, atol=1e-5)
