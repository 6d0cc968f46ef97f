"""patch_model on tiny randomly initialised LFM2-family models (no downloads): their gated short convolutions run
llmkernels' causal_conv1d_fn and decode step."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkernels import _ext  # noqa: E402
from llmkernels.integrations.transformers import patch_model  # noqa: E402

VOCAB = 97
needs_conv_kernel = pytest.mark.skipif(not _ext.has_kernel("causal_conv1d_fwd", "CPU"), reason="no C++ CPU conv")


def _tiny(family: str, conv_bias: bool):
    layer_types = ["conv", "full_attention", "conv", "conv"]
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  layer_types=layer_types, conv_L_cache=3, conv_bias=conv_bias, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    if family == "lfm2":
        cfg = transformers.Lfm2Config(intermediate_size=96, **common)
        model_cls = transformers.Lfm2ForCausalLM
    elif family == "lfm3":
        cfg = transformers.Lfm3Config(intermediate_size=96, **common)
        model_cls = transformers.Lfm3ForCausalLM
    else:
        cfg = transformers.Lfm2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, num_dense_layers=1, **common)  # fmt: skip
        model_cls = transformers.Lfm2MoeForCausalLM
    torch.manual_seed(0)
    ref = model_cls(cfg).eval()
    ours = copy.deepcopy(ref)
    counts = patch_model(ours)
    assert counts == {{"lfm2": "Lfm2ShortConv", "lfm3": "Lfm3ShortConv", "lfm2_moe": "Lfm2MoeShortConv"}[family]: 3}
    return ref, ours


@pytest.mark.hf
@needs_conv_kernel
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("family", ["lfm2", "lfm2_moe", "lfm3"])
def test_patched_lfm2_matches_transformers(family, conv_bias):
    ref, ours = _tiny(family, conv_bias)
    ids = torch.randint(3, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@needs_conv_kernel
def test_patched_lfm2_generates_as_transformers():
    """Prefill then decode steps: the conv state (conv_L_cache entries) goes through the op's decode step."""
    ref, ours = _tiny("lfm2", True)
    ids = torch.randint(3, VOCAB, (1, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.hf
@needs_conv_kernel
@pytest.mark.parametrize("given_as", ["cu_seq_lens", "seq_idx"])
def test_packed_batch_convolves_each_sequence_alone(given_as):
    """A packed (padding-free) batch, described as transformers' collator does for flash attention (cu_seq_lens; the
    layers never see position_ids alone) or by seq_idx: each sequence's outputs equal the sequence run alone
    (transformers' own convolution runs across the boundary). The attention layer takes llmkernels' attention, which
    reads the same kwargs."""
    _, ours = _tiny("lfm2", True)
    patch_model(ours, attention=True)
    lens = [5, 8, 3]
    seqs = [torch.randint(3, VOCAB, (1, n)) for n in lens]
    packed = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)
    kw = {"position_ids": position_ids}
    if given_as == "cu_seq_lens":
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    else:  # (the attention packs by position_ids)
        kw["seq_idx"] = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(lens))[None]
    with torch.no_grad():
        got = ours(packed, **kw).logits[0]
        want = torch.cat([ours(s).logits[0] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
