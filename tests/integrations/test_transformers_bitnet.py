"""patch_model on tiny randomly initialised BitNet models (no downloads): transformers' BitLinear (packed offline
weights) and AutoBitLinear (offline) become llmkernels TernaryLinear layers computing the same function."""

import copy

import pytest
import torch
import torch._dynamo

transformers = pytest.importorskip("transformers")
bitnet = pytest.importorskip("transformers.integrations.bitnet")

from llmkernels import _ext  # noqa: E402
from llmkernels.integrations.transformers import NormedTernaryLinear, patch_model  # noqa: E402
from llmkernels.nn import TernaryLinear  # noqa: E402

VOCAB = 64
needs_ternary_kernel = pytest.mark.skipif(not _ext.has_kernel("ternary_linear_a8", "CPU"),
                                          reason="no C++ CPU ternary kernel")  # fmt: skip


def _bitnet(linear_class="bitlinear", mode="offline", use_rms_norm=False, dtype=torch.float32, seed=0, bias=False):
    """A 2-layer BitNetForCausalLM with random ternary weights, weight scales and norms (and attention biases), in
    `dtype`."""
    cfg = transformers.BitNetConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=0, attention_bias=bias)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BitNetForCausalLM(cfg).eval().to(dtype)  # (BitLinear takes the dtype it is built in)
    qc = transformers.BitNetQuantConfig(linear_class=linear_class, quantization_mode=mode, use_rms_norm=use_rms_norm)
    bitnet.replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "rms_norm", None) is not None:  # (built on the meta device, for a checkpoint to fill)
                module.rms_norm.to_empty(device="cpu")
            if isinstance(module, (bitnet.BitLinear, bitnet.AutoBitLinear)):
                w_t = torch.randint(-1, 2, (module.out_features, module.in_features))
                if isinstance(module, bitnet.BitLinear):
                    module.weight.copy_(bitnet.pack_weights(w_t.clone()))
                    module.weight_scale.fill_(float(torch.empty(()).uniform_(8.0, 40.0)))  # 1 / gamma
                elif mode == "offline":
                    module.weight.copy_(w_t)
                    module.weight_scale.fill_(float(torch.empty(()).uniform_(0.02, 0.1)))  # gamma
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
    return model


def _logits(model, ids):
    # transformers' BitLinear compiles its activation quantiser with torch.compile: minutes of inductor on a CPU for
    # an unchanged result; eager here.
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        return model(ids).logits.float()


@pytest.mark.hf
@needs_ternary_kernel
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("linear_class,use_rms_norm", [("bitlinear", False), ("autobitlinear", False),
                                                       ("bitlinear", True)])  # fmt: skip
def test_patched_bitnet_matches_transformers(linear_class, use_rms_norm, bias):
    """(AutoBitLinear scales its bias with the products, BitLinear adds it after: both are reproduced.)"""
    ref = _bitnet(linear_class, use_rms_norm=use_rms_norm, bias=bias)
    ours = copy.deepcopy(ref)
    counts = patch_model(ours)
    assert counts == {"BitLinear" if linear_class == "bitlinear" else "AutoBitLinear": 14}  # 7 linears a layer
    layer = ours.model.layers[0].self_attn.q_proj
    assert type(layer) is (NormedTernaryLinear if use_rms_norm else TernaryLinear)
    assert not any(isinstance(m, (bitnet.BitLinear, bitnet.AutoBitLinear)) for m in ours.modules())
    ids = torch.randint(0, VOCAB, (2, 11))
    want, got = _logits(ref, ids), _logits(ours, ids)
    # fp32 throughout: the integer products are exact on both sides; what differs is the activation rounding,
    # x * (127 / s) there against (x * 127) / s here, which moves an x_q by one at an exact .5 tie (logits here
    # ~0.5; measured differences ~2e-7 with these random weights; a BitLinear's outputs, multiples of one scale, can
    # make ties downstream: one weight_scale of 20 gave 6e-3, see patch_model's docstring).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.hf
@needs_ternary_kernel
def test_patched_bitnet_in_bf16_is_no_worse_than_transformers():
    """In bf16 transformers' BitLinear quantises activations and sums in bf16; the TernaryLinear in fp32 and int32.
    Against the fp32 model, its error is at most transformers' own bf16 error (x 1.2, plus a floor)."""
    truth = _logits(_bitnet(), torch.arange(22).reshape(2, 11) % VOCAB)
    hf16 = _bitnet(dtype=torch.bfloat16)
    ours16 = copy.deepcopy(hf16)
    patch_model(ours16)
    ids = torch.arange(22).reshape(2, 11) % VOCAB
    err_hf = (_logits(hf16, ids) - truth).abs().mean()
    err_ours = (_logits(ours16, ids) - truth).abs().mean()
    assert err_ours <= 1.2 * err_hf + 1e-3, (err_ours, err_hf)


@pytest.mark.hf
@needs_ternary_kernel
def test_patched_bitnet_generates_as_transformers():
    ref = _bitnet()
    ours = copy.deepcopy(ref)
    patch_model(ours)
    ids = torch.randint(2, VOCAB, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.hf
def test_online_autobitlinear_is_left_alone():
    """Online quantisation keeps latent weights (training): not a fixed ternary weight to pack."""
    model = _bitnet("autobitlinear", mode="online")
    assert patch_model(model) == {}
    assert sum(isinstance(m, bitnet.AutoBitLinear) for m in model.modules()) == 14


@pytest.mark.hf
def test_bad_bitnet_weights_are_named():
    model = _bitnet()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 0b11  # code 3: no ternary value
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is not a packed ternary weight"):
        patch_model(model)
    model = _bitnet("autobitlinear")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 2] = 0.5
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight holds values other than"):
        patch_model(model)


@pytest.mark.hf
@pytest.mark.cuda
def test_patched_bitnet_on_a_gpu():
    """The same model on a GPU: the TernaryLinear layers run the CUDA / Triton ternary kernels."""
    ref = _bitnet().cuda()
    ours = copy.deepcopy(ref)
    patch_model(ours)
    ids = torch.randint(0, VOCAB, (2, 11), device="cuda")
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.hf
@needs_ternary_kernel
def test_mamba_with_bitnet_linears_keeps_dt_proj():
    """A Mamba model through transformers' BitNet quantizer: the mixer reads dt_proj's weight itself, so that layer
    stays (as quantize_ leaves it); the others become TernaryLinear and the mixers are patched."""
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=4)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(cfg).eval()
    qc = transformers.BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="offline")
    bitnet.replace_with_bitnet_linear(ref, modules_to_not_convert=["lm_head"], quantization_config=qc)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, bitnet.AutoBitLinear):
                module.weight.copy_(torch.randint(-1, 2, module.weight.shape))
                module.weight_scale.fill_(0.05)
    ours = copy.deepcopy(ref)
    assert patch_model(ours) == {"MambaMixer": 2, "AutoBitLinear": 6}  # in_proj, x_proj, out_proj a layer
    assert isinstance(ours.backbone.layers[0].mixer.dt_proj, bitnet.AutoBitLinear)
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.hf
def test_quantize_leaves_transformers_bitnet_layers():
    """llmkernels.quantize_ would requantise an AutoBitLinear (an nn.Linear) and lose its scale or its norm:
    it skips them; patch_model converts the offline ones exactly."""
    import llmkernels

    for mode in ("offline", "online"):
        model = _bitnet("autobitlinear", mode=mode, use_rms_norm=mode == "online")
        llmkernels.quantize_(model)
        assert sum(isinstance(m, bitnet.AutoBitLinear) for m in model.modules()) == 14
        assert not any(isinstance(m, TernaryLinear) for m in model.modules())


@pytest.mark.hf
def test_patch_model_edges():
    """A layer shared under two names stays one module; a lone layer and meta weights are refused, named."""
    model = _bitnet()
    layers = model.model.layers
    layers[1].mlp.up_proj = layers[0].mlp.up_proj  # tied
    counts = patch_model(model)
    assert counts == {"BitLinear": 13}
    assert layers[1].mlp.up_proj is layers[0].mlp.up_proj and isinstance(layers[0].mlp.up_proj, TernaryLinear)
    with pytest.raises(ValueError, match="model is itself a BitNet linear layer"):
        patch_model(bitnet.BitLinear(8, 8, bias=False))
    meta = bitnet.BitLinear(8, 8, bias=False, device="meta")
    holder = torch.nn.Sequential(meta)
    with pytest.raises(ValueError, match="0's weights are on the meta device"):
        patch_model(holder)
    normed = bitnet.BitLinear(8, 8, bias=False, use_rms_norm=True)  # (transformers builds the norm on meta)
    normed.rms_norm.to_empty(device="meta")
    with pytest.raises(ValueError, match="0's weights are on the meta device"):
        patch_model(torch.nn.Sequential(normed))
