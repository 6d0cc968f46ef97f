"""Random inputs for the selective scan and causal conv1d tests (shapes and value ranges as mamba_ssm's tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from llmkernels import _ext

# selective_state_update's backends, each with the device its tensors live on: the reference, the C++ CPU kernel,
# Triton (under the interpreter here, compiled on a GPU machine) and the CUDA C++ kernel.
needs_update_kernel = pytest.mark.skipif(
    not _ext.has_kernel("selective_state_update", "CPU"), reason="no C++ CPU kernel"
)
triton_interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
UPDATE_BACKEND_DEVICES = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=needs_update_kernel),
    pytest.param("triton", "cpu", id="triton-interp", marks=[triton_interp, pytest.mark.triton_interp]),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
]


@dataclass(frozen=True)
class ScanCase:
    seqlen: int
    dstate: int = 16
    bc: str = "token"  # "const" (dim, n) | "token" (batch, n, L) | "group" (batch, g, n, L)
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    has_init: bool = False
    batch: int = 2
    dim: int = 4
    ngroups: int = 2
    a_per_row: bool = False  # A one value per channel over dstate (Mamba-2's per-head A, flattened)

    def __str__(self) -> str:
        flags = [f for f, on in (("D", self.has_D), ("z", self.has_z), ("bias", self.has_bias),
                                 ("softplus", self.softplus), ("init", self.has_init), ("Arow", self.a_per_row)) if on]
        return f"L{self.seqlen}-n{self.dstate}-{self.bc}-d{self.dim}-{'+'.join(flags) or 'plain'}"


def scan_inputs(case: ScanCase, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Keyword arguments of selective_scan_fn (minus return_last_state): activations in `dtype`, A/D/bias fp32."""
    b, d, n, L = case.batch, case.dim, case.dstate, case.seqlen

    def act(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    if case.bc == "const":
        B, C = torch.randn(d, n, device=device).to(dtype), torch.randn(d, n, device=device).to(dtype)
    elif case.bc == "token":
        B, C = act(b, n, L), act(b, n, L)
    else:
        B, C = act(b, case.ngroups, n, L), act(b, case.ngroups, n, L)
    delta = (0.5 * torch.rand(b, d, L, device=device)).to(dtype)
    if not case.softplus:
        delta = delta.abs()
    return dict(
        u=act(b, d, L),
        delta=delta,
        A=-0.5 - torch.rand(d, 1 if case.a_per_row else n, device=device).expand(d, n),  # decays in (0, 1)
        B=B,
        C=C,
        D=torch.randn(d, device=device) if case.has_D else None,
        z=act(b, d, L) if case.has_z else None,
        delta_bias=(0.5 * torch.rand(d, device=device) - 0.25) if case.has_bias else None,
        delta_softplus=case.softplus,
        initial_state=torch.randn(b, d, n, device=device) if case.has_init else None,
    )


TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def update_inputs(batch: int, dim: int, dstate: int, ngroups: int | None, dtype=torch.float32, state_dtype=None,
                  device: str = "cpu") -> dict:
    """Keyword arguments of selective_state_update; ngroups None means B, C of shape (batch, dstate)."""
    bc_shape = (batch, dstate) if ngroups is None else (batch, ngroups, dstate)
    return dict(
        state=torch.randn(batch, dim, dstate, device=device).to(state_dtype or torch.float32),
        x=torch.randn(batch, dim, device=device).to(dtype),
        dt=(0.5 * torch.rand(batch, dim, device=device)).to(dtype),
        A=-0.5 - torch.rand(dim, dstate, device=device),
        B=torch.randn(*bc_shape, device=device).to(dtype),
        C=torch.randn(*bc_shape, device=device).to(dtype),
        D=torch.randn(dim, device=device),
        z=torch.randn(batch, dim, device=device).to(dtype),
        dt_bias=0.5 * torch.rand(dim, device=device) - 0.25,
        dt_softplus=True,
    )
