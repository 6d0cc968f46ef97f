"""nn.Module layers that drop into a model."""

from .attention import MultiheadFlashAttention
from .layer_norm import LayerNorm, RMSNorm
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer, RMSNormGated
from .sliding_window import SlidingWindowAttention
from .ternary import BitLinear, TernaryLinear

__all__ = [
    "BitLinear",
    "LayerNorm",
    "Mamba2Mixer",
    "MambaMixer",
    "MultiheadFlashAttention",
    "RMSNorm",
    "RMSNormGated",
    "SlidingWindowAttention",
    "TernaryLinear",
]
