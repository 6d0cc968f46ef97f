"""nn.Module layers that drop into a model."""

from .attention import MultiheadFlashAttention
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer, RMSNormGated
from .sliding_window import SlidingWindowAttention
from .ternary import BitLinear, TernaryLinear

__all__ = [
    "BitLinear",
    "Mamba2Mixer",
    "MambaMixer",
    "MultiheadFlashAttention",
    "RMSNormGated",
    "SlidingWindowAttention",
    "TernaryLinear",
]
