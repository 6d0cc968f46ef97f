"""Mamba2Mixer: the Mamba-2 (SSD) block's mixer on llmkernels' causal conv1d, mamba_chunk_scan_combined and the
multi-head selective_state_update.

Same parameters, names and math as Hugging Face's `transformers.models.mamba2.modeling_mamba2.Mamba2Mixer`, so
`mixer.load_state_dict(hf_mixer.state_dict())` works both ways:

    in_proj   (hidden -> intermediate + conv_dim + nheads)   gate, xBC, dt = split(in_proj(h))
    conv1d    depthwise causal over xBC = (x, B, C) (conv_dim = intermediate + 2 * ngroups * state_size), then SiLU
    scan      y = mamba_chunk_scan_combined(x as (nheads, head_dim), dt, A = -exp(A_log), B, C, D, dt_bias,
              dt_softplus, dt_limit = time_step_limit), B / C per group of heads
    norm      y * silu(gate), then an RMSNorm per group of intermediate / ngroups channels (weight `norm.weight`)
    out_proj  (intermediate -> hidden)

Generation: `cache = mixer.new_cache(batch)` then `mixer(h, cache)` for the prompt (in one or several chunks) and
for each new token (seqlen 1: causal_conv1d_update and the 4-D state update, mamba_ssm's Mamba2.step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..ops.mamba_chunk_scan import mamba_chunk_scan_combined
from ..ops.rmsnorm_gated import rmsnorm_fn
from ..ops.selective_scan import selective_state_update
from .mamba import check_mixer_config


@dataclass
class Mamba2Cache:
    """One mixer's inference state.

    conv_state: (batch, conv_dim, conv_kernel), the last conv_kernel inputs of the conv, oldest first.
    ssm_state: (batch, nheads, head_dim, state_size) fp32, the scan's state after the last token.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm module (mamba_ssm.ops.triton.layernorm_gated.RMSNorm): forward(x, z=None)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)  # fmt: skip


class GatedRMSNorm(RMSNormGated):
    """Mamba2Mixer's norm: RMSNormGated with the gate first (norm_before_gate=False) under transformers'
    MambaRMSNormGated's constructor and names (variance_epsilon). The weight multiplies in fp32 before the result is
    rounded to x's dtype (as mamba_ssm's kernel; transformers' rounds first: one 16-bit rounding apart)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(hidden_size, eps, group_size, norm_before_gate=False, device=device, dtype=dtype)

    @property
    def variance_epsilon(self) -> float:
        return self.eps


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: hidden_states (batch, seqlen, hidden_size) -> (batch, seqlen, hidden_size). See the module doc."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int = 64,
        state_size: int = 128,
        n_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 256,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        layer_norm_epsilon: float = 1e-5,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        hidden_act: str = "silu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_mixer_config("Mamba2Mixer", hidden_act, conv_kernel, state_size)
        if n_groups < 1 or num_heads % n_groups != 0:
            raise ValueError(f"Mamba2Mixer: n_groups ({n_groups}) must divide num_heads ({num_heads})")
        factory = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.ssm_state_size, self.n_groups, self.conv_kernel_size = state_size, n_groups, conv_kernel
        self.chunk_size, self.time_step_limit = chunk_size, tuple(time_step_limit)
        self.activation = hidden_act
        self.intermediate_size = num_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + num_heads, bias=use_bias,
                                 **factory)  # fmt: skip
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                padding=conv_kernel - 1, bias=use_conv_bias, **factory)  # fmt: skip
        # Mamba-2's initialisation: A = -(1..nheads), D = 1, dt_bias the softplus-inverse of dt in [1e-3, 0.1].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32, device=device)))
        self.D = nn.Parameter(torch.ones(num_heads, device=device))
        dt = torch.exp(torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm = GatedRMSNorm(self.intermediate_size, self.intermediate_size // n_groups, layer_norm_epsilon,
                                 **factory)  # fmt: skip
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=use_bias, **factory)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> Mamba2Mixer:
        """Build from a transformers Mamba2Config (or anything with its attribute names)."""
        if config.hidden_size * config.expand != config.num_heads * config.head_dim:
            raise ValueError("Mamba2Mixer: config.hidden_size * expand must equal num_heads * head_dim")
        return cls(
            config.hidden_size, config.num_heads, config.head_dim, config.state_size, config.n_groups,
            config.conv_kernel, config.chunk_size, tuple(config.time_step_limit), config.layer_norm_epsilon,
            config.use_conv_bias, config.use_bias, config.hidden_act, device=device, dtype=dtype,
        )  # fmt: skip

    def new_cache(self, batch_size: int, device=None, dtype=None) -> Mamba2Cache:
        """Zero states for a new sequence; conv_state in `dtype` (the weights' by default), ssm_state fp32."""
        device = device or self.conv1d.weight.device  # (the conv: in_proj may be a TernaryLinear, quantize_)
        dtype = dtype or self.conv1d.weight.dtype
        return Mamba2Cache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.conv_kernel_size, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.num_heads, self.head_dim, self.ssm_state_size, device=device,
                                  dtype=torch.float32),  # fmt: skip
        )

    def forward(self, hidden_states: torch.Tensor, cache: Mamba2Cache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden_states: (batch, seqlen, hidden_size). With `cache`, continues from and updates its states.
        seq_idx (batch, seqlen) ints, without a cache: packed sequences (padding-free training), each sequence mixed
        as if it stood alone."""
        if hidden_states.dim() != 3:
            raise ValueError(f"Mamba2Mixer: hidden_states must be (batch, seqlen, hidden_size), got "
                             f"{tuple(hidden_states.shape)}")  # fmt: skip
        if seq_idx is not None and cache is not None:
            raise ValueError("Mamba2Mixer: seq_idx (packed sequences) cannot continue a cache")
        batch, seqlen, _ = hidden_states.shape
        if cache is not None:
            if cache.ssm_state.shape[0] != batch:
                raise ValueError(f"Mamba2Mixer: cache holds {cache.ssm_state.shape[0]} rows, hidden_states has batch "
                                 f"{batch}")  # fmt: skip
            if seqlen == 0:  # nothing to add: the states stay
                return self.out_proj(hidden_states.new_zeros(batch, 0, self.intermediate_size))
        gate, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)  # (conv_dim, conv_kernel)
        if cache is not None and seqlen == 1:
            y = self._step(xBC[:, 0], dt[:, 0], A, conv_w, cache).unsqueeze(1)
        else:
            y = self._sequence(xBC, dt, A, conv_w, cache, seq_idx)
        y = self.norm(y.reshape(batch, seqlen, self.intermediate_size), gate)
        return self.out_proj(y.to(hidden_states.dtype))

    def _split_xBC(self, xBC: torch.Tensor):
        n = self.n_groups * self.ssm_state_size
        return xBC.split([self.intermediate_size, n, n], dim=-1)

    def _sequence(self, xBC, dt, A, conv_w, cache: Mamba2Cache | None, seq_idx=None) -> torch.Tensor:
        batch, seqlen = xBC.shape[:2]
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, seqlen)
        if cache is None:
            xBC = causal_conv1d_fn(xBC, conv_w, self.conv1d.bias, seq_idx=seq_idx,
                                   activation=self.activation)  # fmt: skip
        else:
            # Continue the conv from the cached inputs: prepend them (zeros for a new sequence).
            history = torch.cat([cache.conv_state.to(xBC.dtype), xBC], dim=-1)
            cache.conv_state.copy_(history[..., -self.conv_kernel_size:])
            xBC = causal_conv1d_fn(history[..., 1:], conv_w, self.conv1d.bias,
                                   activation=self.activation)[..., -seqlen:]  # fmt: skip
        x, B, C = self._split_xBC(xBC.transpose(1, 2))
        g, n = self.n_groups, self.ssm_state_size
        result = mamba_chunk_scan_combined(
            x.reshape(batch, seqlen, self.num_heads, self.head_dim), dt, A, B.reshape(batch, seqlen, g, n),
            C.reshape(batch, seqlen, g, n), self.chunk_size, D=self.D, dt_bias=self.dt_bias,
            initial_states=None if cache is None else cache.ssm_state, dt_softplus=True,
            dt_limit=self.time_step_limit, return_final_states=cache is not None, seq_idx=seq_idx,
        )  # fmt: skip
        if cache is None:
            return result
        y, last = result
        cache.ssm_state.copy_(last)
        return y

    def _step(self, xBC, dt, A, conv_w, cache: Mamba2Cache) -> torch.Tensor:
        """One token: xBC (batch, conv_dim), dt (batch, nheads) -> y (batch, nheads, head_dim); updates both states.
        The per-head A, dt, D and dt_bias go in expanded (stride 0), as mamba_ssm's Mamba2.step passes them."""
        batch = xBC.shape[0]
        h, p, n, g = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
        xBC = causal_conv1d_update(xBC.contiguous(), cache.conv_state, conv_w, self.conv1d.bias,
                                   activation=self.activation)  # fmt: skip
        x, B, C = self._split_xBC(xBC)
        dt_bias = None
        if self.time_step_limit == (0.0, math.inf):  # the clamp is a no-op after softplus: the kernel does both
            dt_bias = self.dt_bias.float()[:, None].expand(h, p)
        else:  # the limit applies after the softplus, which the kernels do not clamp: done here, as the scan does
            dt = F.softplus(dt.float() + self.dt_bias.float())
            dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
        return selective_state_update(
            cache.ssm_state, x.reshape(batch, h, p), dt[:, :, None].expand(batch, h, p),
            A[:, None, None].expand(h, p, n), B.reshape(batch, g, n), C.reshape(batch, g, n),
            self.D.float()[:, None].expand(h, p), dt_bias=dt_bias, dt_softplus=dt_bias is not None,
        )  # fmt: skip
