"""Three small decoders with real architectures, written on llmkernels' functional ops, for the demo and
the end-to-end tests. Under `use_backend("reference")` the same code is the pure-PyTorch path."""

from .bitnet import BitNetConfig, BitNetLM
from .mamba import MambaConfig, MambaLM
from .mistral import MistralConfig, MistralLM

__all__ = ["BitNetConfig", "BitNetLM", "MambaConfig", "MambaLM", "MistralConfig", "MistralLM"]
