"""The Triton GEMM against the reference: under the interpreter on CPU (small shapes), on the GPU when present."""

import json
import os
import sys

import pytest
import torch
from ternary_cases import DTYPES, MODEL_SHAPES, check_backend_matches_reference, random_layer

import llmkernels
from llmkernels._backend import triton_unavailable_reason
from llmkernels.reference import ternary as ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_reason = triton_unavailable_reason(DEVICE)
pytestmark = [pytest.mark.triton_interp, pytest.mark.skipif(_reason is not None, reason=str(_reason))]

SMALL_SHAPES = [(1, 1, 1), (2, 17, 113), (7, 33, 300), (17, 70, 260)]  # the interpreter is slow


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES)
def test_triton_matches_reference(m, n, k, dtype):
    check_backend_matches_reference("triton", DEVICE, m, n, k, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64, 513])
@pytest.mark.parametrize("_, n, k", MODEL_SHAPES)
def test_triton_matches_reference_model_shapes_gpu(m, _, n, k):
    check_backend_matches_reference("triton", "cuda", m, n, k, torch.bfloat16)


@pytest.mark.parametrize("act_bits", [8, None])
def test_triton_strided_bias(act_bits):
    """A bias that is a strided slice (of a fused QKV bias) or an expanded scalar: the kernel reads bias[n] at unit
    stride, so the host makes it contiguous (it read garbage past element 0 before)."""
    w_packed, w_scale, _ = random_layer(6, 20, DEVICE)
    x = torch.randn(3, 20, device=DEVICE)
    for bias in (torch.randn(12, device=DEVICE)[::2], torch.tensor([1.5], device=DEVICE).expand(6)):
        with llmkernels.use_backend("reference"):
            expected = llmkernels.ternary_linear(x, w_packed, w_scale, bias, act_bits=act_bits)
        with llmkernels.use_backend("triton"):
            got = llmkernels.ternary_linear(x, w_packed, w_scale, bias, act_bits=act_bits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_opcheck_triton_ops():
    k, n = 130, 9
    w_packed, w_scale, bias = random_layer(n, k, DEVICE, bias_dtype=torch.float32)
    x = torch.randn(3, k, device=DEVICE)
    x_q, _ = llmkernels.ternary.quantize_activation(x)
    from llmkernels.triton import ternary  # noqa: F401  (registers the triton ops)

    # The CPU interpreter cannot launch on the functional tensors of the aot_dispatch test (it reads raw
    # storages); that check runs on the GPU only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA:
        utils += ("test_aot_dispatch_dynamic",)
    ops = torch.ops.llmkernels
    torch.library.opcheck(ops.ternary_matmul_int8_triton.default, (x_q, w_packed, k), test_utils=utils)
    torch.library.opcheck(ops.ternary_linear_a8_triton.default, (x, w_packed, w_scale, bias, k), test_utils=utils)
    torch.library.opcheck(ops.ternary_linear_w2_triton.default, (x, w_packed, w_scale, None, k), test_utils=utils)


# --- tile configs (issue 6): every tuning candidate under the interpreter, the tuned-file loader, the tuner ---

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG_SHAPES = [(5, 33, 513), (70, 19, 300)]  # ragged m, n, k tiles; K past one packed block, not a multiple of 64


def _tn():
    from llmkernels.triton import ternary

    return ternary


def _candidates():
    from bench import tune_ternary

    return [*tune_ternary.CANDIDATES, *tune_ternary.SMOKE_CANDIDATES]


def test_default_config_is_the_measured_rule():
    """The rule the H100 numbers were measured with: a change here is a change of the default."""
    tn = _tn()
    rule = {1: (16, 64, 4), 16: (16, 64, 4), 17: (64, 64, 4), 64: (64, 64, 4), 65: (128, 128, 8), 4096: (128, 128, 8)}
    for m, (block_m, block_n, warps) in rule.items():
        assert tuple(tn.default_config(m)) == (block_m, block_n, 64, warps, None, 0, 0)
    assert all(tn.valid_config(c) for c in _candidates())
    for bad in [(128, 128, 64, 8, None, 1, 0), (96, 128, 64, 8), (128, 128, 512, 8), (128, 128, 64, 3), (16, 8, 64, 4)]:
        assert not tn.valid_config(bad), bad


@pytest.mark.parametrize("cfg", _candidates(), ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("m,n,k", CONFIG_SHAPES)
def test_candidate_configs_match_reference(cfg, m, n, k):
    """Every tuning candidate: the int32 accumulator equals the reference exactly, and the a8 output equals the
    default config's bit for bit (same accumulator, same epilogue); weight-only ignores tile overrides."""
    tn = _tn()
    w_packed, w_scale, bias = random_layer(n, k, DEVICE, bias_dtype=torch.float32)
    x = torch.randn(m, k, device=DEVICE) * torch.rand(m, 1, device=DEVICE).mul(4).exp2()
    x_q, _ = ref.quantize_activation_ref(x)
    want = ref.ternary_matmul_int8_ref(x_q, w_packed, k)
    y_default = tn.ternary_linear_a8_triton(x, w_packed, w_scale, bias, k)
    with tn.config_override(cfg):
        assert tuple(tn.pick_config(tn.MODE_A8, m, n, k)) == tuple(tn.TileConfig(*cfg))
        assert tn.pick_config(tn.MODE_W2, m, n, k) == tn.default_config(m)
        got = tn.ternary_matmul_int8_triton(x_q, w_packed, k)
        y = tn.ternary_linear_a8_triton(x, w_packed, w_scale, bias, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(y, y_default)


def test_slab_unpack_of_every_code():
    """The slab unpacks on bytes holding every code in every 2-bit field (3 included, which the packer never
    writes: it must still give 2, as the reference unpack does), against the reference's unpack."""
    tn = _tn()
    n, k = 64, 512
    w_packed = torch.arange(n * k // 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, k // 4)
    x_q = torch.randint(-127, 128, (3, k), dtype=torch.int8)
    want = x_q.int() @ ref.unpack_ternary_ref(w_packed, k).int().T
    for unpack in (tn.UNPACK_SLAB, tn.UNPACK_SLAB_ASM):
        for swap in (0, 1):
            with tn.config_override((16, 32, 256, 1, 1, unpack, swap)):
                torch.testing.assert_close(tn.ternary_matmul_int8_triton(x_q, w_packed, k), want, rtol=0, atol=0)


def _tuned_doc(**changes):
    winners = {"prefill_small": [128, 128, 256, 8, 2, 2, 1], "prefill_large": [256, 128, 256, 8, 3, 2, 0]}
    doc = dict(format=1, device="NVIDIA H100 80GB HBM3", capability=[9, 0], triton="3.6.0", winners=winners)
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "changes,device,loads",
    [
        ({}, "NVIDIA H100 80GB HBM3", True),
        ({}, "NVIDIA H100 PCIe", True),  # same compute capability (the same SM)
        ({}, "NVIDIA H200", True),
        ({}, "NVIDIA A100-SXM4-80GB", False),
        ({"triton": "3.5.1"}, "NVIDIA H100 80GB HBM3", False),
        ({"format": 2}, "NVIDIA H100 80GB HBM3", False),
        ({"winners": {"prefill_small": [128, 128, 512, 8, 2, 2, 1]}}, "NVIDIA H100 80GB HBM3", False),
        ({"winners": {"decode": [16, 64, 64, 4, None, 0, 0]}}, "NVIDIA H100 80GB HBM3", False),
    ],
)
def test_load_tuned(tmp_path, changes, device, loads):
    tn = _tn()
    path = tmp_path / "tuned_ternary.json"
    path.write_text(json.dumps(_tuned_doc(**changes)))
    capability = (8, 0) if "A100" in device else (9, 0)
    winners, why = tn.load_tuned(str(path), device, capability, "3.6.2")
    if loads:
        assert winners == {"prefill_small": (128, 128, 256, 8, 2, 2, 1), "prefill_large": (256, 128, 256, 8, 3, 2, 0)}
        assert why.startswith("measured")
    else:
        assert winners is None and why.startswith("inline rule")
    path.write_text("{not json")
    assert tn.load_tuned(str(path), device, capability, "3.6.2")[0] is None
    assert tn.load_tuned(str(tmp_path / "absent.json"), device, (9, 0), "3.6.2")[0] is None


def test_shape_buckets():
    tn = _tn()
    assert tn.shape_bucket(64, 28672, 8192) is None  # decode and small batches keep the rule
    assert tn.shape_bucket(2048, 4096, 4096) == "prefill_small"
    assert tn.shape_bucket(2048, 28672, 8192) == "prefill_large"
    assert tn.shape_bucket(65, 2560, 6912) == "prefill_small"


def test_tuner_rejects_a_wrong_candidate(monkeypatch):
    """The tuner's exactness check can fail: a candidate whose output is off by one in one element is rejected
    and never wins; the others are timed and one of them wins."""
    from bench import tune_ternary as tune

    bad = (16, 32, 256, 1, 1, 1, 0)
    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [(16, 16, 64, 1, 1, 0, 1), bad])
    real = tune.run_int8

    def run_int8(inp, cfg):
        out = real(inp, cfg)
        if tuple(cfg) == bad:
            out[-1, -1] += 1
        return out

    monkeypatch.setattr(tune, "run_int8", run_int8)
    doc = tune.sweep([(70, 19, 300)], smoke=True, timer=tune.wall_ms, budget_s=600, log=lambda *_: None)
    status = {tuple(r["config"]): r["status"] for r in doc["candidates"]}
    assert status[bad] == "rejected" and status[(16, 16, 64, 1, 1, 0, 1)] == "ok", status
    assert doc["complete"] and "error" not in doc
    assert tuple(doc["winners"]["prefill_small"]) != bad
