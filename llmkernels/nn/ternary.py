"""BitNet b1.58 layers: BitLinear (training, latent fp weights) and TernaryLinear (inference, packed weights).

BitLinear quantises W (per-tensor absmean, ternary) and x (per-token absmax, int8 when act_bits=8) in its
forward pass with the straight-through estimator, x + (q(x) - x).detach(): the forward sees the quantised
values, the backward treats quantisation as the identity, so the latent weights train. `.to_ternary()`
gives the TernaryLinear that computes the same function with llmkernels.ternary_linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.ternary import ternary_linear
from ..reference.ternary import ACT_EPS, WEIGHT_EPS, packed_shape, unpack_ternary_ref
from ..ternary import quantize_weight


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """W_t * gamma in fp32 (the dequantised ternary weight)."""
    wf = w.float()
    gamma = wf.abs().mean().clamp_min(WEIGHT_EPS)
    return torch.round(wf / gamma).clamp(-1, 1) * gamma


def _fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """x_q * s / 127 in fp32, per token, with x_q computed exactly as the kernels do."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS)
    return torch.round(xf * 127.0 / s).clamp(-128, 127) * (s / 127.0)


class BitLinear(torch.nn.Linear):
    """Training layer: y = q_a(x) @ q_w(W)^T (+ bias), quantisation with the straight-through estimator.

    x: (..., in_features) -> (..., out_features). act_bits=8 quantises activations (BitNet b1.58); None keeps
    them in full precision (weight-only).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, act_bits: int | None = 8, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if act_bits not in (8, None):
            raise ValueError(f"llmkernels.nn.BitLinear: act_bits must be 8 or None, got {act_bits!r}")
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_q = w + (_fake_quant_weight(w).to(w.dtype) - w).detach()
        if self.act_bits == 8:
            x = x + (_fake_quant_activation(x).to(x.dtype) - x).detach()
        return F.linear(x, w_q.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_ternary(self) -> TernaryLinear:
        """The inference layer with this layer's quantised weights (packed) and bias."""
        return TernaryLinear.from_linear(self, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}"


def _recorded(state) -> tuple[int, int | None]:
    """(in_features, act_bits) from a TernaryLinear's extra state (act_bits None is stored as 0)."""
    in_features, act_bits = (int(v) for v in torch.as_tensor(state).tolist())
    return in_features, None if act_bits == 0 else act_bits


class TernaryLinear(torch.nn.Module):
    """Inference layer: y = ternary_linear(x, w_packed, w_scale, bias, act_bits), x: (..., in_features).

    Buffers (in the state_dict): w_packed uint8 (out_features, K_pad // 4), 2 bits a weight; w_scale fp32 ();
    bias (out_features,) or None.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, act_bits: int | None = 8, device=None, dtype=None
    ):
        super().__init__()
        if act_bits not in (8, None):
            raise ValueError(f"llmkernels.nn.TernaryLinear: act_bits must be 8 or None, got {act_bits!r}")
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        # The activations' dtype as far as this layer knows (its weights are packed, not float): the dtype it was
        # built in or quantised from, then whatever .to() / .half() / ... cast the model to. Caches of the layers
        # around it (the attention modules' new_cache) take it.
        self.activation_dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "w_packed", torch.ones(packed_shape(out_features, in_features), dtype=torch.uint8, device=device).mul_(0x55)
        )  # code 1 everywhere: W_t = 0
        self.register_buffer("w_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, act_bits: int | None = 8) -> TernaryLinear:
        """Quantise an nn.Linear (or BitLinear) weight to ternary; bias is kept in its dtype."""
        w = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            act_bits=act_bits,
            device=w.device,
            dtype=None if linear.bias is None else linear.bias.dtype,
        )
        w_packed, w_scale = quantize_weight(w if w.dtype != torch.float64 else w.float())
        layer.activation_dtype = w.dtype
        layer.w_packed.copy_(w_packed)
        layer.w_scale.copy_(w_scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # in_features is not in the checkpoint and rows are padded (to 256 weights), so a layer of other
        # in_features can share w_packed's shape: its weights past in_features must then be the padding's zeros,
        # or they would be silently dropped (the kernels multiply them by zero-padded x).
        packed = state_dict.get(prefix + "w_packed")
        if isinstance(packed, torch.Tensor) and packed.shape == self.w_packed.shape and packed.dtype == torch.uint8:
            if any(((packed >> shift) & 3).eq(3).any() for shift in (0, 2, 4, 6)):
                error_msgs.append(f"{prefix}w_packed holds the 2-bit code 3, which is no ternary weight (codes 0, 1, "
                                  "2 are -1, 0, 1): not a pack_ternary / quantize_weight output")  # fmt: skip
            k_pad = packed.shape[1] * 4
            if k_pad > self.in_features and unpack_ternary_ref(packed, k_pad)[:, self.in_features :].any():
                error_msgs.append(
                    f"{prefix}w_packed holds nonzero weights past in_features={self.in_features}: the checkpoint was "
                    "saved from a layer with more inputs"
                )
        extra_key = prefix + "_extra_state"
        if extra_key in state_dict:  # (checked here, where the layer's name is known)
            in_features, act_bits = _recorded(state_dict[extra_key])
            if in_features != self.in_features:
                error_msgs.append(f"{prefix}w_packed: the checkpoint's layer has in_features={in_features}, this one "
                                  f"{self.in_features}")  # fmt: skip
            if act_bits != self.act_bits:
                error_msgs.append(f"{prefix}act_bits: the checkpoint's layer has act_bits={act_bits}, this one "
                                  f"{self.act_bits} (set act_bits when building the layer)")  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        if extra_key not in state_dict and extra_key in missing_keys:  # a checkpoint from before the extra state
            missing_keys.remove(extra_key)

    # The checkpoint records in_features and act_bits (w_packed's padded shape cannot tell in_features within a
    # block of 256, and act_bits changes the function), as a tensor so that safetensors files hold it too.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.in_features, 0 if self.act_bits is None else self.act_bits], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        pass  # (nothing to set: _load_from_state_dict compared the record with this layer)

    def _apply(self, fn, recurse=True):
        # module.to(bf16) / .half() would round gamma (the kernels take it fp32 and refuse anything else): keep
        # the value, move it only.
        scale = self.w_scale
        super()._apply(fn, recurse)
        if self.w_scale.dtype != torch.float32:
            self.w_scale = scale.to(device=self.w_scale.device, dtype=torch.float32)
        # what fn does to a float tensor of the activations' dtype (.to(bf16) casts it, .to(device) keeps it)
        probe = fn(torch.empty(0, dtype=self.activation_dtype))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.activation_dtype = probe.dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # (rows are padded: the op itself cannot tell the width apart)
            raise ValueError(
                f"llmkernels.nn.TernaryLinear: x must have in_features = {self.in_features} in its last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ternary_linear(x, self.w_packed, self.w_scale, bias, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"act_bits={self.act_bits}"
        )
