"""patch_model(model, attention=True): a loaded transformers model switched to llmkernels' attention in the same
call that patches its mixers (no re-load with attn_implementation="llmkernels")."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkernels.integrations.transformers as lk_hf  # noqa: E402

VOCAB = 97


def _models(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if kind == "llama":
        cfg, cls, counts = transformers.LlamaConfig(intermediate_size=96, num_hidden_layers=2, **common), \
            transformers.LlamaForCausalLM, {}  # fmt: skip
    else:
        cfg = transformers.BambaConfig(intermediate_size=128, num_hidden_layers=3, attn_layer_indices=[1],
                                       mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                                       mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, **common)  # fmt: skip
        cls, counts = transformers.BambaForCausalLM, {"BambaMixer": 2}
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    ref = cls(copy.deepcopy(cfg)).eval()
    ours = copy.deepcopy(ref)
    assert lk_hf.patch_model(ours, attention=True) == {**counts, "attn_implementation": 1}
    assert ours.config._attn_implementation == lk_hf.NAME and ref.config._attn_implementation == "eager"
    return ref, ours


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["llama", "bamba"])
def test_attention_switched_on_a_loaded_model(kind, monkeypatch):
    ref, ours = _models(kind)
    calls = []
    attention = lk_hf.llmkernels_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(lk_hf.NAME, counting)
    try:
        ids = torch.randint(3, VOCAB, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        assert calls, "the patched model did not call llmkernels' attention"
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(ours.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))
    finally:
        lk_hf.register()  # (back to the real function)


def test_attention_needs_a_transformers_model():
    with pytest.raises(TypeError, match="attention=True needs a transformers PreTrainedModel"):
        lk_hf.patch_model(torch.nn.Linear(2, 2), attention=True)
