"""llmkernels: fused kernels for LLM inference.

    flash_attn_func, flash_attn_with_kvcache        IO-aware attention (flash_attn 2.x signatures)
    flash_attn_varlen_func, *_qkvpacked / *_kvpacked  packed variable-length batches, packed q/k/v inputs
    bert_padding.unpad_input / pad_input            padded batch <-> packed rows (flash_attn.bert_padding's names)
    RollingKVCache, sliding_window_attn_with_cache  sliding-window attention over a ring buffer (Mistral)
    ternary_linear, quantize_, ternary.*            BitNet b1.58 ternary linear layers
    selective_scan_fn, selective_state_update,      Mamba's selective scan (mamba_ssm signatures)
    causal_conv1d_fn, causal_conv1d_update,         and its depthwise causal convolution
    causal_conv1d_varlen_states                     (causal_conv1d signatures)
    mamba_inner_fn                                  Mamba's inner block (conv1d, projections, scan)
    mamba_chunk_scan_combined,                      Mamba-2's scan (SSD) and its mixer after in_proj
    mamba_split_conv1d_scan_combined                (mamba_ssm signatures)
    rmsnorm_fn                                      Mamba-2's gated RMSNorm (mamba_ssm's rmsnorm_fn)
    layer_norm_fn, rms_norm_fn                      residual add + LayerNorm / RMSNorm (mamba_ssm's fused add-norm)
    nn.*                                            drop-in nn.Module layers

Importing never initialises CUDA and never fails for want of the compiled extension: the reference
backend always runs, and `python -m llmkernels info` says what else is usable and why not.
"""

from . import _ext, bert_padding, nn, ternary  # noqa: E402  (public namespaces: llmkernels.ternary.*, .nn.*, ...)
from ._backend import BACKENDS, BackendError, requested_backend, use_backend
from .ops.attention import flash_attn_func, flash_attn_with_kvcache
from .ops.attention_varlen import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states
from .ops.layer_norm import layer_norm_fn, rms_norm_fn
from .ops.mamba_chunk_scan import mamba_chunk_scan_combined
from .ops.mamba_inner import mamba_inner_fn
from .ops.mamba_split_scan import mamba_split_conv1d_scan_combined
from .ops.rmsnorm_gated import rmsnorm_fn
from .ops.selective_scan import selective_scan_fn, selective_state_update
from .ops.sliding_window import RollingKVCache, sliding_window_attn_with_cache
from .ops.ternary import quantize_, ternary_linear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "bert_padding",
    "RollingKVCache",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "layer_norm_fn",
    "mamba_chunk_scan_combined",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "nn",
    "quantize_",
    "requested_backend",
    "rms_norm_fn",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
    "sliding_window_attn_with_cache",
    "ternary",
    "ternary_linear",
    "use_backend",
]


def extension_status() -> str:
    """Why the compiled extension is or is not available ("loaded" or the import error)."""
    return "loaded" if _ext.loaded else f"not loaded: {_ext.load_error}"
