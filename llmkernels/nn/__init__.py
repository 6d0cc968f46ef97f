"""nn.Module layers that drop into a model."""

from .attention import MultiheadFlashAttention
from .sliding_window import SlidingWindowAttention
from .ternary import BitLinear, TernaryLinear
from .mamba import MambaMixer

__all__ = ["BitLinear", "MambaMixer", "MultiheadFlashAttention", "SlidingWindowAttention", "TernaryLinear"]
