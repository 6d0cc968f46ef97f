"""patch_mamba2 on a tiny randomly initialised Mamba2ForCausalLM (no downloads): the patched mixers run llmkernels'
mamba_chunk_scan_combined (prefill), the 4-D selective_state_update (decode) and causal conv1d, against transformers'
own PyTorch path: logits, greedy generation with the cache, gradients in training, and proof that the patched
model (only it) calls llmkernels."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkernels.integrations.transformers import patch_mamba2  # noqa: E402


def _tiny(**extra):
    cfg = transformers.Mamba2Config(
        vocab_size=97,
        hidden_size=64,
        state_size=16,
        num_hidden_layers=2,
        expand=2,
        head_dim=16,
        num_heads=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        **extra,
    )
    torch.manual_seed(0)
    ref = transformers.Mamba2ForCausalLM(copy.deepcopy(cfg)).eval()
    ours = transformers.Mamba2ForCausalLM(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    assert patch_mamba2(ours) == 2
    return ref, ours


@pytest.mark.hf
def test_patched_logits_match_transformers():
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (2, 29))  # several of transformers' chunks and a ragged last one
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
def test_patched_generation_matches():
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (2, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.hf
def test_patched_training_gradients_match():
    ref, ours = _tiny(time_step_limit=(0.0, 0.3))
    ids = torch.randint(0, 97, (2, 19))
    grads = []
    for model in (ref, ours):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "mixer" in n and p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and {"A_log", "dt_bias", "D"} <= {n.split(".")[-1] for n in grads[0]}
    for name in grads[0]:
        torch.testing.assert_close(
            grads[1][name], grads[0][name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.hf
def test_patched_model_really_calls_llmkernels():
    """Forcing a backend that cannot run CPU tensors makes the patched model, and only it, fail: prefill and decode."""
    import llmkernels

    ref, ours = _tiny()
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad(), llmkernels.use_backend("cuda"):
        ref(ids)
        with pytest.raises(llmkernels.BackendError):
            ours(ids)
    cache = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(ids, cache_params=cache, use_cache=True)
        with llmkernels.use_backend("cuda"), pytest.raises(llmkernels.BackendError):
            ours(ids[:, -1:], cache_params=cache, use_cache=True)


@pytest.mark.hf
def test_patched_scan_and_decode_step_are_llmkernels(monkeypatch):
    """The scan (prefill) and the 4-D state update (decode) of every patched layer are llmkernels' (the forced-backend
    test above stops at the conv, which runs first)."""
    import llmkernels.ops.mamba_chunk_scan as chunk_ops
    import llmkernels.ops.selective_scan as scan_ops

    calls = []
    for mod, name in ((chunk_ops, "mamba_chunk_scan_combined"), (scan_ops, "selective_state_update")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **kw: (calls.append(name), real(*a, **kw))[1])
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (1, 5))
    cache = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(ids, cache_params=cache, use_cache=True)
        ours(ids[:, -1:], cache_params=cache, use_cache=True)
    # prefill: one scan per layer; decode: the 4-D update per layer (which calls the 3-D one through the same name)
    assert calls[:2] == ["mamba_chunk_scan_combined"] * 2
    assert len(calls) >= 4 and set(calls[2:]) == {"selective_state_update"}


@pytest.mark.hf
def test_compiled_patched_model_still_calls_llmkernels():
    """torch.compile traces the patched forward's own names (a swap of transformers' module globals during the call
    was invisible to it: the compiled graph ran transformers' fallback)."""
    import llmkernels

    ref, ours = _tiny()
    ids = torch.randint(0, 97, (2, 11))
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, ours(ids, use_cache=False).logits,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
        torch._dynamo.reset()
        with llmkernels.use_backend("cuda"), pytest.raises(Exception, match="backend 'cuda' cannot run"):
            torch.compile(ours, backend="eager", fullgraph=True)(ids, use_cache=False)


@pytest.mark.hf
def test_an_installed_fused_kernel_does_not_take_training(monkeypatch):
    """With mamba_ssm (or a hub kernel) installed, transformers' fused training entry is a real kernel: a patched
    model must still train through llmkernels' pieces."""
    from transformers.models.mamba2 import modeling_mamba2

    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(modeling_mamba2, "mamba2_split_conv1d_scan_combined", fused)
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (2, 9))
    ours.train()
    ours(ids, labels=ids).loss.backward()
    ref.train()
    with pytest.raises(AssertionError, match="fused kernel ran"):
        ref(ids, labels=ids)


@pytest.mark.hf
def test_saved_patched_model_loads_and_patches_again(tmp_path):
    """torch.save of a whole patched model (its mixers' and norms' forwards are bound methods) loads, unpatched (the
    classes' forwards), with the same outputs; patch_mamba2 then patches it again."""
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (1, 11))
    path = tmp_path / "model.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=False)
    rebound = [m for m in loaded.modules() if "forward" in vars(m)]  # (unpickled as getattr(m, "forward"))
    assert rebound and all(m.forward.__func__ is type(m).forward for m in rebound)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits)
        assert patch_mamba2(loaded) == 2
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)
