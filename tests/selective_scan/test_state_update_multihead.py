"""selective_state_update on multi-head states (Mamba-2's decode step, mamba_ssm's 4-D layout).

state (batch, nheads, headdim, dstate); x, dt, z (batch, nheads, headdim); A (nheads, headdim, dstate); B, C
(batch, ngroups, dstate), head h reading group h // (nheads / ngroups); D, dt_bias (nheads, headdim). Expected
values come from the 3-D reference run head by head (an independent formulation of the grouping), on every
backend: the reference, the C++ CPU kernel, the CUDA C++ kernel and Triton.
"""

from __future__ import annotations

import pytest
import torch
from scan_cases import UPDATE_BACKEND_DEVICES, needs_update_kernel
from utils import assert_close_dtype

import llmkernels
from llmkernels.reference.selective_scan import selective_state_update_ref

needs_ext = needs_update_kernel
BACKEND_DEVICES = UPDATE_BACKEND_DEVICES


def _inputs(batch, nheads, headdim, dstate, ngroups, dtype, device, tied):
    """Mamba-2's step inputs; tied: A, dt and dt_bias one scalar per head, broadcast with expand() as mamba_ssm's
    Mamba2.step passes them (stride 0), D per head too."""
    act = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    if tied == "A-only":
        A = (-0.5 - torch.rand(nheads, headdim, device=device))[..., None].expand(nheads, headdim, dstate)
        dt = (0.5 * torch.rand(batch, nheads, headdim, device=device)).to(dtype)
        dt_bias = 0.5 * torch.rand(nheads, headdim, device=device) - 0.25
        D = torch.randn(nheads, headdim, device=device)
    elif tied:
        A = (-0.5 - torch.rand(nheads, device=device))[:, None, None].expand(nheads, headdim, dstate)
        dt = (0.5 * torch.rand(batch, nheads, device=device)).to(dtype)[..., None].expand(batch, nheads, headdim)
        dt_bias = (0.5 * torch.rand(nheads, device=device) - 0.25)[:, None].expand(nheads, headdim)
        D = torch.randn(nheads, device=device)[:, None].expand(nheads, headdim)
    else:
        A = -0.5 - torch.rand(nheads, headdim, dstate, device=device)
        dt = (0.5 * torch.rand(batch, nheads, headdim, device=device)).to(dtype)
        dt_bias = 0.5 * torch.rand(nheads, headdim, device=device) - 0.25
        D = torch.randn(nheads, headdim, device=device)
    return dict(
        state=torch.randn(batch, nheads, headdim, dstate, device=device),
        x=act(batch, nheads, headdim), dt=dt, A=A, B=act(batch, ngroups, dstate), C=act(batch, ngroups, dstate),
        D=D, z=act(batch, nheads, headdim), dt_bias=dt_bias, dt_softplus=True,
    )  # fmt: skip


def _per_head(kw):
    """The 3-D reference head by head: returns (y (batch, nheads, headdim), the state afterwards)."""
    state = kw["state"].clone()
    nheads, ngroups = state.shape[1], kw["B"].shape[1]
    ys = []
    for h in range(nheads):
        g = h // (nheads // ngroups)
        s = state[:, h].clone()
        ys.append(selective_state_update_ref(
            s, kw["x"][:, h], kw["dt"][:, h], kw["A"][h], kw["B"][:, g], kw["C"][:, g], kw["D"][h], kw["z"][:, h],
            kw["dt_bias"][h], kw["dt_softplus"],
        ))  # fmt: skip
        state[:, h] = s
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups,tied", [
    (2, 4, 8, 16, 1, True),
    (3, 6, 5, 17, 2, False),
    (1, 8, 64, 16, 8, True),
    (2, 3, 40, 128, 1, True),  # Mamba-2's dstate, headdim not a SIMD multiple: the per-channel A path
    (2, 4, 8, 33, 2, "A-only"),  # A constant along dstate but per (head, p); dt / D / dt_bias per channel
])  # fmt: skip
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_matches_the_reference_head_by_head(backend, device, batch, nheads, headdim, dstate, ngroups, tied):
    for dtype in (torch.float32, torch.bfloat16):
        kw = _inputs(batch, nheads, headdim, dstate, ngroups, dtype, device, tied)
        want_y, want_state = _per_head(kw)
        with llmkernels.use_backend(backend):
            y = llmkernels.selective_state_update(**kw)
        assert y.shape == (batch, nheads, headdim) and y.dtype == dtype
        assert_close_dtype(y, want_y)
        assert_close_dtype(kw["state"], want_state)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dstate", [16, 17, 128])
def test_3d_step_takes_one_A_per_channel(backend, device, dstate):
    """The 3-D op with A (dim,) equals the reference given that A spelled out as (dim, dstate), state included."""
    batch, dim = 3, 70
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(x=torch.randn(batch, dim, device=device).to(dtype),
                  dt=(0.5 * torch.rand(batch, dim, device=device)).to(dtype), A=-0.5 - torch.rand(dim, device=device),
                  B=torch.randn(batch, 2, dstate, device=device).to(dtype),
                  C=torch.randn(batch, 2, dstate, device=device).to(dtype), D=torch.randn(dim, device=device),
                  z=torch.randn(batch, dim, device=device).to(dtype), dt_bias=torch.rand(dim, device=device) - 0.5,
                  dt_softplus=True)  # fmt: skip
        state = torch.randn(batch, dim, dstate, device=device)
        want_state = state.clone()
        want_y = selective_state_update_ref(want_state, **{**kw, "A": kw["A"][:, None].expand(dim, dstate)})
        with llmkernels.use_backend(backend):
            y = llmkernels.selective_state_update(state, **kw)
        assert_close_dtype(y, want_y)
        assert_close_dtype(state, want_state)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("groups", [(1, 2), (2, 1), (2, 4)], ids=["B1-C2", "B2-C1", "B2-C4"])
def test_B_and_C_with_other_group_counts(backend, device, groups):
    """B and C grouped differently (each head reads its own group of each): every backend as the reference (the
    Triton kernel, which takes one grouping, had refused it)."""
    kw = _inputs(2, 4, 8, 16, 1, torch.float32, device, True)
    kw["B"], kw["C"] = (torch.randn(2, g, 16, device=device) for g in groups)
    state = kw["state"].clone()
    heads = []
    for h in range(4):  # head h reads group h // (4 / g) of each
        s = state[:, h]
        b, c = (kw[n][:, h // (4 // g)] for n, g in (("B", groups[0]), ("C", groups[1])))
        heads.append(selective_state_update_ref(s, kw["x"][:, h], kw["dt"][:, h], kw["A"][h], b, c, kw["D"][h],
                                                kw["z"][:, h], kw["dt_bias"][h], True))  # fmt: skip
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw)
    assert_close_dtype(y, torch.stack(heads, dim=1))
    assert_close_dtype(kw["state"], state)


def test_tied_A_reaches_the_kernels_as_one_value_per_channel(monkeypatch):
    """Mamba-2's expanded A (stride 0 along dstate) must not be copied out to (nheads * headdim, dstate)."""
    from llmkernels.ops import selective_scan as ops

    seen = []
    real = ops.update_dispatcher
    monkeypatch.setattr(ops, "update_dispatcher", lambda *a, **kw: (seen.append(a[3].shape), real(*a, **kw))[1])
    kw = _inputs(2, 4, 8, 16, 2, torch.float32, "cpu", True)
    want_y, _ = _per_head(kw)
    with llmkernels.use_backend("reference"):
        y = llmkernels.selective_state_update(**kw)
    assert seen == [(32,)]
    assert_close_dtype(y, want_y)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_with_a_pool_of_states(backend, device):
    kw = _inputs(2, 4, 8, 16, 2, torch.float32, device, True)
    pool = torch.randn(5, 4, 8, 16, device=device)
    slots = torch.tensor([3, 1], dtype=torch.int32, device=device)
    want_y, want_rows = _per_head({**kw, "state": pool[slots.long()]})
    want_pool = pool.clone()
    want_pool[slots.long()] = want_rows
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**{**kw, "state": pool}, state_batch_indices=slots)
    assert_close_dtype(y, want_y)
    assert_close_dtype(pool, want_pool)


@pytest.mark.parametrize("change,error,match", [
    (lambda kw: {"x": kw["x"][:, :3]}, ValueError, "x must have shape"),
    (lambda kw: {"A": kw["A"][0]}, ValueError, "A must have 3 dimensions"),
    (lambda kw: {"B": kw["B"][:, :, :5].repeat(1, 3, 1)}, ValueError, "B must be"),
    (lambda kw: {"D": torch.randn(4)}, ValueError, "D must have 2 dimensions"),
    (lambda kw: {"state": kw["state"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError, "contiguous"),
    (lambda kw: {"dt": None}, TypeError, "dt must be a torch.Tensor"),
])  # fmt: skip
def test_bad_input_is_named(change, error, match):
    kw = _inputs(2, 4, 8, 16, 2, torch.float32, "cpu", False)
    with pytest.raises(error, match=match):
        llmkernels.selective_state_update(**{**kw, **change(kw)})


@needs_ext
def test_torch_compile_fullgraph():
    kw = _inputs(2, 4, 8, 16, 2, torch.float32, "cpu", True)
    want_y, want_state = _per_head(kw)
    y = torch.compile(llmkernels.selective_state_update, fullgraph=True, backend="aot_eager")(**kw)
    assert_close_dtype(y, want_y)
    assert_close_dtype(kw["state"], want_state)
