"""selective_scan_fn and selective_state_update on the C++ backends (cpu here, cuda on a GPU) vs the reference.

Tolerances are mamba_ssm's (tests/utils.py TOLERANCES) for outputs; gradients are compared with the same
table loosened 4x (fp32) because dA, dB, dC, dD and ddelta_bias are sums over batch x seqlen (x channels)
of terms that the kernel adds in a different order than autograd of the reference.
"""

import pytest
import torch
from scan_cases import TENSOR_ARGS, ScanCase, scan_inputs, update_inputs
from utils import TOLERANCES, assert_close_dtype, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("selective_scan_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::selective_scan_fwd (extension: {_ext.load_error or 'built without it'})",
)

FWD_CASES = [
    ScanCase(1, bc="const"),
    ScanCase(17, bc="token"),
    ScanCase(17, dstate=5, bc="group", has_init=True),  # dstate not a multiple of the vector width
    ScanCase(255, bc="group", ngroups=4, has_D=False, has_bias=False),  # not a multiple of the 64-step chunk
    ScanCase(255, dstate=33, bc="const", has_z=False, softplus=False, has_init=True),
    ScanCase(130, dstate=256, bc="token", dim=2, batch=1),  # the largest dstate
    ScanCase(2048, bc="token", has_init=True),
    ScanCase(2048, dstate=32, bc="group", has_D=False, has_z=False, has_bias=False, softplus=False, dim=2),
    # Mamba-2's per-row A with per-token B / C: the CPU forward walks blocks of rows through 32-step chunks together
    ScanCase(83, dstate=128, bc="group", ngroups=2, has_init=True, batch=1, dim=38, a_per_row=True),
    ScanCase(100, dstate=64, bc="token", dim=37, a_per_row=True),
]
CUDA_ONLY_CASES = [ScanCase(4096, bc="token", has_init=True), ScanCase(4096, bc="const", dim=8)]


def _run(backend, **kw):
    with llmkernels.use_backend(backend):
        return llmkernels.selective_scan_fn(**kw, return_last_state=True)


def _check_forward(backend, case, dtype):
    kw = scan_inputs(case, dtype, "cuda" if backend == "cuda" else "cpu")
    out, last = _run(backend, **kw)
    ref_out, ref_last = selective_scan_ref(**kw, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_close_dtype(out, ref_out)  # every element compared: an unwritten (uninitialised) one cannot pass
    assert_close_dtype(last, ref_last, torch.float32 if dtype == torch.float32 else dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, case, dtype):
    _check_forward(backend, case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CUDA_ONLY_CASES, ids=str)
def test_forward_long_cuda(case, dtype):
    _check_forward("cuda", case, dtype)


MAMBA2_BLOCKS_CASE = ScanCase(83, dstate=128, bc="group", ngroups=2, has_init=True, batch=1, dim=38, a_per_row=True)
GRAD_CASES = [
    ScanCase(1, bc="const", has_init=True),
    ScanCase(17, dstate=5, bc="token", has_init=True),
    ScanCase(70, bc="group", has_init=True),
    ScanCase(255, dstate=16, bc="const", has_D=False, has_z=False, has_bias=False, softplus=False),
    ScanCase(255, dstate=20, bc="group", ngroups=4, has_init=True),
    # The CPU backward walks blocks of 16 channels chunk by chunk: more channels than a block, a group boundary inside
    # one, Mamba-2's per-head A at dstate 128, seqlen not a multiple of the 16-step chunk; and a state vector count
    # without its own specialisation (dstate 33).
    MAMBA2_BLOCKS_CASE,
    ScanCase(50, dstate=33, bc="token", has_init=True, dim=37),
]


def _check_gradients(backend, case, dtype, scale):
    device = "cuda" if backend == "cuda" else "cpu"
    kw = scan_inputs(case, dtype, device)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    out, last = _run(backend, **kw)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    grads = torch.autograd.grad([out, last], list(leaves.values()), [dout, dlast])
    # The reference in fp32 from the same (possibly 16-bit) inputs.
    ref_kw = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_leaves = {k: ref_kw[k] for k in leaves}
    ref_out, ref_last = selective_scan_ref(**ref_kw, return_last_state=True)
    ref_grads = torch.autograd.grad([ref_out, ref_last], list(ref_leaves.values()), [dout.float(), dlast])
    for name, g, rg in zip(leaves, grads, ref_grads):
        assert g is not None and g.shape == rg.shape and g.dtype == kw[name].dtype, name
        rtol, atol = TOLERANCES[dtype]
        # Relative to the gradient's own size: sums over seqlen grow with it.
        atol = atol * scale * max(1.0, rg.abs().max().item())
        torch.testing.assert_close(g.float(), rg, rtol=rtol * scale, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@needs_ext
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_autograd(backend, case):
    _check_gradients(backend, case, torch.float32, scale=4.0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_16bit(backend, dtype):
    # 16-bit gradients are rounded once more on output than the fp32 reference's: loosen 2x.
    _check_gradients(backend, ScanCase(33, bc="token", has_init=True), dtype, scale=2.0)


@needs_ext
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_last_state(backend):
    kw = scan_inputs(ScanCase(20, bc="group", has_init=True), torch.float32, "cuda" if backend == "cuda" else "cpu")
    h0 = kw["initial_state"].requires_grad_()
    _, last = _run(backend, **kw)
    (g,) = torch.autograd.grad(last.sum(), [h0])
    ref_h0 = h0.detach().clone().requires_grad_()
    _, ref_last = selective_scan_ref(**{**kw, "initial_state": ref_h0}, return_last_state=True)
    (rg,) = torch.autograd.grad(ref_last.sum(), [ref_h0])
    assert_close_dtype(g, rg)


@needs_ext
@pytest.mark.parametrize("bc", ["const", "token", "group"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_splits_at_any_point(backend, bc):
    """scan(u1 ++ u2) == scan(u2, initial_state = last state of scan(u1)), outputs and last state."""
    kw = scan_inputs(ScanCase(100, bc=bc, has_init=True), torch.float32, "cuda" if backend == "cuda" else "cpu")
    full_out, full_last = _run(backend, **kw)
    split = 37

    def part(lo, hi, init):
        p = {k: (v[..., lo:hi] if k in ("u", "delta", "z") or (k in ("B", "C") and bc != "const") else v)
             for k, v in kw.items()}
        return _run(backend, **{**p, "initial_state": init})

    out1, last1 = part(0, split, kw["initial_state"])
    out2, last2 = part(split, 100, last1)
    assert_close_dtype(torch.cat([out1, out2], dim=-1), full_out)
    assert_close_dtype(last2, full_last)


@needs_ext
@pytest.mark.parametrize("dstate", [16, 5])  # 16: the layout the CPU kernels read in place; 5: padded copies
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend, dstate):
    """Only selective_state_update's state changes: kernels that read inputs in place must never write them."""
    device = "cuda" if backend == "cuda" else "cpu"
    kw = scan_inputs(ScanCase(33, dstate=dstate, has_init=True), torch.float32, device)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    _run(backend, **kw)
    for k, v in before.items():
        torch.testing.assert_close(kw[k], v, rtol=0, atol=0, msg=f"selective_scan_fn modified {k}")
    upd = update_inputs(2, 8, dstate, None, device=device)
    before = {k: v.clone() for k, v in upd.items() if isinstance(v, torch.Tensor)}
    with llmkernels.use_backend(backend):
        llmkernels.selective_state_update(**upd)
    for k, v in before.items():
        if k != "state":
            torch.testing.assert_close(upd[k], v, rtol=0, atol=0, msg=f"selective_state_update modified {k}")
    assert not torch.equal(upd["state"], before["state"])  # updated in place


@pytest.mark.parametrize("ngroups", [None, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_update_steps_equal_scan(backend, ngroups):
    device = "cuda" if backend == "cuda" else "cpu"
    batch, dim, n, L = 2, 8, 16, 9
    steps = [update_inputs(batch, dim, n, ngroups, device=device) for _ in range(L)]
    state = steps[0]["state"].clone()
    with llmkernels.use_backend(backend):
        ys = [llmkernels.selective_state_update(**{**s, "state": state, "A": steps[0]["A"], "D": steps[0]["D"],
                                                   "dt_bias": steps[0]["dt_bias"]}) for s in steps]
    stack = lambda k: torch.stack([s[k] for s in steps], dim=-1)  # noqa: E731
    out, last = _run(backend, u=stack("x"), delta=stack("dt"), A=steps[0]["A"], B=stack("B"), C=stack("C"),
                     D=steps[0]["D"], z=stack("z"), delta_bias=steps[0]["dt_bias"], delta_softplus=True,
                     initial_state=steps[0]["state"])
    assert_close_dtype(torch.stack(ys, dim=-1), out)
    assert_close_dtype(state, last)


@needs_ext
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ngroups,dstate", [(None, 16), (2, 5), (4, 64)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_update_matches_reference(backend, ngroups, dstate, dtype, state_dtype):
    _check_state_update(backend, 3, 8, dstate, ngroups, dtype, state_dtype)


def _check_state_update(backend, batch, dim, dstate, ngroups, dtype, state_dtype, options=True):
    kw = update_inputs(batch, dim, dstate, ngroups, dtype, state_dtype, "cuda" if backend == "cuda" else "cpu")
    if not options:
        kw.update(D=None, z=None, dt_bias=None, dt_softplus=False)
    ref_state = kw["state"].clone()
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw)
    ref_y = selective_state_update_ref(**{**kw, "state": ref_state})
    assert y.dtype == dtype
    assert_close_dtype(y, ref_y)
    assert_close_dtype(kw["state"], ref_state)


# The CPU kernel's paths: channels in blocks of the vector width with a tail (dim 70), the multi-threaded split
# into 256-channel items that B/C group boundaries cut (dim 1500 in 3 or 5 groups), dstate 33 (padded to 48, a
# state vector count without its own specialisation, the state converted rather than updated in place), 16-bit
# states, and no D / z / dt_bias / softplus.
LARGE_UPDATE_CASES = [
    (2, 70, 16, None, torch.float32, torch.float32, True),
    (3, 1500, 16, 3, torch.float32, torch.float32, True),
    (3, 1500, 33, 5, torch.bfloat16, torch.float32, False),
    (5, 520, 32, 4, torch.float16, torch.bfloat16, True),
]


@needs_ext
@pytest.mark.parametrize("case", LARGE_UPDATE_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_update_larger_shapes(backend, case):
    _check_state_update(backend, *case)


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_cpu_instruction_sets(isa):
    """The AVX2 and portable builds of the row kernels (the AVX-512 one runs everywhere else here)."""
    code = (
        "import sys; sys.path[:0] = ['tests', 'tests/selective_scan'];"
        "import test_scan_ops as t, torch; from scan_cases import ScanCase;"
        "t._check_forward('cpu', ScanCase(70, dstate=20, bc='group', has_init=True), torch.float32);"
        "t._check_forward('cpu', ScanCase(17, bc='const'), torch.bfloat16);"
        "t._check_gradients('cpu', ScanCase(70, dstate=20, bc='group', has_init=True), torch.float32, 4.0);"
        "t._check_gradients('cpu', t.MAMBA2_BLOCKS_CASE, torch.float32, 4.0);"
        "t._check_softplus();"
        "[t._check_state_update('cpu', *c) for c in t.LARGE_UPDATE_CASES]"
    )
    run_with_cpu_isa(isa, code)


# ---------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, bad arguments
# ---------------------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    ScanCase(9, bc="token", has_init=True),
    ScanCase(5, dstate=3, bc="const", has_D=False, has_z=False, has_bias=False, softplus=False),
    ScanCase(7, dstate=4, bc="group"),
]


@needs_ext
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_scan(case):
    kw = scan_inputs(case)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args += [kw["delta_softplus"], kw["initial_state"]]
    fwd_args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_fwd.default, fwd_args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    dout, dlast = torch.randn_like(plain[0]), torch.randn(case.batch, case.dim, case.dstate)
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_bwd.default, [dout, dlast, *plain])
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_bwd.default, [dout, None, *plain])


@needs_ext
def test_opcheck_scan_strided_layouts():
    """Mamba-2's layout: u, z (and dout) time-strided, as channels of a (batch, L, channels) tensor. The CPU kernels
    give out, du, dz those layouts (ddelta delta's): the fake kernels must say the same strides."""
    kw = scan_inputs(ScanCase(19, bc="group", has_init=True, dim=32, a_per_row=True))
    for name in ("u", "z"):
        kw[name] = kw[name].movedim(-1, 1).contiguous().movedim(1, -1)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args += [kw["delta_softplus"], kw["initial_state"]]
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_fwd.default, args)
    dout = torch.randn_like(kw["u"])
    assert not dout.is_contiguous()
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, None, *args)
    assert grads[0].stride() == kw["u"].stride() and grads[6].stride() == kw["z"].stride()
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_bwd.default, [dout, None, *args])


@needs_ext
@pytest.mark.parametrize("ngroups", [None, 2])
def test_opcheck_state_update(ngroups):
    kw = update_inputs(2, 4, 5, ngroups)
    torch.library.opcheck(torch.ops.llmkernels.selective_state_update.default, list(kw.values()))


@needs_ext
def test_torch_compile_scan_fullgraph():
    kw = scan_inputs(ScanCase(12, bc="group", has_init=True))
    fn = torch.compile(llmkernels.selective_scan_fn, fullgraph=True, backend="aot_eager")
    leaves = [v.requires_grad_() for k, v in kw.items() if k in ("u", "initial_state")]
    out, last = fn(**kw, return_last_state=True)
    (out.sum() + last.sum()).backward()
    ref_out, ref_last = selective_scan_ref(**{k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                              for k, v in kw.items()}, return_last_state=True)
    assert_close_dtype(out, ref_out)
    assert all(leaf.grad is not None for leaf in leaves)


@needs_ext
def test_torch_compile_state_update_fullgraph():
    kw = update_inputs(2, 4, 16, 2)
    ref_state = kw["state"].clone()
    fn = torch.compile(llmkernels.selective_state_update, fullgraph=True, backend="aot_eager")
    y = fn(**kw)
    ref_y = selective_state_update_ref(**{**kw, "state": ref_state})
    assert_close_dtype(y, ref_y)
    assert_close_dtype(kw["state"], ref_state)


def _scan_kw():
    return scan_inputs(ScanCase(6, bc="token", has_init=True, dim=4, batch=2))


BAD_SCAN = [
    ("u", lambda kw: kw["u"][0], "u must have 3 dimensions"),
    ("u", lambda kw: kw["u"].double(), "u must have dtype in"),
    ("u", lambda kw: kw["u"].int(), "u must have dtype in"),
    ("delta", lambda kw: kw["delta"][..., :3], "delta must have shape"),
    ("A", lambda kw: kw["A"].half(), "A must have dtype in"),
    ("A", lambda kw: kw["A"][:2], "A must have shape"),
    ("A", lambda kw: torch.zeros(4, 300), "A must have shape .*dstate <= 256"),
    ("B", lambda kw: kw["B"][..., :3], "B must have shape"),
    ("C", lambda kw: torch.randn(2, 3, 16, 6), "C must have shape"),  # dim 4 % ngroups 3 != 0
    ("D", lambda kw: torch.randn(5), "D must have shape"),
    ("z", lambda kw: kw["z"][:1], "z must have shape"),
    ("delta_bias", lambda kw: torch.randn(4, dtype=torch.float64), "delta_bias must have dtype"),
    ("D", lambda kw: torch.randn(4, 1), "D must have 1 dimensions"),
    ("initial_state", lambda kw: kw["initial_state"][..., :2], "initial_state must have shape"),
    ("initial_state", lambda kw: kw["initial_state"].to("meta"), "initial_state must be on cpu"),
]


@pytest.mark.parametrize("name,bad,match", BAD_SCAN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SCAN)])
def test_bad_scan_arguments_are_named(name, bad, match):
    kw = _scan_kw()
    kw[name] = bad(kw)
    with pytest.raises((ValueError, TypeError), match=f"selective_scan_fn: {match}"):
        llmkernels.selective_scan_fn(**kw)


BAD_UPDATE = [
    ("state", lambda kw: kw["state"][:, :, :3], "state must have shape"),
    ("state", lambda kw: kw["state"].transpose(0, 1).contiguous().transpose(0, 1), "state must be contiguous"),
    ("x", lambda kw: kw["x"][None], "x must have 2 dimensions"),
    ("dt", lambda kw: kw["dt"][:, :2], "dt must have shape"),
    ("B", lambda kw: kw["B"][:1], "B must have shape"),
    ("dt_bias", lambda kw: torch.randn(3), "dt_bias must have shape"),
]


@pytest.mark.parametrize("name,bad,match", BAD_UPDATE, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_UPDATE)])
def test_bad_state_update_arguments_are_named(name, bad, match):
    kw = update_inputs(2, 4, 16, None)
    kw[name] = bad(kw)
    with pytest.raises((ValueError, TypeError), match=f"selective_state_update: {match}"):
        llmkernels.selective_state_update(**kw)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["u", "delta", "z", "B", "all"])
@pytest.mark.parametrize(
    "dim, ngroups, a_per_row",
    [(32, 2, False), (6, 2, False), (32, 4, True), (38, 2, True)],
    # whole 16-channel tiles, or row by row; Mamba-2's A (rows walk chunks together), a group boundary inside a tile
    ids=["tiles", "rows", "tiles-groups-Arow", "rows-Arow"],
)
def test_cpp_op_reads_strided_inputs(dim, ngroups, a_per_row, name, dtype):
    """The CPU ops read u, delta, z, B, C with any strides (Mamba-2's (batch, L, channels) layout seen as
    (batch, channels, L) included: in 16-channel tiles); the output takes u's layout, the gradients their inputs'.
    Every element compared."""
    kw = scan_inputs(ScanCase(37, bc="group", has_init=True, dim=dim, ngroups=ngroups, a_per_row=a_per_row), dtype)
    names = ("u", "delta", "z", "B", "C") if name == "all" else (name,)
    for n in names:  # same values, time-fastest storage: (batch, ..., L) seen from a (batch, L, ...) tensor
        kw[n] = kw[n].movedim(-1, 1).contiguous().movedim(1, -1)
        assert not kw[n].is_contiguous()
    ref_kw = {k: (v.float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out, ref_last = selective_scan_ref(**ref_kw, return_last_state=True)
    with torch.no_grad():
        out, last = llmkernels.selective_scan_fn(**kw, return_last_state=True)
    if name in ("u", "all"):
        assert out.stride() == kw["u"].stride()  # u's layout, no transposes
    assert_close_dtype(out, ref_out.detach())
    assert_close_dtype(last, ref_last.detach(), dtype)
    # The backward op on the strided tensors against the same op on contiguous copies.
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    tail = (kw["delta_softplus"], kw["initial_state"])
    strided = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *args, *tail)
    packed = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *(a.contiguous() for a in args), *tail)
    for g, want in zip(strided, packed):
        torch.testing.assert_close(g, want)
    # And gradients through the public function against the reference.
    leaves = {k: v.requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    out, last = llmkernels.selective_scan_fn(**kw, return_last_state=True)
    grads = torch.autograd.grad([out, last], list(leaves.values()), [dout, dlast])
    ref_grads = torch.autograd.grad([ref_out, ref_last], [ref_kw[k] for k in leaves], [dout.float(), dlast])
    rtol, atol = TOLERANCES[dtype]
    for k, g, rg in zip(leaves, grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, rtol=4 * rtol, atol=4 * atol * max(1.0, rg.abs().max().item()),
                                   msg=lambda m, k=k: f"d{k}: {m}")  # fmt: skip


def test_every_tensor_argument_is_covered():
    assert set(TENSOR_ARGS) == {k for k, v in _scan_kw().items() if isinstance(v, torch.Tensor)}



def _check_softplus():
    """delta's softplus (the kernels' own vectorised one) within 2 ulp relative, from -80 to beyond 20: one
    state-update step from a zero state with A = 0, B = C = x = 1 returns softplus(dt)."""
    x = torch.cat([torch.linspace(-80, 80, 20001), torch.tensor([-1e-3, 0.0, 1e-3, 19.99, 20.0, 20.01, 1e4])])
    n = x.numel()
    y = torch.ops.llmkernels.selective_state_update(torch.zeros(1, n, 1), torch.ones(1, n), x[None], torch.zeros(n, 1),
                                                    torch.ones(1, 1), torch.ones(1, 1), None, None, None, True)[0]
    ref = torch.nn.functional.softplus(x.double())
    err = ((y.double() - ref) / ref).abs().max().item()
    assert err < 2.4e-7, err


@needs_ext
def test_softplus_is_accurate_over_the_whole_range():
    _check_softplus()


@needs_ext
def test_bf16_channel_parameters_are_accepted():
    """A bf16 model passes its D and dt bias in bf16 (transformers does in the decode step): taken as fp32."""
    kw = update_inputs(2, 4, 16, None)
    ref_state = kw["state"].clone()
    kw16 = {**kw, "D": kw["D"].bfloat16(), "dt_bias": kw["dt_bias"].bfloat16()}
    y = llmkernels.selective_state_update(**kw16)
    ref = selective_state_update_ref(**{**kw16, "state": ref_state, "D": kw16["D"].float(),
                                        "dt_bias": kw16["dt_bias"].float()})
    assert_close_dtype(y, ref)
    skw = scan_inputs(ScanCase(9, bc="token"))
    out = llmkernels.selective_scan_fn(**{**skw, "D": skw["D"].bfloat16(), "delta_bias": skw["delta_bias"].bfloat16()})
    ref_out = selective_scan_ref(**{**skw, "D": skw["D"].bfloat16().float(),
                                    "delta_bias": skw["delta_bias"].bfloat16().float()})
    assert_close_dtype(out, ref_out)


@needs_ext
@pytest.mark.parametrize("where", ["delta", "delta_bias"])
def test_nan_delta_through_softplus_stays_nan(where):
    """softplus(NaN) is NaN (the vector softplus used to clamp it into a finite value): the scan's outputs from the
    NaN step on and its last state are NaN, as the reference's, and the steps before it are untouched."""
    kw = scan_inputs(ScanCase(40, bc="token", batch=1, dim=3))
    if where == "delta":
        kw["delta"][0, 1, 17] = float("nan")
    else:
        kw["delta_bias"][1] = float("nan")
    out, last = _run("cpu", **kw)
    ref_out, ref_last = selective_scan_ref(**kw, return_last_state=True)
    torch.testing.assert_close(out, ref_out, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert last[0, 1].isnan().all() and not out[0, 0].isnan().any()


@needs_ext
def test_state_update_nan_dt_stays_nan():
    kw = update_inputs(2, 4, 16, None)
    kw["dt"][1, 2] = float("nan")
    ref_state = kw["state"].clone()
    y = llmkernels.selective_state_update(**kw)
    ref = selective_state_update_ref(**{**kw, "state": ref_state})
    torch.testing.assert_close(y, ref, equal_nan=True)
    torch.testing.assert_close(kw["state"], ref_state, equal_nan=True)
    assert y[1, 2].isnan() and kw["state"][1, 2].isnan().all() and not kw["state"][0].isnan().any()


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_state_update_mixed_bc_layouts(backend):
    """B (batch, dstate) beside C (batch, ngroups, dstate): (batch, dstate) is one group, so the call equals the
    one with B given as (batch, 1, dstate) (the reference once failed to broadcast it, Triton named the wrong
    argument)."""
    kw = update_inputs(2, 4, 3, 2)
    kw["B"] = kw["B"][:, 0]
    grouped = {**kw, "state": kw["state"].clone(), "B": kw["B"][:, None]}
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_state_update(**kw)
        y_grouped = llmkernels.selective_state_update(**grouped)
    torch.testing.assert_close(y, y_grouped, rtol=0, atol=0)
    torch.testing.assert_close(kw["state"], grouped["state"], rtol=0, atol=0)
