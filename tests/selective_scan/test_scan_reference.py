"""The selective scan and causal conv1d references against explicit float64 loops."""

import pytest
import torch
from scan_cases import ScanCase, scan_inputs, update_inputs

from llmkernels.reference.causal_conv1d import causal_conv1d_naive, causal_conv1d_ref, causal_conv1d_update_ref
from llmkernels.reference.selective_scan import selective_scan_naive, selective_scan_ref, selective_state_update_ref

CASES = [
    ScanCase(5, dstate=3, bc="const", dim=3),
    ScanCase(6, dstate=4, bc="token", has_init=True),
    ScanCase(4, dstate=2, bc="group", has_init=True),
    ScanCase(3, dstate=3, bc="token", has_D=False, has_z=False, has_bias=False, softplus=False),
    ScanCase(1, dstate=5, bc="group", ngroups=4),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_scan_reference_matches_naive_loops(case):
    kw = scan_inputs(case, torch.float64)
    out, last = selective_scan_ref(**kw, return_last_state=True)
    naive_out, naive_last = selective_scan_naive(**kw)
    torch.testing.assert_close(out, naive_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, naive_last, rtol=1e-12, atol=1e-12)


def test_softplus_switches_to_identity_above_20():
    kw = scan_inputs(ScanCase(3, dstate=2, bc="const", dim=2, batch=1), torch.float64)
    kw["delta"] = kw["delta"] + 25.0  # softplus(x) == x here, as in torch and mamba_ssm
    torch.testing.assert_close(selective_scan_ref(**kw), selective_scan_naive(**kw)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ngroups", [None, 2])
def test_state_update_reference_is_one_scan_step(ngroups):
    kw = update_inputs(2, 4, 3, ngroups, torch.float64)
    kw["state"] = kw["state"].double()
    state0 = kw["state"].clone()
    y = selective_state_update_ref(**kw)
    B, C = (kw["B"], kw["C"]) if ngroups is None else (kw["B"], kw["C"])
    B, C = B.unsqueeze(-1), C.unsqueeze(-1)  # one token: (batch, [g,] n, 1)
    out, last = selective_scan_naive(kw["x"][..., None], kw["dt"][..., None], kw["A"], B, C, kw["D"],
                                     kw["z"][..., None], kw["dt_bias"], True, state0)
    torch.testing.assert_close(y, out[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kw["state"], last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("silu", [False, True])
def test_conv1d_reference_matches_naive_loops(width, silu):
    x, w, b = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(3, width, dtype=torch.float64), torch.randn(3)
    out = causal_conv1d_ref(x, w, b, "silu" if silu else None)
    torch.testing.assert_close(out, causal_conv1d_naive(x, w, b, silu), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [2, 4])
def test_conv1d_update_reference_steps_equal_full_conv(width):
    x, w, b = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(3, width, dtype=torch.float64), torch.randn(3)
    state = torch.zeros(2, 3, width, dtype=torch.float64)  # zeros = the causal padding before t = 0
    steps = torch.stack([causal_conv1d_update_ref(x[..., t], state, w, b, "silu") for t in range(6)], dim=-1)
    torch.testing.assert_close(steps, causal_conv1d_naive(x, w, b, True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[..., -width:])  # the last `width` inputs, oldest first
