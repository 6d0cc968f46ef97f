"""patch_model on tiny randomly initialised gated-DeltaNet hybrids (Qwen3-Next, Qwen3.5(-MoE), OlmoHybrid, LaraMini,
Kimi Linear; no downloads): the convolution before their delta rule runs llmkernels' causal_conv1d_fn and decode
step."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkernels import _ext  # noqa: E402
from llmkernels.integrations.transformers import patch_model  # noqa: E402

VOCAB = 97
FAMILIES = {  # model prefix -> the DeltaNet layer class
    "Qwen3Next": "Qwen3NextGatedDeltaNet",
    "Qwen3_5": "Qwen3_5GatedDeltaNet",
    "Qwen3_5Moe": "Qwen3_5MoeGatedDeltaNet",
    "OlmoHybrid": "OlmoHybridGatedDeltaNet",
    "LaraMini": "LaraMiniGatedDeltaNet",
    "KimiLinear": "KimiLinearDeltaAttention",
}
needs_conv_kernel = pytest.mark.skipif(not _ext.has_kernel("causal_conv1d_fwd", "CPU"), reason="no C++ CPU conv")


def _tiny(prefix: str):
    cfg_cls = getattr(transformers, prefix + "TextConfig", None) or getattr(transformers, prefix + "Config", None)
    model_cls = getattr(transformers, prefix + "ForCausalLM", None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {prefix}")
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    if prefix == "KimiLinear":  # (MLA attention and its own linear-attention names)
        cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                      kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
                      num_experts_per_tok=2, num_local_experts=4, linear_head_dim=16, linear_num_heads=4,
                      linear_conv_kernel_dim=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, layer_types=["linear_attention", "full_attention", "linear_attention",
                                                   "linear_attention"])  # fmt: skip
        return _patched_pair(prefix, model_cls, cfg)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  **(extra if prefix in ("Qwen3Next", "Qwen3_5Moe") else {}))  # fmt: skip
    return _patched_pair(prefix, model_cls, cfg)


def _patched_pair(prefix, model_cls, cfg):
    torch.manual_seed(0)
    ref = model_cls(cfg).eval()
    ours = copy.deepcopy(ref)
    assert patch_model(ours) == {FAMILIES[prefix]: 3}
    return ref, ours


@pytest.mark.hf
@needs_conv_kernel
@pytest.mark.parametrize("prefix", list(FAMILIES))
def test_patched_deltanet_matches_transformers(prefix):
    ref, ours = _tiny(prefix)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = ours.generate(ids[:1, :6], **kw), ref.generate(ids[:1, :6], **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)
