"""nn.Module layers that drop into a model."""

from .attention import MultiheadFlashAttention
from .mamba import MambaMixer
from .sliding_window import SlidingWindowAttention
from .ternary import BitLinear, TernaryLinear

__all__ = ["BitLinear", "MambaMixer", "MultiheadFlashAttention", "SlidingWindowAttention", "TernaryLinear"]
