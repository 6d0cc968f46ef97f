"""The README's layer examples (its "Layers" section) run as written, on the CPU, with small inputs defined here for
the names they take as given: the documentation cannot drift from the API unnoticed."""

import os
import re

import pytest
import torch

import llmkernels

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _layer_blocks() -> list[str]:
    text = open(README, encoding="utf-8").read()
    start = text.index("### Layers (`llmkernels.nn`)")
    end = text.index("\n### ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


# Inputs each example takes as given, keyed by the layer it shows; small so that the CPU kernels run it in moments.
PRELUDES = {
    "MultiheadFlashAttention": "x = torch.randn(2, 9, 2048); x_next = torch.randn(2, 1, 2048)",
    "SlidingWindowAttention": "x = torch.randn(1, 6, 4096); chunks = [torch.randn(1, n, 4096) for n in (3, 1, 1)]",
    "BitLinear": "model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))",
    "MambaMixer": "h = torch.randn(2, 7, 768); h_step = torch.randn(2, 1, 768); x = torch.randn(2, 3, 1536); "
    "z = torch.randn(2, 3, 1536); mixer_out = torch.randn(2, 7, 768).bfloat16(); norm_weight = torch.ones(768); "
    "residual = torch.randn(2, 7, 768)",
}


def test_the_readme_has_one_example_per_prelude():
    blocks = _layer_blocks()
    assert len(blocks) == len(PRELUDES)
    for name in PRELUDES:
        assert sum(f"import {name}" in b for b in blocks) == 1, name


@pytest.mark.parametrize("name", list(PRELUDES))
def test_readme_layer_example_runs(name):
    (block,) = [b for b in _layer_blocks() if f"import {name}" in b]
    scope = {"torch": torch, "llmkernels": llmkernels}
    torch.manual_seed(0)
    with torch.no_grad():
        exec(PRELUDES[name], scope)
        exec(block, scope)
    outputs = [scope[k] for k in ("y", "y_next", "y_step", "infer") if k in scope]
    assert outputs
    for out in outputs:
        if isinstance(out, torch.Tensor):
            assert torch.isfinite(out).all()
