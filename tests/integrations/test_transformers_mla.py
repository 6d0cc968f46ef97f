"""attn_implementation="llmkernels" on multi-head latent attention (DeepSeek-V3, Kimi Linear: value's head dim differs
from query's and key's) on tiny randomly initialised models, against eager attention: logits, padded batches,
greedy generation, and patch_model(attention=True) on a loaded model."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkernels.integrations.transformers as lk_hf  # noqa: E402

lk_hf.register()
VOCAB = 97


def _config(kind: str, qk_nope: int, v_dim: int):
    mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=qk_nope, v_head_dim=v_dim)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=2, n_shared_experts=1,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **mla)  # fmt: skip
    if kind == "deepseek_v3":
        return transformers.DeepseekV3Config(num_hidden_layers=2, n_routed_experts=4, first_k_dense_replace=1,
                                             n_group=1, topk_group=1, **common), transformers.DeepseekV3ForCausalLM
    return transformers.KimiLinearConfig(num_hidden_layers=2, num_local_experts=4, linear_head_dim=16,
                                         linear_num_heads=4, linear_conv_kernel_dim=4,
                                         layer_types=["linear_attention", "full_attention"],
                                         **common), transformers.KimiLinearForCausalLM  # fmt: skip


def _pair(kind, qk_nope, v_dim):
    cfg, cls = _config(kind, qk_nope, v_dim)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg)).eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(lk_hf.NAME)
    return ref, ours


# qk head dim = qk_nope + 8 (rope): 24 against v 16 (value padded), and 16 against 32 (query and key padded)
@pytest.mark.hf
@pytest.mark.parametrize("dims", [(16, 16), (8, 32)], ids=["qk24-v16", "qk16-v32"])
@pytest.mark.parametrize("kind", ["deepseek_v3", "kimi_linear"])
def test_mla_matches_eager(kind, dims):
    ref, ours = _pair(kind, *dims)
    ids = torch.randint(3, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        got, want = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


@pytest.mark.hf
def test_patch_model_attention_on_kimi_linear():
    """The delta-attention convs and the MLA layers in one call, on a loaded model."""
    cfg, cls = _config("kimi_linear", 16, 16)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg)).eval()
    ours = copy.deepcopy(ref)
    assert lk_hf.patch_model(ours, attention=True) == {"KimiLinearDeltaAttention": 1, "attn_implementation": 1}
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
