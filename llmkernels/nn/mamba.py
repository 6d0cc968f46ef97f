"""MambaMixer: the Mamba (S6) block's mixer on llmkernels' causal conv1d and selective scan.

Same parameters, names and math as Hugging Face's `transformers.models.mamba.modeling_mamba.MambaMixer`, so
`mixer.load_state_dict(hf_mixer.state_dict())` works both ways:

    in_proj   (hidden -> 2 * intermediate)      x, gate = in_proj(h).chunk(2)
    conv1d    depthwise causal, width conv_kernel, then SiLU
    x_proj    (intermediate -> dt_rank + 2 * state_size)   dt, B, C per token
    dt_proj   (dt_rank -> intermediate)         delta = softplus(dt_proj(dt)), its bias inside the softplus
    A_log, D  A = -exp(A_log)
    scan      y = selective_scan(x, delta, A, B, C, D, z=gate)
    out_proj  (intermediate -> hidden)

Generation: `cache = mixer.new_cache(batch)` then `mixer(h, cache)` for the prompt and for each new token.
A call with seqlen 1 takes the decode path (causal_conv1d_update + selective_state_update); longer calls run
the full conv and scan starting from the cached states, so a prompt may also be fed in several chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..ops.selective_scan import selective_scan_fn, selective_state_update


def check_mixer_config(layer: str, hidden_act: str, conv_kernel: int, state_size: int) -> None:
    """What the kernels under a Mamba / Mamba-2 mixer take: SiLU, conv widths 2..4, dstate 1..256."""
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"{layer}: hidden_act must be 'silu' (as in Mamba), got {hidden_act!r}")
    if not 2 <= conv_kernel <= 4:
        raise ValueError(f"{layer}: conv_kernel must be 2, 3 or 4 (the causal conv kernels'), got {conv_kernel}")
    if not 1 <= state_size <= 256:
        raise ValueError(f"{layer}: state_size must be in 1..256 (the scan kernels'), got {state_size}")


@dataclass
class MambaCache:
    """One mixer's inference state.

    conv_state: (batch, intermediate_size, conv_kernel), the last conv_kernel inputs of the conv, oldest first.
    ssm_state: (batch, intermediate_size, state_size) fp32, the scan's state after the last token.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class MambaMixer(nn.Module):
    """Mamba mixer: hidden_states (batch, seqlen, hidden_size) -> (batch, seqlen, hidden_size). See the module doc."""

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        time_step_rank: int | None = None,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        hidden_act: str = "silu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_mixer_config("MambaMixer", hidden_act, conv_kernel, state_size)
        factory = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.ssm_state_size = state_size
        self.conv_kernel_size = conv_kernel
        self.intermediate_size = expand * hidden_size
        self.time_step_rank = time_step_rank or math.ceil(hidden_size / 16)
        self.activation = hidden_act
        d_in = self.intermediate_size
        self.in_proj = nn.Linear(hidden_size, 2 * d_in, bias=use_bias, **factory)
        self.conv1d = nn.Conv1d(d_in, d_in, conv_kernel, groups=d_in, padding=conv_kernel - 1, bias=use_conv_bias,
                                **factory)
        self.x_proj = nn.Linear(d_in, self.time_step_rank + 2 * state_size, bias=False, **factory)
        self.dt_proj = nn.Linear(self.time_step_rank, d_in, bias=True, **factory)
        # S4D-real initialisation A = -(1..state_size), as Mamba and Hugging Face.
        A = torch.arange(1, state_size + 1, dtype=torch.float32, device=device).expand(d_in, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(d_in, device=device))
        self.out_proj = nn.Linear(d_in, hidden_size, bias=use_bias, **factory)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> MambaMixer:
        """Build from a transformers MambaConfig (or anything with its attribute names)."""
        return cls(
            config.hidden_size, config.state_size, config.conv_kernel, config.expand, int(config.time_step_rank),
            config.use_conv_bias, config.use_bias, config.hidden_act, device=device, dtype=dtype,
        )

    def new_cache(self, batch_size: int, device=None, dtype=None) -> MambaCache:
        """Zero states for a new sequence; conv_state in `dtype` (the weights' by default), ssm_state fp32."""
        device = device or self.conv1d.weight.device  # (the conv: in_proj may be a TernaryLinear, quantize_)
        dtype = dtype or self.conv1d.weight.dtype
        d_in = self.intermediate_size
        return MambaCache(
            conv_state=torch.zeros(batch_size, d_in, self.conv_kernel_size, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, d_in, self.ssm_state_size, device=device, dtype=torch.float32),
        )

    def forward(self, hidden_states: torch.Tensor, cache: MambaCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden_states: (batch, seqlen, hidden_size). With `cache`, continues from and updates its states.
        seq_idx (batch, seqlen) ints, without a cache: packed sequences (padding-free training), each sequence mixed
        as if it stood alone."""
        if hidden_states.dim() != 3:
            raise ValueError(f"MambaMixer: hidden_states must be (batch, seqlen, hidden_size), got "
                             f"{tuple(hidden_states.shape)}")  # fmt: skip
        if seq_idx is not None and cache is not None:
            raise ValueError("MambaMixer: seq_idx (packed sequences) cannot continue a cache")
        dtype = hidden_states.dtype
        if cache is not None:
            if cache.ssm_state.shape[0] != hidden_states.shape[0]:
                raise ValueError(f"MambaMixer: cache holds {cache.ssm_state.shape[0]} rows, hidden_states has batch "
                                 f"{hidden_states.shape[0]}")  # fmt: skip
            if hidden_states.shape[1] == 0:  # nothing to add: the states stay (x[..., -0:] would take them all)
                return self.out_proj(hidden_states.new_zeros(*hidden_states.shape[:2], self.out_proj.in_features))
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (batch, intermediate, seqlen) each
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)  # (intermediate, conv_kernel)
        if cache is not None and hidden_states.shape[1] == 1:
            y = self._step(x[..., 0], gate[..., 0], A, conv_w, cache).unsqueeze(1)
        else:
            y = self._sequence(x, gate, A, conv_w, cache, seq_idx).transpose(1, 2)
        return self.out_proj(y.to(dtype))

    def _delta_B_C(self, x: torch.Tensor):
        """x: (..., intermediate) -> dt (..., intermediate) before bias and softplus, B and C (..., state_size)."""
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], -1)
        return nn.functional.linear(dt, self.dt_proj.weight), B, C

    def _sequence(self, x, gate, A, conv_w, cache: MambaCache | None, seq_idx=None) -> torch.Tensor:
        seqlen, width = x.shape[-1], self.conv_kernel_size
        if cache is None:
            x = causal_conv1d_fn(x, conv_w, self.conv1d.bias, seq_idx=seq_idx, activation=self.activation)
        else:
            # Continue the conv from the cached inputs: prepend the last width - 1 (zeros for a new sequence).
            history = torch.cat([cache.conv_state.to(x.dtype), x], dim=-1)
            cache.conv_state.copy_(history[..., -width:])
            x = causal_conv1d_fn(history[..., 1:], conv_w, self.conv1d.bias, activation=self.activation)
            x = x[..., -seqlen:]
        dt, B, C = self._delta_B_C(x.transpose(1, 2))  # (batch, seqlen, .)
        result = selective_scan_fn(
            x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=gate,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=cache is not None,
            initial_state=None if cache is None else cache.ssm_state, seq_idx=seq_idx,
        )
        if cache is None:
            return result
        out, last_state = result
        cache.ssm_state.copy_(last_state)
        return out

    def _step(self, x, gate, A, conv_w, cache: MambaCache) -> torch.Tensor:
        """One token: x, gate (batch, intermediate) -> (batch, intermediate); updates both cached states."""
        x = causal_conv1d_update(x, cache.conv_state, conv_w, self.conv1d.bias, activation=self.activation)
        dt, B, C = self._delta_B_C(x)
        return selective_state_update(
            cache.ssm_state, x, dt, A, B, C, self.D.float(), z=gate, dt_bias=self.dt_proj.bias.float(),
            dt_softplus=True,
        )
