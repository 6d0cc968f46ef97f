"""BitLinear trains; quantize_ swaps nn.Linear for TernaryLinear with the same function; packed state_dict."""

import io

import pytest
import torch

import llmkernels
from llmkernels.nn import BitLinear, TernaryLinear


@pytest.mark.parametrize("act_bits", [8, None])
def test_bitlinear_trains_on_toy_regression(act_bits):
    layer = BitLinear(32, 8, bias=True, act_bits=act_bits)
    target = torch.nn.Linear(32, 8)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = target(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), y)
        loss.backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0  # STE reaches latent weights
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


class TinyBlock(torch.nn.Module):
    """A transformer-ish block: attention projections, an MLP and an LM head (which quantize_ must skip)."""

    def __init__(self, d=64, vocab=50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.proj = torch.nn.Linear(d, d, bias=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a)
        h = h + self.mlp(h)
        return self.lm_head(h)


def _bit_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every quantised nn.Linear replaced by a BitLinear holding the same weights."""
    import copy

    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                bit = BitLinear(child.in_features, child.out_features, bias=child.bias is not None)
                bit.load_state_dict(child.state_dict())
                setattr(parent, name, bit)
    return twin


@pytest.mark.parametrize("act_bits", [8, None])
def test_quantize_matches_bitlinear_forward(act_bits):
    model = TinyBlock().eval()
    twin = _bit_twin(model)
    for m in twin.modules():
        if isinstance(m, BitLinear):
            m.act_bits = act_bits
    llmkernels.quantize_(model, act_bits=act_bits)
    assert isinstance(model.qkv, TernaryLinear) and isinstance(model.mlp[2], TernaryLinear)
    assert type(model.lm_head) is torch.nn.Linear  # the LM head stays full precision by default
    tokens = torch.randint(0, 50, (2, 9))
    # Layer by layer, on the inputs each BitLinear of the twin sees: the same function up to fp32 rounding.
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
        for name, m in twin.named_modules()
        if isinstance(m, BitLinear)
    ]
    with torch.no_grad():
        y_twin = twin(tokens)
        for h in hooks:
            h.remove()
        assert sorted(seen) == ["mlp.0", "mlp.2", "proj", "qkv"]
        for name, (inp, out) in seen.items():
            torch.testing.assert_close(model.get_submodule(name)(inp), out, rtol=1e-4, atol=1e-4)
        # End to end, an fp32 rounding difference can move one x_q of a later layer across a rounding boundary
        # (one step: s / 127 of that row), so the whole model is only close to within a few such steps.
        y = model(tokens)
        torch.testing.assert_close(y, y_twin, rtol=0, atol=0.05 * y_twin.abs().max().item())


def test_quantize_filter_fn_and_bitlinear_to_ternary():
    model = TinyBlock()
    llmkernels.quantize_(model, filter_fn=lambda m, fqn: fqn.startswith("mlp."))
    assert isinstance(model.mlp[0], TernaryLinear) and type(model.qkv) is torch.nn.Linear
    bit = BitLinear(40, 7, bias=True)
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(bit.to_ternary()(x), bit(x), rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_size():
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 768, bias=False))
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters() if p.dim() == 2)
    llmkernels.quantize_(model)
    state = model.state_dict()
    packed_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k.endswith("w_packed"))
    assert state["0.w_packed"].dtype == torch.uint8
    assert bf16_bytes / packed_bytes >= 7, (bf16_bytes, packed_bytes)
    buf = io.BytesIO()
    torch.save(state, buf)
    fresh = torch.nn.Sequential(TernaryLinear(512, 256, bias=True), torch.nn.ReLU(), TernaryLinear(256, 768))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 512)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_state_dict_of_another_width_is_refused():
    """Rows are padded to 256 weights, so an 11-input checkpoint has a 10- or 12-input layer's w_packed shape: the
    checkpoint records in_features and act_bits (as nn.Linear's weight shape would refuse the load). A checkpoint
    from before that record: refused when a column past in_features holds weights (it would be dropped); a
    narrower one's padding is zero weights, so it loads."""
    torch.manual_seed(0)
    src = TernaryLinear.from_linear(torch.nn.Linear(11, 4, bias=False))
    assert llmkernels.reference.ternary.unpack_ternary_ref(src.w_packed, 11)[:, 10].any()
    for width in (10, 12):
        match = f"w_packed: the checkpoint's layer has in_features=11, this one {width}"
        with pytest.raises(RuntimeError, match=match):
            TernaryLinear(width, 4).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="act_bits: the checkpoint's layer has act_bits=8, this one None"):
        TernaryLinear(11, 4, act_bits=None).load_state_dict(src.state_dict())
    TernaryLinear(11, 4).load_state_dict(src.state_dict())

    old_format = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="nonzero weights past in_features=10"):
        TernaryLinear(10, 4).load_state_dict(old_format)
    TernaryLinear(11, 4).load_state_dict(old_format)
    with pytest.raises(RuntimeError, match='Missing key.*"w_scale"'):
        TernaryLinear(11, 4).load_state_dict({"w_packed": old_format["w_packed"]})
    wider = TernaryLinear(12, 4)
    wider.load_state_dict(old_format)
    x = torch.randn(2, 12)
    x[:, 11] = 0.0
    torch.testing.assert_close(wider(x), src(x[:, :11]), rtol=0, atol=0)


def test_module_casts_keep_the_weight_scale_fp32():
    """model.to(bf16) / .half() (a BitNet model in bf16, or anything after quantize_) once cast gamma too, and
    every forward then refused it; gamma must keep its value, and the layer run in the new dtype."""
    torch.manual_seed(1)
    layer = TernaryLinear.from_linear(torch.nn.Linear(40, 6, bias=True))
    gamma = layer.w_scale.clone()
    x = torch.randn(3, 40)
    want = layer(x)
    for dtype in (torch.bfloat16, torch.float16):
        cast = TernaryLinear.from_linear(torch.nn.Linear(40, 6, bias=True))
        cast.load_state_dict(layer.state_dict())
        cast = cast.to(dtype)
        assert cast.w_scale.dtype == torch.float32 and torch.equal(cast.w_scale, gamma)
        y = cast(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=3e-2)


def test_input_width_is_checked():
    """Rows are padded to 256 weights, so the op cannot see a wrong width: an 8-input layer once took 16 inputs."""
    layer = TernaryLinear.from_linear(torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="x must have in_features = 8"):
        layer(torch.randn(2, 16))


def test_quantize_keeps_bitlinear_act_bits_and_tied_modules():
    """A BitLinear trained weight-only stays weight-only (it became act_bits=8, changing the model); a Linear two
    parents share stays one module."""
    from llmkernels.nn import BitLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(BitLinear(16, 8, act_bits=None))
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
        llmkernels.quantize_(model)
        assert model[0].act_bits is None
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(16, 16)
    shared = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    llmkernels.quantize_(shared)
    assert isinstance(shared[0], TernaryLinear) and shared[0] is shared[2]


def test_quantize_leaves_layers_whose_parents_read_their_weights():
    """nn.MultiheadAttention reads out_proj.weight itself, nn.TransformerEncoderLayer's fast path linear1/2's: those
    stay nn.Linear (swapped, the parent failed or would bypass the ternary layer); a Linear beside them is swapped,
    and the model's output is unchanged in eval, grad mode or not."""
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True),
        torch.nn.Linear(32, 8),
    ).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = model[0](x)
    llmkernels.quantize_(model)
    layer = model[0]
    assert type(layer.self_attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(layer.linear1) is torch.nn.Linear and type(layer.linear2) is torch.nn.Linear
    assert isinstance(model[1], TernaryLinear)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(layer(x).detach(), before, rtol=1e-5, atol=1e-5)


def test_quantize_keeps_a_mamba_mixers_dt_proj():
    """Mamba-1 mixers (ours and transformers') fold dt_proj's weight into the scan themselves: quantize_ leaves it
    an nn.Linear and swaps in_proj, x_proj and out_proj; the quantised model runs (prefill and a cached step)."""
    from llmkernels.nn import MambaMixer

    mixer = MambaMixer(hidden_size=32, state_size=8, conv_kernel=4, expand=2)
    llmkernels.quantize_(mixer)
    assert type(mixer.dt_proj) is torch.nn.Linear
    assert all(isinstance(getattr(mixer, n), TernaryLinear) for n in ("in_proj", "x_proj", "out_proj"))
    h = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.isfinite(mixer(h)).all()
        cache = mixer.new_cache(batch_size=2)
        mixer(h, cache)
        assert torch.isfinite(mixer(h[:, :1], cache)).all()
    from llmkernels.nn import Mamba2Mixer

    mixer2 = llmkernels.quantize_(Mamba2Mixer(64, 4, 16, 16))
    assert isinstance(mixer2.in_proj, TernaryLinear)
    cache2 = mixer2.new_cache(batch_size=2)  # (device / dtype from the conv: in_proj has no weight now)
    with torch.no_grad():
        mixer2(torch.randn(2, 5, 64), cache2)
        assert torch.isfinite(mixer2(torch.randn(2, 1, 64), cache2)).all()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2)
    model = transformers.MambaForCausalLM(cfg).eval()
    llmkernels.quantize_(model)
    hf_mixer = model.backbone.layers[0].mixer
    assert type(hf_mixer.dt_proj) is torch.nn.Linear and isinstance(hf_mixer.in_proj, TernaryLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 9))).logits).all()
