"""Every public op tests its common case with a quick `..._args_ok` predicate and runs the descriptive checks
(which raise, naming the argument) only when it says no. Here both run on a valid call and on hundreds of
variants of it (each argument swapped for a wrong type, dtype, device, rank, size or layout, or an odd valid
one), and must agree: the quick test may never accept what the checks reject (a bad input would reach the
kernels), nor turn down what they accept (the common case would lose its speed without anyone noticing).
"""

from __future__ import annotations

import math

import pytest
import torch

from llmkernels.ops import attention, causal_conv1d, layer_norm, selective_scan, sliding_window, ternary
from llmkernels.reference.ternary import padded_in_features


def _tensor_variants(t: torch.Tensor):
    """(label, replacement) pairs for one tensor argument: mostly wrong, a few valid in a different way."""
    yield "not a tensor", 3.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8):
        if dtype != t.dtype:
            yield f"dtype {dtype}", t.to(dtype)
    yield "meta device", t.to("meta")
    yield "one more dim", t.unsqueeze(0)
    if t.dim() > 0:
        yield "one dim fewer", t[..., 0]
        yield "strided last dim", torch.cat([t, t], dim=-1)[..., ::2]
        yield "offset storage", torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].view(t.shape)
    if t.dim() > 1:
        yield "transposed layout", t.transpose(-1, -2).contiguous().transpose(-1, -2)
    for i in range(t.dim()):
        for delta in (-1, 1, 2):
            if t.shape[i] + delta >= 0:
                shape = list(t.shape)
                shape[i] += delta
                yield f"dim {i} {delta:+d}", torch.randn(shape).to(t.dtype)


def _cases(args: dict, optional: tuple[str, ...] = (), scalars: dict | None = None):
    """The valid call, then one argument changed at a time."""
    yield "valid", dict(args)
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            for label, other in _tensor_variants(value):
                yield f"{name}: {label}", {**args, name: other}
            yield f"{name}: None", {**args, name: None}
    for name in optional:
        yield f"{name}: absent", {**args, name: None}
    for name, values in (scalars or {}).items():
        for value in values:
            yield f"{name}={value!r}", {**args, name: value}


def _agree(ok, check, cases) -> int:
    """Assert ok(**case) is True exactly when check(**case) raises nothing; returns how many cases passed."""
    accepted = 0
    for label, case in cases:
        try:
            check(**case)
            passes, error = True, None
        except Exception as exc:  # ZeroDivisionError etc. count: the descriptive checks raised before too
            passes, error = False, type(exc)
        try:
            quick = ok(**case)
        except Exception as exc:  # allowed only where the checks raise the very same exception
            assert type(exc) is error, f"{label}: the quick test raised {exc!r}, the checks {error}"
            continue
        assert quick is passes, f"{label}: quick test says {quick}, the checks {'pass' if passes else 'raise'}"
        accepted += passes
    return accepted


NUMBERS = (None, 0.3, 2, 0, -1.0, math.nan, True, "0.5")


def _ssm_args(batch=3, dim=6, dstate=5):
    return dict(
        x=torch.randn(batch, dim),
        dt=torch.randn(batch, dim),
        A=-torch.rand(dim, dstate),
        state=torch.randn(batch, dim, dstate),
        B=torch.randn(batch, dstate),
        C=torch.randn(batch, 3, dstate),  # ngroups = 3 divides dim
        D=torch.randn(dim),
        z=torch.randn(batch, dim),
        dt_bias=torch.randn(dim).half(),
    )


def test_selective_state_update():
    args = _ssm_args()
    cases = _cases(args, optional=("D", "z", "dt_bias"))
    extra = [
        ("B with 4 groups (does not divide dim)", {**args, "B": torch.randn(3, 4, 5)}),
        ("B with 0 groups", {**args, "B": torch.randn(3, 0, 5)}),
        ("dstate 257", {**args, "A": torch.randn(6, 257), "state": torch.randn(3, 6, 257)}),
    ]
    check = lambda **a: selective_scan.check_update_args(**a)
    assert _agree(selective_scan._update_args_ok, check, [*cases, *extra]) > 10


def test_selective_scan_fn():
    batch, dim, dstate, seqlen = 3, 6, 5, 7
    args = dict(
        u=torch.randn(batch, dim, seqlen),
        delta=torch.rand(batch, dim, seqlen),
        A=-torch.rand(dim, dstate),
        B=torch.randn(batch, dstate, seqlen),
        C=torch.randn(batch, 2, dstate, seqlen),
        D=torch.randn(dim),
        z=torch.randn(batch, dim, seqlen),
        delta_bias=torch.randn(dim),
        initial_state=torch.randn(batch, dim, dstate),
    )
    cases = _cases(args, optional=("D", "z", "delta_bias", "initial_state"))
    extra = [
        ("B (dim, dstate)", {**args, "B": torch.randn(dim, dstate)}),
        ("C with 4 groups", {**args, "C": torch.randn(batch, 4, dstate, seqlen)}),
        (
            "dstate 257",
            {
                **args,
                "A": torch.randn(dim, 257),
                "B": torch.randn(dim, 257),
                "C": torch.randn(dim, 257),
                "initial_state": None,
            },
        ),
    ]
    check = lambda **a: selective_scan.check_scan_args(**a)
    assert _agree(selective_scan._scan_args_ok, check, [*cases, *extra]) > 10


def test_causal_conv1d_update():
    args = dict(x=torch.randn(3, 6), conv_state=torch.randn(3, 6, 4), weight=torch.randn(6, 4), bias=torch.randn(6))
    cases = list(_cases(args, optional=("bias",)))
    cases.append(("width 5", {**args, "weight": torch.randn(6, 5), "conv_state": torch.randn(3, 6, 5)}))
    check = lambda **a: causal_conv1d._check_update_args("causal_conv1d_update", **a)
    assert _agree(causal_conv1d._update_args_ok, check, cases) > 10


def test_causal_conv1d_fn():
    args = dict(x=torch.randn(3, 6, 7), weight=torch.randn(6, 3), bias=torch.randn(6))

    def check(x, weight, bias):
        causal_conv1d._checks.check_tensor("causal_conv1d_fn", "x", x, ndim=3, dtypes=causal_conv1d.ACT_DTYPES)
        causal_conv1d._check_weight_bias("causal_conv1d_fn", x, weight, bias)

    ok = lambda x, weight, bias: causal_conv1d._x_weight_bias_ok(x, 3, weight, bias)
    assert _agree(ok, check, _cases(args, optional=("bias",))) > 10


def _attn_scalars():
    return dict(
        softmax_scale=NUMBERS,
        window_size=(
            (-1, -1),
            (3, 0),
            [2, 2],
            (-2, 0),
            (0, -2),
            (1.0, 0),
            (0, 1.0),
            (1,),
            (1, 2, 3),
            (True, 0),
            None,
            "ab",
        ),
        softcap=(0.0, 5, -1, None, math.nan, "1"),
    )


def test_flash_attn_func():
    args = dict(q=torch.randn(2, 5, 6, 24), k=torch.randn(2, 7, 3, 24), v=torch.randn(2, 7, 3, 24))
    scalars = dict(softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    cases = [(label, {**scalars, **case}) for label, case in _cases(args, scalars=_attn_scalars())]
    cases.append(
        ("4 KV heads for 6 heads", {**scalars, **args, "k": torch.randn(2, 7, 4, 24), "v": torch.randn(2, 7, 4, 24)})
    )
    cases.append(
        (
            "head dim 257",
            {**scalars, "q": torch.randn(1, 2, 1, 257), "k": torch.randn(1, 2, 1, 257), "v": torch.randn(1, 2, 1, 257)},
        )
    )
    check = lambda **a: attention._check_func_args("flash_attn_func", **a)
    assert _agree(attention._func_args_ok, check, cases) > 10


def test_flash_attn_with_kvcache():
    args = dict(
        q=torch.randn(2, 1, 6, 24),
        k_cache=torch.randn(2, 9, 3, 24),
        v_cache=torch.randn(2, 9, 3, 24),
        k=torch.randn(2, 1, 3, 24),
        v=torch.randn(2, 1, 3, 24),
        cache_seqlens=torch.tensor([4, 2], dtype=torch.int32),
    )
    scalars = dict(softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    cases = [(label, {**scalars, **case}) for label, case in _cases(args, optional=("k", "v"), scalars=_attn_scalars())]
    cases.append(("no new tokens", {**scalars, **args, "k": None, "v": None}))
    one_head = torch.randn(2, 1, 1, 24)  # 1 divides q's 6 heads, but the cache has 3
    cases.append(("new tokens with 1 KV head", {**scalars, **args, "k": one_head, "v": one_head.clone()}))
    cases.append(
        (
            "0 KV heads",
            {
                **scalars,
                **args,
                "k_cache": torch.randn(2, 9, 0, 24),
                "v_cache": torch.randn(2, 9, 0, 24),
                "k": None,
                "v": None,
            },
        )
    )
    # An int (or no) cache_seqlens is left to the checks: its range depends on the capacity.
    tensor_lens = [(label, case) for label, case in cases if isinstance(case["cache_seqlens"], torch.Tensor)]
    assert len(tensor_lens) == len(cases) - 2  # "cache_seqlens: not a tensor" and ": None"
    for lens in (None, 0, 8, 9, -1):
        assert not attention._kvcache_args_ok(**{**scalars, **args, "cache_seqlens": lens})
    check = lambda **a: attention._check_kvcache_args("flash_attn_with_kvcache", **a)
    assert _agree(attention._kvcache_args_ok, check, tensor_lens) > 10


def test_sliding_window_attn_with_cache():
    cache = sliding_window.RollingKVCache(2, 5, 3, 24)
    args = dict(q=torch.randn(2, 3, 6, 24), k=torch.randn(2, 3, 3, 24), v=torch.randn(2, 3, 3, 24))
    scalars = dict(softmax_scale=(None, 0.3, 0, -1.0, math.nan, "x"), softcap=(0.0, 2, -1, math.nan, None))
    cases = [
        (label, {"cache": cache, "softmax_scale": None, "softcap": 0.0, **case})
        for label, case in _cases(args, scalars=scalars)
    ]
    for label, ring in _tensor_variants(cache.k):
        other = sliding_window.RollingKVCache(2, 5, 3, 24)
        other.k = ring
        cases.append((f"cache.k: {label}", {**args, "cache": other, "softmax_scale": None, "softcap": 0.0}))
    cases.append(("not a cache", {**args, "cache": (cache.k, cache.v), "softmax_scale": None, "softcap": 0.0}))
    assert _agree(sliding_window._args_ok, sliding_window._check_args, cases) > 10


def test_ternary_linear():
    in_features, out_features = 70, 5
    args = dict(
        x=torch.randn(2, 3, in_features),
        w_packed=torch.randint(0, 255, (out_features, padded_in_features(in_features) // 4), dtype=torch.uint8),
        w_scale=torch.rand(()),
        bias=torch.randn(out_features),
    )
    cases = list(_cases(args, optional=("bias",), scalars=dict(act_bits=(None, 4, 8.0, "8"))))
    cases = [(label, {"act_bits": 8, **case}) for label, case in cases]
    cases.append(("w_scale of shape (1,)", {**args, "act_bits": 8, "w_scale": torch.rand(1)}))
    cases.append(("w_scale of 2 elements", {**args, "act_bits": 8, "w_scale": torch.rand(2)}))
    check = lambda **a: ternary._check_linear_args("ternary_linear", **a)
    assert _agree(ternary._linear_args_ok, check, cases) > 10


@pytest.mark.parametrize("bad", ["dtype", "device", "shape"])
def test_public_call_still_names_the_argument(bad):
    """End to end: a wrong B reaches the descriptive checks through the public function."""
    args = _ssm_args()
    B = {"dtype": args["B"].double(), "device": args["B"].to("meta"), "shape": torch.randn(3, 4)}[bad]
    with pytest.raises((TypeError, ValueError), match=r"selective_state_update: B must"):
        selective_scan.selective_state_update(**{**args, "B": B})


def test_layer_norm_fn():
    x, residual = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8)
    args = dict(x=x, weight=torch.randn(8), bias=torch.randn(8), residual=residual)
    eps_values = (1e-5, 0, -1.0, math.nan, math.inf, True, "0.5")
    cases = _cases(args, optional=("bias", "residual"), scalars={"eps": eps_values})
    cases = [(label, {"eps": 1e-6, **case}) for label, case in cases]
    check = lambda **a: layer_norm._check("layer_norm_fn", **a)
    assert _agree(layer_norm._args_ok, check, cases) > 10
