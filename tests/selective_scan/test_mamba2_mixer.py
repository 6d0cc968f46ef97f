"""llmkernels.nn.Mamba2Mixer: Hugging Face's Mamba2Mixer math and weights, and generation with its cache."""

import copy

import pytest
import torch

from llmkernels import _ext
from llmkernels.nn import Mamba2Mixer

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("selective_scan_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::selective_scan_fwd (extension: {_ext.load_error or 'built without it'})",
)
HIDDEN = 32


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_heads": 4, "head_dim": 16, "state_size": 16, "n_groups": 2, "chunk_size": 8, **kw}
    m = Mamba2Mixer(HIDDEN, **kw)
    with torch.no_grad():  # random weights everywhere, not the structured init only
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@needs_ext
@pytest.mark.parametrize("use_conv_bias", [True, False])
def test_generation_with_cache_equals_full_forward(use_conv_bias):
    """Prompt in one call, then a chunk of 3, then single tokens (the 4-D decode step): the full forward's outputs."""
    mixer = _mixer(use_conv_bias=use_conv_bias)
    h = torch.randn(2, 13, HIDDEN)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.new_cache(2)
        pieces = [mixer(h[:, :5], cache), mixer(h[:, 5:8], cache)]
        pieces += [mixer(h[:, t : t + 1], cache) for t in range(8, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@needs_ext
def test_decode_applies_the_dt_limit_as_the_scan_does():
    """A time_step_limit that clamps: token-by-token decoding still equals the full forward (mamba_ssm's step
    ignores dt_limit; this layer applies it in both paths)."""
    mixer = _mixer(time_step_limit=(0.05, 0.2))
    h = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.new_cache(1)
        steps = torch.cat([mixer(h[:, t : t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


@needs_ext
def test_mixer_is_differentiable():
    mixer = _mixer().train()
    h = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mixer(h).square().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Mixer(HIDDEN, num_heads=4, head_dim=8, n_groups=3)
    with pytest.raises(ValueError, match="conv_kernel"):
        Mamba2Mixer(HIDDEN, num_heads=4, head_dim=8, conv_kernel=5)
    with pytest.raises(ValueError, match="hidden_states"):
        _mixer()(torch.randn(5, HIDDEN))


def _hf_pair():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    cfg = transformers.Mamba2Config(hidden_size=HIDDEN, num_heads=4, head_dim=16, state_size=16, n_groups=2,
                                    expand=2, conv_kernel=4, chunk_size=8, num_hidden_layers=1)  # fmt: skip
    torch.manual_seed(0)
    hf = HFMixer(copy.deepcopy(cfg), layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = Mamba2Mixer.from_config(cfg).eval()
    ours.load_state_dict(hf.state_dict())  # same parameter names and shapes
    return hf, ours


@needs_ext
@pytest.mark.hf
def test_same_outputs_as_transformers_mamba2_mixer():
    hf, ours = _hf_pair()
    h = torch.randn(2, 21, HIDDEN)  # several of transformers' chunks of 8 and a ragged one
    with torch.no_grad():
        torch.testing.assert_close(ours(h), hf(h), rtol=1e-4, atol=1e-5)
    assert set(hf.state_dict()) == set(ours.state_dict())


@needs_ext
@pytest.mark.hf
def test_same_gradients_as_transformers_mamba2_mixer():
    hf, ours = _hf_pair()
    h = torch.randn(2, 11, HIDDEN)
    for m in (hf, ours):
        m.zero_grad()
        m(h).square().sum().backward()
    for name, p in hf.named_parameters():
        got = ours.get_parameter(name).grad
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@needs_ext
def test_packed_sequences_equal_each_sequence_alone():
    """Padding-free training: sequences end to end in one row with seq_idx give each sequence's own outputs and the
    gradients of the separate calls."""
    m = _mixer()
    lengths = [7, 1, 12]
    h = torch.randn(1, sum(lengths), HIDDEN, requires_grad=True)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].int()
    packed = m(h, seq_idx=seq_idx)
    alone = torch.cat([m(part) for part in h.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(packed)
    (gp,) = torch.autograd.grad(packed, [h], g)
    (ga,) = torch.autograd.grad(alone, [h], g)
    torch.testing.assert_close(gp, ga, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_idx"):
        m(h, cache=m.new_cache(1), seq_idx=seq_idx)
