"""Measured Triton attention tiles: the loader in llmkernels/triton/flash_attn.py and bench/tune_triton.py.

The loader is tested with temporary JSON files (LLMKERNELS_TRITON_CONFIGS) and a faked device query: it must
use the winners only for the GPU and triton release they were measured on, and fall back to the static tables
otherwise (a corrupt file included). The sweep runs end to end under TRITON_INTERPRET=1 on a tiny shape with
its two smoke candidates and a stub timer, and its JSON must be what the loader reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    import triton

    from bench import tune_triton as tune
    from llmkernels.triton import flash_attn as fa
else:
    fa = tune = None

H100 = "NVIDIA H100 80GB HBM3"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Winners unlike every static table entry, so a test cannot pass by falling back.
WINNERS = {
    "fwd": {"128": {"full": [64, 128, 4, 2], "causal": [128, 16, 2, 5]}},
    "bwd_dkdv": {"64": {"causal": [16, 256, 16, 4]}},
    "bwd_dq": {"256": {"full": [256, 64, 1, 1]}},
}


def _doc(**changes) -> dict:
    doc = {"format": 1, "device": H100, "capability": [9, 0], "triton": triton.__version__, "date": "2026-11-24",
           "winners": WINNERS}  # fmt: skip
    doc.update(changes)
    return doc


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A fake H100 (no CUDA call is made) outside the interpreter, reading tmp_path / 'tuned.json'."""
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(fa.TUNED_CONFIGS_ENV, str(path))
    monkeypatch.setattr(fa, "_INTERPRET", False)
    device = {"name": H100, "capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: device["capability"])
    fa._tuned.cache_clear()
    yield path, device
    fa._tuned.cache_clear()


def _write(path, doc) -> None:
    path.write_text(json.dumps(doc) if isinstance(doc, dict) else doc)
    fa._tuned.cache_clear()


def _static():
    return (fa._pick(fa._FWD_CONFIGS, 128), fa._pick(fa._DKDV_CONFIGS, 64), fa._pick(fa._DQ_CONFIGS, 256))


def _chosen():
    return (fa._fwd_config(128, BF16), fa._bwd_configs(64, BF16, banded=True)[0], fa._bwd_configs(256, BF16)[1])


def test_winners_are_used_on_the_gpu_they_were_measured_on(gpu):
    path, _ = gpu
    _write(path, _doc())
    assert fa._fwd_config(128, BF16) == (64, 128, 4, 2)
    assert fa._fwd_config(128, FP16, banded=True) == (128, 16, 2, 5)  # fp16 shares bf16's tiles
    assert fa._fwd_config(65, BF16) == (64, 128, 4, 2)  # BLOCK_D 128's bucket
    assert fa._bwd_configs(32, BF16, banded=True)[0] == (16, 256, 16, 4)  # BLOCK_D 32 is in the 64 bucket
    assert fa._bwd_configs(256, FP16)[1] == (256, 64, 1, 1)
    assert fa.config_source().startswith("measured")
    # What the file does not cover keeps the static tables: other buckets, masks, fp32.
    assert fa._fwd_config(64, BF16) == fa._FWD_CONFIGS[64]
    assert fa._bwd_configs(64, BF16)[0] == fa._DKDV_CONFIGS[64]  # only the causal entry is measured
    assert fa._bwd_configs(64, BF16, banded=True)[1] == fa._DQ_CONFIGS[64]
    assert fa._fwd_config(128, FP32) == fa._FWD_CONFIGS_FP32[128]
    assert fa._bwd_configs(256, FP32) == (fa._DKDV_CONFIGS_FP32[256], fa._DQ_CONFIGS_FP32[256])


@pytest.mark.parametrize("name", ["NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA GH200 480GB"])
def test_gpus_of_the_same_capability_share_a_file(gpu, name):
    path, device = gpu
    _write(path, _doc())
    device["name"] = name
    assert _chosen() == ((64, 128, 4, 2), (16, 256, 16, 4), (256, 64, 1, 1))


def test_rocm_gpus_match_by_name_only(gpu, monkeypatch):
    """ROCm reports gfx90a as capability (9, 0): an H100 file must not reach an MI250."""
    path, device = gpu
    _write(path, _doc())
    device["name"] = "AMD Instinct MI250X"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert _chosen() == _static()


@pytest.mark.parametrize(
    "name, capability",
    [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA L40S", (8, 9)), ("NVIDIA B200", (10, 0))],
)
def test_other_gpus_keep_the_static_tables(gpu, name, capability):
    path, device = gpu
    _write(path, _doc())
    device.update(name=name, capability=capability)
    assert _chosen() == _static()
    assert "measured on NVIDIA H100" in fa.config_source()


def test_other_triton_release_keeps_the_static_tables(gpu):
    path, _ = gpu
    major, minor = map(int, triton.__version__.split(".")[:2])
    _write(path, _doc(triton=f"{major}.{minor + 1}.0"))
    assert _chosen() == _static()
    assert "triton" in fa.config_source()
    _write(path, _doc(triton=f"{major}.{minor}.99"))  # a patch release keeps the measured tiles
    assert _chosen() == ((64, 128, 4, 2), (16, 256, 16, 4), (256, 64, 1, 1))


@pytest.mark.parametrize(
    "content",
    [
        "",
        '{"format": 1, "device": ',  # truncated
        "[1, 2]",
        _doc(format=2),
        {k: v for k, v in _doc().items() if k != "capability"} | {"device": "NVIDIA H100 PCIe"},
        _doc(winners={"fwd": {"128": {"full": [64, 48, 4, 2]}}}),  # 48: not a power of two
        _doc(winners={"fwd": {"128": {"full": [64, 8, 4, 2]}}}),  # 8 < 16: no tl.dot
        _doc(winners={"fwd": {"128": {"full": [64, 64, 4]}}}),
        _doc(winners={"fwd": {"128": {"full": [64, 64, 3, 2]}}}),  # 3 warps
        _doc(winners={"fwd": {"128": {"full": [64.0, 64, 4, 2]}}}),
        _doc(winners={"fwd": {"96": {"full": [64, 64, 4, 2]}}}),  # no such bucket
        _doc(winners={"fwd": {"128": {"sliding": [64, 64, 4, 2]}}}),
        _doc(winners={"fwd": [64, 64, 4, 2]}),
        _doc(winners={"fwd": {"128": {"full": [64, 64, 4, 2, 3]}}}),  # no variant 3
        _doc(winners={"fwd": {"128": {"full": [64, 64, 4, 2, 1, 0]}}}),
        _doc(winners={"bwd_dq": {"256": {"full": [64, 64, 4, 2, 1]}}}),  # variants are the forward's only
        _doc(winners={"fwd": {"128": {"full_long": [64, 64, 4, 2]}}}),
    ],
    ids=lambda c: str(c)[:40],
)
def test_corrupt_file_keeps_the_static_tables(gpu, content):
    path, _ = gpu
    _write(path, content)
    assert _chosen() == _static()
    assert fa.config_source().startswith("static tables")


def test_missing_file_keeps_the_static_tables(gpu):
    path, _ = gpu
    fa._tuned.cache_clear()
    assert not path.exists()
    assert _chosen() == _static()
    assert "no " in fa.config_source()


def test_file_is_read_once(gpu):
    path, _ = gpu
    _write(path, _doc())
    assert fa._fwd_config(128, BF16) == (64, 128, 4, 2)
    path.write_text("not json")  # no re-read: the tiles stay those of the first read
    assert fa._fwd_config(128, BF16) == (64, 128, 4, 2)
    fa._tuned.cache_clear()
    assert fa._fwd_config(128, BF16) == fa._FWD_CONFIGS[128]


def test_interpreter_ignores_the_file(gpu, monkeypatch):
    path, _ = gpu
    _write(path, _doc())
    monkeypatch.setattr(fa, "_INTERPRET", True)
    fa._tuned.cache_clear()
    assert fa._fwd_config(128, BF16) == fa._INTERPRET_CONFIG
    assert fa._bwd_configs(64, BF16, banded=True) == (fa._INTERPRET_CONFIG, fa._INTERPRET_CONFIG)
    assert "TRITON_INTERPRET" in fa.config_source()


def test_config_override_wins_and_is_undone(gpu):
    path, _ = gpu
    _write(path, _doc())
    with fa.config_override(fwd=(32, 32, 4, 1), bwd_dq=(16, 32, 2, 3)):
        assert fa._fwd_config(128, FP32) == (32, 32, 4, 1)
        assert fa._bwd_configs(64, BF16, banded=True) == ((16, 256, 16, 4), (16, 32, 2, 3))
        with fa.config_override(fwd=(64, 64, 4, 2)):
            assert fa._fwd_config(128, BF16) == (64, 64, 4, 2)
        assert fa._fwd_config(128, BF16) == (32, 32, 4, 1)
    assert fa._fwd_config(128, BF16) == (64, 128, 4, 2)
    with pytest.raises(ValueError, match="unknown kernels"):
        with fa.config_override(bwd=(16, 16, 1, 1)):
            pass


def test_gpu_candidates_are_valid_tiles(monkeypatch):
    monkeypatch.setattr(fa, "_INTERPRET", False)  # the GPU lists, defaults from the static tables
    total, binaries = 0, set()
    for case in tune.gpu_cases():
        for kernel in case.kernels(tune.KERNELS):
            cands = tune.candidate_list(kernel, case, smoke=False)
            assert cands[0] == tune.default_config(kernel, case.headdim) and len(set(cands)) == len(cands) >= 4
            # a winner the loader would refuse: none
            assert all(fa._valid_config(list(c), kernel) for c in cands), cands
            total += len(cands)
            binaries |= {(kernel, tune.bucket(case.headdim), case.causal, c) for c in cands}
    # ~2 s of compile per binary (12 workers), ~0.2-0.5 s of timing per candidate: the sweep must fit in a few
    # minutes. The short cases (seqlen 1k) reuse the long ones' binaries (same argument specialisation).
    assert len(binaries) <= 190 and total <= 250


def test_gpu_cases_tune_short_sequences_and_the_window_separately():
    cases = tune.gpu_cases()
    short = [c for c in cases if c.short]
    assert [c.mask for c in short] == ["full_short", "causal_short"] and all(c.seqlen <= fa.SHORT_SEQLEN for c in short)
    window = [c for c in cases if c.mask == "window"]
    assert len(window) == 1 and window[0].seqlen > fa.SHORT_SEQLEN and window[0].kernels(tune.KERNELS) == ("fwd",)
    decode = [c for c in cases if c.decode]
    assert (
        len(decode) == 1
        and decode[0].kernels(tune.KERNELS) == ("decode",)
        and decode[0].batch * decode[0].seqlen >= 2**18
    )
    attention = ("fwd", "bwd_dkdv", "bwd_dq")
    assert all(c.kernels(tune.KERNELS) == attention for c in cases if c.mask != "window" and not c.decode)
    assert cases[-len(short) :] == short  # a budget cut drops them first
    assert {c[4] for c in tune.CANDIDATES["fwd"][128] if len(c) == 5} == {1, 2}  # both TMA variants are timed
    for bucket in (64, 128, 256):  # the atomic-dq backward (TMA reduce) is timed at every head dim
        assert any(len(c) == 5 and c[4] == 2 for c in tune.CANDIDATES["bwd_dkdv"][bucket])


def test_tma_variant_and_short_winners_are_used(gpu):
    path, _ = gpu
    winners = {
        "fwd": {"128": {"full": [128, 64, 8, 3, 1], "full_short": [64, 64, 4, 3], "causal_short": [128, 128, 8, 2, 1]}}
    }
    _write(path, _doc(winners=winners))
    assert fa._fwd_config(128, BF16) == (128, 64, 8, 3, 1)  # no seqlen: the long-sequence winner
    assert fa._fwd_config(128, BF16, seqlen=4096) == (128, 64, 8, 3, 1)
    assert fa._fwd_config(128, BF16, seqlen=fa.SHORT_SEQLEN + 1) == (128, 64, 8, 3, 1)
    assert fa._fwd_config(128, BF16, seqlen=fa.SHORT_SEQLEN) == (64, 64, 4, 3)
    assert fa._fwd_config(128, FP16, seqlen=1024) == (64, 64, 4, 3)
    assert fa._fwd_config(128, BF16, banded=True, seqlen=1024) == (128, 128, 8, 2, 1)
    # No long causal winner: the static table's, also for short sequences when no short winner exists.
    assert fa._fwd_config(128, BF16, banded=True, seqlen=4096) == fa._FWD_CONFIGS[128]
    assert fa._fwd_config(64, BF16, seqlen=1024) == fa._FWD_CONFIGS[64]
    assert fa._fwd_config(128, FP32, seqlen=1024) == fa._FWD_CONFIGS_FP32[128]


def test_decode_winner_is_used_for_fp16_bf16_only(gpu):
    path, _ = gpu
    _write(path, _doc(winners={"decode": {"128": {"full": [16, 128, 4, 3]}}}))
    assert fa._decode_config(128, BF16) == (16, 128, 4, 3)
    assert fa._decode_config(100, FP16) == (16, 128, 4, 3)  # BLOCK_D 128's bucket
    assert fa._decode_config(128, FP32) == fa._DECODE_CONFIGS[128]
    assert fa._decode_config(64, BF16) == fa._DECODE_CONFIGS[64]
    with fa.config_override(decode=(16, 32, 2, 2)):
        assert fa._decode_config(128, BF16) == (16, 32, 2, 2)


def test_window_winner_is_used_for_long_windowed_sequences(gpu):
    path, _ = gpu
    winners = {"fwd": {"128": {"causal": [64, 64, 4, 3], "causal_short": [128, 64, 8, 3], "window": [128, 128, 8, 2]}}}
    _write(path, _doc(winners=winners))
    assert fa._fwd_config(128, BF16, banded=True, seqlen=16384, windowed=True) == (128, 128, 8, 2)
    assert fa._fwd_config(128, BF16, banded=True, windowed=True) == (128, 128, 8, 2)  # no seqlen: long
    assert fa._fwd_config(128, BF16, banded=True, seqlen=16384) == (64, 64, 4, 3)  # causal without a left bound
    assert fa._fwd_config(128, BF16, banded=True, seqlen=1024, windowed=True) == (128, 64, 8, 3)  # short first
    assert fa._fwd_config(64, BF16, banded=True, seqlen=16384, windowed=True) == fa._FWD_CONFIGS[64]  # no winner


def test_atomic_dq_and_short_backward_winners_are_used(gpu):
    path, _ = gpu
    winners = {"bwd_dkdv": {"128": {"causal": [32, 64, 4, 2], "causal_short": [64, 64, 4, 2, 1]}},
               "bwd_dq": {"128": {"causal_short": [64, 32, 4, 3]}}}  # fmt: skip
    _write(path, _doc(winners=winners))
    assert fa._bwd_configs(128, BF16, banded=True) == ((32, 64, 4, 2), fa._DQ_CONFIGS[128])
    assert fa._bwd_configs(128, BF16, banded=True, seqlen=1024) == ((64, 64, 4, 2, 1), (64, 32, 4, 3))
    assert fa._bwd_configs(128, BF16, banded=True, seqlen=4096)[0] == (32, 64, 4, 2)
    assert fa._dq_atomic((64, 64, 4, 2, 1), deterministic=False)
    assert not fa._dq_atomic((64, 64, 4, 2, 1), deterministic=True)
    assert not fa._dq_atomic((64, 64, 4, 2), deterministic=False)
    assert fa._dq_atomic((64, 64, 4, 2, 2), deterministic=False) == 2
    assert not fa._valid_config([64, 64, 4, 2, 3], "bwd_dkdv") and not fa._valid_config([64, 64, 4, 2, 1], "bwd_dq")


def test_committed_file_loads_with_its_meaning():
    """The committed tuned_configs.json (4-field configs, full / causal) reads back as it was written."""
    path = os.path.join(ROOT, "llmkernels", "triton", "tuned_configs.json")
    with open(path) as f:
        doc = json.load(f)
    winners, source = fa.load_tuned(path, doc["device"], tuple(doc["capability"]), doc["triton"])
    assert source.startswith("measured"), source
    expect = {
        k: {int(b): {m: tuple(c) for m, c in by.items()} for b, by in bs.items()} for k, bs in doc["winners"].items()
    }
    assert winners == expect and winners["fwd"][128]["full"]


def test_mismatch_tolerates_rounding_only():
    ref = {"out": torch.randn(3, 37, 5), "lse": torch.randn(3, 5) * 4}
    ref["lse"][1, 2] = float("-inf")  # a row that sees no key
    same = {k: v.clone() for k, v in ref.items()}
    assert tune.mismatch(same, ref) is None
    ulp = {k: v * (1 + 2**-9 * torch.randn_like(v).sign()) for k, v in ref.items()}
    assert tune.mismatch(ulp, ref) is None
    bumped = {k: v.clone() for k, v in ref.items()}
    bumped["out"][2, 36] += 0.1 * ref["out"].abs().max()  # one row of one tile
    assert "out: max |diff|" in tune.mismatch(bumped, ref)
    nan = {k: v.clone() for k, v in ref.items()}
    nan["out"][0, 0, 0] = float("nan")
    assert "non-finite" in tune.mismatch(nan, ref)
    finite = {k: v.clone() for k, v in ref.items()}
    finite["lse"][1, 2] = 0.0
    assert "non-finite" in tune.mismatch(finite, ref)


def _stub_timer():
    """Runs fn once and reports ever shorter times: the last candidate of each group wins."""
    calls = []

    def timer(fn):
        fn()
        calls.append(None)
        return 10.0 - len(calls) * 0.01

    return timer, calls


smoke = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke sweep runs the interpreter (CPU tensors)"
)


@smoke
def test_smoke_sweep_end_to_end(tmp_path):
    timer, calls = _stub_timer()
    doc = tune.sweep(tune.smoke_cases(), smoke=True, timer=timer, budget_s=600, jobs=0, log=lambda s: None)
    assert "error" not in doc and doc["complete"] and doc["device"].startswith("cpu")
    assert len(doc["candidates"]) == 12 and len(calls) == 12  # 3 kernels x 2 masks x 2 candidates, all timed
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in doc["candidates"])
    winner = list(tune.SMOKE_CANDIDATES[1])
    attention = ("fwd", "bwd_dkdv", "bwd_dq")  # the smoke cases are not decode cases
    assert doc["winners"] == {k: {"64": {"full": winner, "causal": winner}} for k in attention}
    assert all(r["default"] == list(fa._INTERPRET_CONFIG) and r["speedup"] > 1 for r in doc["summary"])
    # The file the GPU session commits is the one the loader reads.
    out = tmp_path / "tuned.json"
    tune.write(doc, str(out))
    winners, source = fa.load_tuned(str(out), doc["device"], (0, 0), triton.__version__)
    assert source.startswith("measured") and winners["bwd_dq"][64]["causal"] == tuple(winner)


@smoke
def test_smoke_sweep_rejects_wrong_and_failing_candidates(monkeypatch):
    runners = dict(tune.RUNNERS)
    bad = tuple(tune.SMOKE_CANDIDATES[1])

    def wrong_fwd(inp, cfg, d):  # a kernel bug that shows only with this tile: one row off by 10%
        got = runners["fwd"](inp, cfg, d)
        if tuple(cfg) == bad:
            got["out"][0, -1] += 0.1 * got["out"].abs().max()
        return got

    monkeypatch.setitem(tune.RUNNERS, "fwd", wrong_fwd)
    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [*tune.SMOKE_CANDIDATES, (16, 24, 1, 1)])  # no tl.arange(24)
    timer, _ = _stub_timer()
    doc = tune.sweep(tune.smoke_cases()[:1], smoke=True, timer=timer, kernels=("fwd",), log=lambda s: None)
    status = {tuple(r["config"]): r for r in doc["candidates"]}
    assert status[bad]["status"] == "rejected" and "out: max |diff|" in status[bad]["error"]
    assert status[(16, 24, 1, 1)]["status"] == "failed" and status[(16, 24, 1, 1)]["error"]
    assert doc["winners"] == {"fwd": {"64": {"full": list(fa._INTERPRET_CONFIG)}}}


@smoke
def test_budget_stops_early_and_still_writes(tmp_path):
    doc = tune.sweep(tune.smoke_cases(), smoke=True, timer=_stub_timer()[0], budget_s=0.0, log=lambda s: None)
    assert not doc["complete"] and doc["winners"] == {} and "error" not in doc
    out = tmp_path / "partial.json"
    tune.write(doc, str(out))
    assert fa.load_tuned(str(out), doc["device"], (0, 0), triton.__version__)[0] == {}


@smoke
@pytest.mark.slow
def test_smoke_command_line_with_precompile_workers(tmp_path):
    out = tmp_path / "cli.json"
    script = os.path.join(ROOT, "bench", "tune_triton.py")
    cmd = [sys.executable, script, "--smoke", "--kernels", "fwd", "--jobs", "2", "--out", str(out)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert doc["smoke"] and doc["complete"] and set(doc["winners"]) == {"fwd"}
    assert doc["precompile"].startswith("4/4 launches in 2 workers"), doc["precompile"]  # 2 masks x 2 candidates
    assert "wrote" in res.stdout


def _spy_launches(monkeypatch) -> list[str]:
    """Names of the kernels flash_attn.py launches from now on (in order)."""
    launched = []
    real = fa.launch
    monkeypatch.setattr(
        fa, "launch", lambda kernel, *a, **kw: launched.append(kernel.fn.__name__) or real(kernel, *a, **kw)
    )
    return launched


@smoke
def test_smoke_sweep_times_the_tma_variant_and_a_short_case(tmp_path, monkeypatch):
    tma = (*fa._INTERPRET_CONFIG, 1)
    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [fa._INTERPRET_CONFIG, tma])
    # Head dim 32 (a power of two, so the TMA kernel runs rather than its fallback), batch 2, GQA.
    cases = [tune.Case(32, False, batch=2, seqlen=40, nheads=2, dtype="float16", short=True)]
    launched = _spy_launches(monkeypatch)
    doc = tune.sweep(cases, smoke=True, timer=_stub_timer()[0], budget_s=600, log=lambda s: None, kernels=("fwd",))
    assert "error" not in doc and [r["kernel"] for r in doc["candidates"]] == ["fwd", "fwd"]
    assert all(r["status"] == "ok" for r in doc["candidates"]), doc["candidates"]  # agrees with the default
    assert "flash_attn_fwd_tma_kernel" in launched
    assert doc["winners"] == {"fwd": {"64": {"full_short": list(tma)}}}
    out = tmp_path / "tuned.json"
    tune.write(doc, str(out))
    assert fa.load_tuned(str(out), doc["device"], (0, 0), triton.__version__)[0] == {"fwd": {64: {"full_short": tma}}}


@smoke
def test_smoke_sweep_times_the_atomic_dq_backward(monkeypatch):
    """A dK/dV candidate with the atomic-dq field runs without the dQ kernel, is checked on dq as well, and wins
    as a short-sequence backward tile (the stub timer favours the last candidate)."""
    atomic = (*fa._INTERPRET_CONFIG, 1)
    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [fa._INTERPRET_CONFIG, atomic])
    cases = [tune.Case(40, True, batch=2, seqlen=40, nheads=2, dtype="float16", short=True)]
    launched = _spy_launches(monkeypatch)
    doc = tune.sweep(cases, smoke=True, timer=_stub_timer()[0], budget_s=600, log=lambda s: None,
                     kernels=("bwd_dkdv",))  # fmt: skip
    assert "error" not in doc and all(r["status"] == "ok" for r in doc["candidates"]), doc["candidates"]
    # default (dK/dV + dQ kernels) once to check and once timed, then the atomic one (dK/dV only) twice
    assert launched.count("flash_attn_bwd_dq_kernel") == launched.count("flash_attn_bwd_dkdv_kernel") - 2
    assert doc["winners"] == {"bwd_dkdv": {"64": {"causal_short": list(atomic)}}}

    # A wrong dq from the atomic candidate is rejected, not timed.
    real_bwd = tune._bwd

    def broken(inp, dkdv_cfg, dq_cfg):
        dq, dk, dv = real_bwd(inp, dkdv_cfg, dq_cfg)
        return (dq * 1.5 if len(dkdv_cfg) == 5 else dq), dk, dv

    monkeypatch.setattr(tune, "_bwd", broken)
    doc = tune.sweep(cases, smoke=True, timer=_stub_timer()[0], budget_s=600, log=lambda s: None,
                     kernels=("bwd_dkdv",))  # fmt: skip
    assert [r["status"] for r in doc["candidates"]] == ["ok", "rejected"] and "dq" in doc["candidates"][1]["error"]


@smoke
def test_window_case_sweeps_with_its_window(monkeypatch):
    """The window case's inputs carry window_left = window - 1 and GQA heads (what flash_attn_func gives the
    kernel for Mistral's prefill, so the tiles it times are the ones that shape selects), and its winner is stored
    as "window"."""
    small = dict(headdim=32, seqlen=40, nheads=4, nheads_k=1, window=9, dtype="float16")
    case = tune.Case(**{**tune.WINDOW_CASE, **small})
    inp = tune.make_inputs(case, "cpu")
    assert inp["window_left"] == 8 and inp["window_right"] == 0 and inp["k"].shape[2] == 1 and inp["q"].shape[2] == 4
    assert case.fwd_flops() == 4.0 * 4 * (40 * 9 - 36) * 32
    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [fa._INTERPRET_CONFIG, (32, 16, 1, 1)])
    left_bounds = []
    real = fa.launch
    monkeypatch.setattr(fa, "launch", lambda k, *a, **kw: left_bounds.append(kw.get("HAS_WL")) or real(k, *a, **kw))
    doc = tune.sweep([case], smoke=True, timer=_stub_timer()[0], budget_s=600, log=lambda s: None)
    assert left_bounds and all(left_bounds), "the window's left bound must reach the kernel"
    assert [(r["kernel"], r["status"]) for r in doc["candidates"]] == [("fwd", "ok")] * 2, doc["candidates"]
    assert doc["winners"] == {"fwd": {"64": {"window": [32, 16, 1, 1]}}}


@smoke
def test_decode_case_sweeps_the_decode_kernel(monkeypatch):
    """The decode case times flash_attn_with_kvcache's split kernel with each candidate's tiles (checked against
    the default's output) and stores the winner as "decode"; _decode_config then returns it."""
    small = dict(headdim=32, batch=3, seqlen=40, nheads=4, nheads_k=2, dtype="float16")
    case = tune.Case(**{**tune.DECODE_CASE, **small})
    from llmkernels.triton import flash_attn_decode

    monkeypatch.setattr(tune, "SMOKE_CANDIDATES", [fa._INTERPRET_CONFIG, (16, 32, 1, 1)])
    block_n = []
    real = flash_attn_decode.launch
    monkeypatch.setattr(flash_attn_decode, "launch", lambda k, *a, **kw: block_n.append(kw.get("BLOCK_N")) or real(
        k, *a, **kw))  # fmt: skip
    doc = tune.sweep([case], smoke=True, timer=_stub_timer()[0], budget_s=600, log=lambda s: None)
    assert 32 in block_n and 16 in block_n, "each candidate's key tile must reach the split kernel"
    assert [(r["kernel"], r["status"]) for r in doc["candidates"]] == [("decode", "ok")] * 2, doc["candidates"]
    assert doc["winners"] == {"decode": {"64": {"full": [16, 32, 1, 1]}}}
