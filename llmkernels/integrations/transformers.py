"""Hugging Face transformers integration (transformers is an optional extra, imported only here).

    import llmkernels.integrations.transformers as lk_hf
    lk_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="llmkernels")

`register()` adds an attention function to transformers' `AttentionInterface` and a mask function to its
`AttentionMaskInterface` under the name "llmkernels". Like FlashAttention's integration, the model then
hands the attention a 2D padding mask only when some token is padding (else None), so the common case
is one `flash_attn_func` call with the causal / sliding-window band; padded batches are unpadded into one
`flash_attn_varlen_func` call, as are packed (padding-free) batches. Works in prefill and in `generate()`
with the model's own KV cache (keys arrive already concatenated).

`patch_model(model)` routes the Mamba-family mixers (Mamba, Mamba-2 and the hybrids built on them: MAMBA_MIXERS)
through llmkernels' conv1d, scans and decode steps, and the LFM2 family's short convolutions (CONV_MIXERS) through
the conv1d ops; a hybrid's attention layers take the attention above. It also
swaps the ternary linear layers of a BitNet checkpoint (transformers' BitLinear, and AutoBitLinear with offline
weights) for llmkernels' TernaryLinear: the same ternary weights and scale, 2-bit packed for the ternary GEMV / GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..nn.ternary import TernaryLinear
from ..ops.attention import flash_attn_func, flash_attn_with_kvcache
from ..ops.attention_varlen import flash_attn_varlen_func
from ..ternary import pack_ternary

NAME = "llmkernels"


def llmkernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention: query (batch, nheads, q_len, d), key/value (batch, nheads_k, kv_len, d),
    attention_mask None or (batch, >= kv_len) bool padding mask. Returns ((batch, q_len, nheads, dv), None).

    Packed (padding-free) batches, as transformers' FlashAttention path takes them: batch 1 with the sequences
    end to end, given by `cu_seq_lens_q` / `cu_seq_lens_k` (+ `max_length_q` / `max_length_k`) or by
    `position_ids` that restart at each sequence's start; each sequence then sees only its own keys.

    Multi-head latent attention (DeepSeek-V2 / V3, Kimi): value's head dim may differ from query's and key's. The
    smaller side is zero-padded (zero columns add nothing to a score; zero value columns come out zero and are cut
    off), with the scale of the query's own head dim, as transformers' FlashAttention path pads value."""
    dq, dv = query.shape[-1], value.shape[-1]
    if dq == dv:
        return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                                  is_causal, **kwargs)  # fmt: skip
    scaling = scaling if scaling is not None else dq**-0.5
    if dv < dq:
        value = torch.nn.functional.pad(value, (0, dq - dv))
    else:
        query, key = (torch.nn.functional.pad(t, (0, dv - dq)) for t in (query, key))
    out, weights = _attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                      softcap, is_causal, **kwargs)  # fmt: skip
    return out[..., :dv], weights


def _attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                       is_causal, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """llmkernels_attention_forward for query, key and value of one head dim."""
    if kwargs.get("s_aux") is not None:  # (GPT-OSS's attention sinks: a per-head logit in every softmax's sum)
        raise NotImplementedError("llmkernels attention does not take attention sinks (s_aux): use "
                                  "attn_implementation 'eager' for this model")  # fmt: skip
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, 0 if causal else sliding_window - 1) if sliding_window else (-1, -1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, heads, d)
    if not q.dtype == k.dtype == v.dtype:
        q, k, v = _common_dtype(q, k, v)
    args = dict(softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)
    if dropout > 0.0 and module.training:  # (transformers passes 0 in eval; the paths below that take no
        args["dropout_p"] = float(dropout)  # dropout, the inference-only kvcache ones, run only in eval)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"llmkernels attention takes transformers' 2D padding mask (batch, kv_len), got a "
                f"{attention_mask.dim()}-D attention_mask: a custom 4D mask needs attn_implementation 'sdpa' or 'eager'"
            )
        mask = attention_mask.bool()
        if mask.shape[1] < k.shape[1]:  # a static cache: slots past the mask hold no token yet (transformers' rule)
            k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
        key_mask = mask[:, -k.shape[1] :]
        # Decoding a padded batch from its cache (inference only, as that op; else the varlen path, differentiable)
        if causal and k.shape[1] > q.shape[1] and not module.training and not _wants_grad(q, k, v):
            out = _left_padded_decode(q, k, v, key_mask, args)
            if out is not None:
                return out, None
        if window != (-1, -1) and not _one_block_per_row(key_mask):
            # A hole in a row (right padding continued from a cache): the varlen path would pack the valid tokens
            # and count the window in tokens, transformers counts it in positions. Rare: the explicit mask.
            slots = torch.arange(k.shape[1] - q.shape[1], k.shape[1], device=q.device).expand(q.shape[0], -1)
            return _explicit_mask_attention(q, k, v, key_mask, slots, args), None
        return _padded_attention(q, k, v, key_mask, args), None
    position_ids = kwargs.get("position_ids")
    from_cache = causal and k.shape[1] > q.shape[1] and _positions_of(position_ids, q)
    if from_cache and (module.training or _wants_grad(q, k, v)):
        # Keys from a cache with gradients wanted: the filled slots as below, differentiably (a static cache's
        # empty slots must not be attended; flash_attn_func when every key is filled, as in a dynamic cache).
        lens = _filled_slots(kwargs.get("cache_position"), position_ids, q, k)
        if int(lens.min()) == k.shape[1]:
            return flash_attn_func(q, k, v, **args), None
        slots = lens[:, None] - q.shape[1] + torch.arange(q.shape[1], device=q.device)
        valid = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
        return _explicit_mask_attention(q, k, v, valid, slots, args), None
    if from_cache:
        # Keys from a cache, the queries at position_ids: a static cache hands over all its max_cache_len slots
        # (with no mask when nothing is padding), of which [0, last query position] hold tokens. The kvcache op
        # takes those counts on the device (no sync) and aligns the band at each row's last query; a sliding
        # layer's cache (the last tokens, in order) is full once positions pass it: the clamp in _filled_slots.
        # Inference only, as that op (with gradients wanted, the branch above). cache_position, where a
        # transformers version passes it, is the slot index itself; position_ids equal it unless a caller offsets
        # them, which only a padding mask, handled above, normally does.
        lens = _filled_slots(kwargs.get("cache_position"), position_ids, q, k)
        out = flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, softmax_scale=scaling, causal=True,
                                      window_size=window, softcap=softcap or 0.0)  # fmt: skip
        return out, None
    packed = _packed_offsets(q, k, kwargs)
    if packed is not None:
        cu_q, cu_k = packed
        out = flash_attn_varlen_func(
            q[0], k[0], v[0], cu_q, cu_k, _longest(cu_q), _longest(cu_k), **args
        )  # fmt: skip
        return out.unsqueeze(0), None
    return flash_attn_func(q, k, v, **args), None


def _common_dtype(q, k, v):
    """q, k, v in one dtype for the kernels: under autocast its dtype (some models' rotary embedding returns fp32
    queries and keys beside 16-bit values there, e.g. Bamba and FalconH1; transformers' FlashAttention path casts the
    same way), else v's (the values skip the rotary step: their dtype is the projections', which o_proj expects)."""
    device_type = q.device.type
    target = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else v.dtype
    return (t.to(target) for t in (q, k, v))


def _filled_slots(cache_position, position_ids, q, k) -> torch.Tensor:
    """(batch,) int32: how many cache slots hold tokens, the queries being the last of them: cache_position's last
    slot + 1 where transformers passes it, else the queries' last position + 1 (positions taken for slots),
    clamped to the keys given."""
    last = cache_position[-1] if isinstance(cache_position, torch.Tensor) else position_ids[:, -1]
    return (last + 1).clamp(1, k.shape[1]).to(torch.int32).expand(q.shape[0]).contiguous()


def _one_block_per_row(key_mask: torch.Tensor) -> bool:
    """Whether each row's valid keys are one contiguous run (left or right padding, or none)."""
    counts = key_mask.sum(1)
    first = key_mask.int().argmax(1)
    last = key_mask.shape[1] - 1 - key_mask.flip(1).int().argmax(1)
    return bool(((counts == 0) | (last - first + 1 == counts)).all())


def _explicit_mask_attention(q, k, v, key_valid, q_slots, args) -> torch.Tensor:
    """Attention with the mask spelled out, in fp32, differentiable: query t of row b at slot q_slots[b, t] sees key
    slot j when key_valid[b, j] and j lies in its causal / window band counted in slots, as transformers' masks
    count it. For the rare calls the kernels' layouts cannot express (holes with a window, a static cache's empty
    slots with gradients wanted); a row that sees no key gives 0. q (b, sq, h, d); k, v (b, sk, hk, d)."""
    group = q.shape[2] // k.shape[2]
    qf, kf, vf = q.float(), k.float().repeat_interleave(group, 2), v.float().repeat_interleave(group, 2)
    scale = args["softmax_scale"] if args["softmax_scale"] is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if args["softcap"]:
        scores = args["softcap"] * torch.tanh(scores / args["softcap"])
    left, right = args["window_size"]
    right = 0 if args["causal"] else right
    j = torch.arange(k.shape[1], device=q.device)[None, None, :]
    i = q_slots[:, :, None]
    visible = key_valid[:, None, :].expand(-1, q.shape[1], -1)
    if right >= 0:
        visible = visible & (j <= i + right)
    if left >= 0:
        visible = visible & (j >= i - left)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (a row that sees nothing: 0, not NaN)
    if args.get("dropout_p", 0.0) > 0:  # (torch's own mask here, not the kernels': the same distribution)
        probs = torch.nn.functional.dropout(probs, args["dropout_p"])
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)


def _positions_of(position_ids, q: torch.Tensor) -> bool:
    """Whether position_ids are plain token positions of q's rows: (batch or 1, q_len) integers."""
    return (
        isinstance(position_ids, torch.Tensor)
        and position_ids.dim() == 2
        and position_ids.shape[0] in (1, q.shape[0])
        and position_ids.shape[1] == q.shape[1]
        and not position_ids.is_floating_point()
    )


def _longest(cu_seqlens: torch.Tensor):
    """The longest sequence of cu_seqlens as a 0-d tensor (0 when there is none): flash_attn_varlen_func reads it
    back in eager and, under torch.compile, sizes the launch without reading it (a data-dependent value)."""
    return cu_seqlens.diff().max() if cu_seqlens.numel() > 1 else 0


def _packed_offsets(q, k, kwargs) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(cu_seqlens_q, cu_seqlens_k) int32 when batch 1 holds several sequences end to end, else None."""
    if q.shape[0] != 1:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return cu_q.to(torch.int32), cu_k.to(torch.int32)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or q.shape[1] != k.shape[1] or position_ids.numel() != q.shape[1] or q.shape[1] < 2:
        return None  # decode steps (keys from a cache) are one sequence
    pos = position_ids.reshape(-1)
    starts = (pos == pos.min()).nonzero().squeeze(1)  # every sequence restarts at the first position
    if starts.numel() <= 1:
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, cu


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _left_padded_decode(q, k, v, key_mask, args) -> Optional[torch.Tensor]:
    """The kvcache op on the cache in place, each row's tokens starting after its padding (cache_leftpad), when the
    padding of every row is one leading block, as generate() makes it; else None. (The varlen path would gather
    every valid key of the cache, at each layer and step.)"""
    if not bool((key_mask[:, 1:] >= key_mask[:, :-1]).all()):  # (one sync, as the varlen path has)
        return None
    batch, kv_len = k.shape[:2]
    lens = torch.full((batch,), kv_len, dtype=torch.int32, device=q.device)
    pads = (kv_len - key_mask.sum(1)).to(torch.int32)  # a row of padding only: no key, zeros as the varlen path's
    return flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, cache_leftpad=pads, **args)


def _padded_attention(q, k, v, key_mask, args) -> torch.Tensor:
    """One packed (varlen) call over the valid tokens only. Padding must be one contiguous block (left or right),
    as tokenizers make it, so each row's valid queries and keys stay aligned at the bottom-right corner.

    The mask is the keys'. Causal (a decoder's self-attention) or as many queries as keys (an encoder's): the
    queries are the last keys, so their mask is the keys' last columns (padded queries come out 0). Otherwise,
    non-causal with other lengths, the queries are another sequence's (cross-attention: the mask is the
    encoder's), and every query is valid. Cross-attention whose two lengths happen to be equal reads as an
    encoder's self-attention (as transformers' FlashAttention path does): its decoder rows at the encoder's padded
    positions come out 0."""
    batch, seqlen_q = q.shape[:2]
    if args["causal"] or seqlen_q == k.shape[1]:
        query_mask = key_mask[:, -seqlen_q:]
    else:
        query_mask = torch.ones((batch, seqlen_q), dtype=torch.bool, device=q.device)
    rows_q, rows_k = query_mask.reshape(-1).nonzero().squeeze(1), key_mask.reshape(-1).nonzero().squeeze(1)
    lens_q, lens_k = query_mask.sum(1), key_mask.sum(1)
    zero = lens_q.new_zeros(1)
    cu_q = torch.cat([zero, lens_q.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([zero, lens_k.cumsum(0)]).to(torch.int32)
    packed = flash_attn_varlen_func(
        q.reshape(-1, *q.shape[2:])[rows_q], k.reshape(-1, *k.shape[2:])[rows_k], v.reshape(-1, *v.shape[2:])[rows_k],
        cu_q, cu_k, int(lens_q.max()), int(lens_k.max()), **args,
    )  # fmt: skip
    out = q.new_zeros((batch * seqlen_q, *q.shape[2:]))
    out[rows_q] = packed
    return out.view(q.shape)


def register() -> None:
    """Make `attn_implementation="llmkernels"` available to every transformers model that uses the
    AttentionInterface (Llama, Mistral, Qwen2, Gemma, ... families)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, llmkernels_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


# ------------------------------------------------------------------------------------------------------
# Mamba mixers (Mamba, Mamba-2 and the hybrid models built on them)
# ------------------------------------------------------------------------------------------------------
# transformers' Mamba-family mixers call module-level functions of their modeling file (causal_conv1d_fn /
# _update, mamba_selective_scan / _state_update for Mamba-1, mamba2_chunk_scan / mamba2_selective_state_update for
# Mamba-2) with mamba_ssm's / causal_conv1d's signatures. patch_model() gives each known mixer a copy of its forward
# whose names resolve to the wrappers below: the model's own padding, cache handling and generate() stay untouched,
# and other models, threads and torch.compile's tracing see the same code they would have.
# Their fused training entries (mamba_inner_fn, mamba2_split_conv1d_scan_combined) return None without a hub kernel,
# after which the mixer runs the pieces; patched mixers get None always, so an installed mamba_ssm / hub kernel does
# not take training.


def _contiguous(t):
    return t.contiguous() if t is not None else None


def _packed(kwargs: dict) -> dict:
    """seq_idx (packed sequences: transformers hands the collator's seq_idx to the mixers, which pass their kwargs
    on) as a keyword for our ops, only when given: an op without packed support then fails loudly rather than
    mixing the sequences' states."""
    seq_idx = kwargs.get("seq_idx")
    return {} if seq_idx is None else {"seq_idx": seq_idx}


def _hf_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    from ..ops.causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(hidden_states, weight, bias, activation=activation, **_packed(kwargs))


def _hf_mamba1_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' Mamba-1 mixers hand seq_idx (Zamba's by name, Mamba's within its kwargs) to the conv only, not to
    the scan, whose state would run from one packed sequence into the next: refused rather than mixed silently."""
    if kwargs.get("seq_idx") is not None:
        raise NotImplementedError(
            "llmkernels: transformers' Mamba-1 mixers do not pass seq_idx to their scan, so packed (padding-free) "
            "batches would mix sequences; pad the batch instead"
        )
    return _hf_conv1d_fn(hidden_states, weight, bias, activation=activation)


def _hf_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
    """hidden_states (batch, dim, seqlen) as transformers passes it (seqlen 1), or (batch, dim); kwargs: causal_conv1d's
    cache_seqlens / conv_state_indices, which the op takes (anything else is an error, not dropped)."""
    from ..ops.causal_conv1d import causal_conv1d_update

    return causal_conv1d_update(hidden_states, conv_state, weight, bias, activation=activation, **kwargs)


def _hf_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **kwargs):  # fmt: skip
    """Mamba-1's scan (transformers' use_mambapy / use_associative_scan choose among its own fallbacks: ignored)."""
    from ..ops.selective_scan import selective_scan_fn

    # (as they lie: selective_scan_fn copies what a backend needs copied; the CPU kernels read any strides)
    return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                             **_packed(kwargs))  # fmt: skip


def _hf_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
    """One decode step, `state` updated in place. Zamba steps each of its Mamba heads on a strided view of the
    layer's state (state[:, head]), which our op cannot write through: it steps a contiguous copy, copied back."""
    from ..ops.selective_scan import selective_state_update

    c = _contiguous
    work = state if state.is_contiguous() else state.contiguous()
    out = selective_state_update(work, c(hidden_states), c(dt), A, c(B), c(C), D, c(z), dt_bias, dt_softplus)
    if work is not state:
        state.copy_(work)
    return out


def _hf_mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, z=None,
                          seq_idx=None, cu_seqlens=None, **kwargs):  # fmt: skip
    from ..ops.mamba_chunk_scan import mamba_chunk_scan_combined

    packed = {} if seq_idx is None else {"seq_idx": seq_idx}
    if cu_seqlens is not None:  # (only what return_varlen_states needs, which transformers does not ask for)
        packed["cu_seqlens"] = cu_seqlens
    return mamba_chunk_scan_combined(
        hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states, **packed,
    )  # fmt: skip


def _hf_mamba2_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None,
                            **kwargs):  # fmt: skip
    """The 4-D (multi-head) decode step; FalconH1 without its RMS norm passes the gate as z."""
    from ..ops.selective_scan import selective_state_update

    return selective_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _hf_no_fused_kernel(*args, **kwargs):
    """transformers' stub for a fused training kernel (conv, scan, norm and out_proj in one): None makes the mixer
    run the pieces above."""
    return None


_HF_MAMBA_FUNCTIONS = {
    "causal_conv1d_fn": _hf_mamba1_conv1d_fn,
    "causal_conv1d_update": _hf_conv1d_update,
    "mamba_selective_scan": _hf_selective_scan,
    "mamba_selective_state_update": _hf_state_update,
    "mamba_inner_fn": _hf_no_fused_kernel,
}

_HF_MAMBA2_FUNCTIONS = {
    "causal_conv1d_fn": _hf_conv1d_fn,
    "causal_conv1d_update": _hf_conv1d_update,
    "mamba2_chunk_scan": _hf_mamba2_chunk_scan,
    "mamba2_selective_state_update": _hf_mamba2_state_update,
    "mamba2_split_conv1d_scan_combined": _hf_no_fused_kernel,
}

# (transformers.models.<module>.modeling_<module>, mixer class) -> the names its forward calls. Read off transformers
# 5.23's modeling files: the Mamba-2 mixers of the hybrids are copies of Mamba2Mixer's forward (FalconH1's adds
# multipliers and can pass the gate as z to the decode step); Jamba and FalconMamba RMS-normalise dt, B and C in
# the forward before the scan (the norms are not the kernels' business); Zamba scans each of its Mamba heads apart.
MAMBA_MIXERS = {
    ("mamba", "MambaMixer"): _HF_MAMBA_FUNCTIONS,
    ("falcon_mamba", "FalconMambaMixer"): _HF_MAMBA_FUNCTIONS,
    ("jamba", "JambaMambaMixer"): _HF_MAMBA_FUNCTIONS,
    ("zamba", "ZambaMambaMixer"): _HF_MAMBA_FUNCTIONS,
    ("mamba2", "Mamba2Mixer"): _HF_MAMBA2_FUNCTIONS,
    ("bamba", "BambaMixer"): _HF_MAMBA2_FUNCTIONS,
    ("granitemoehybrid", "GraniteMoeHybridMambaLayer"): _HF_MAMBA2_FUNCTIONS,
    ("nemotron_h", "NemotronHMamba2Mixer"): _HF_MAMBA2_FUNCTIONS,
    ("zamba2", "Zamba2MambaMixer"): _HF_MAMBA2_FUNCTIONS,
    ("falcon_h1", "FalconH1Mixer"): _HF_MAMBA2_FUNCTIONS,
}


def _packed_seq_idx(x: torch.Tensor, kwargs: dict) -> Optional[torch.Tensor]:
    """(1, seqlen) int32 sequence numbers of a packed (padding-free) batch x (1, dim, seqlen) that transformers
    describes with its flash-attention kwargs (read as the attention above reads them), else None."""
    tokens = x.transpose(1, 2)  # (batch, seqlen, dim): the attention's layout
    packed = _packed_offsets(tokens, tokens, kwargs)
    if packed is None or int(packed[0][-1]) != x.shape[-1]:  # (a cache's inputs before the tokens: not this packing)
        return None
    offsets = packed[0][1:].long().contiguous()
    return torch.searchsorted(offsets, torch.arange(x.shape[-1], device=x.device), right=True).to(torch.int32)[None]


def _hf_short_conv_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """The LFM2 / gated-DeltaNet layers' convolution. Their packed batches arrive as the attention's kwargs rather
    than seq_idx (transformers' own convolution runs across the sequences' boundaries there): made into seq_idx,
    so each sequence is convolved alone, as its attention and delta rule see it."""
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is None:
        seq_idx = _packed_seq_idx(hidden_states, kwargs)
    return _hf_conv1d_fn(hidden_states, weight, bias, activation=activation, seq_idx=seq_idx)


# Liquid's LFM2 family: a gated short convolution (width conv_L_cache) through causal_conv1d_fn / _update, no scan.
_HF_SHORT_CONV_FUNCTIONS = {"causal_conv1d_fn": _hf_short_conv_fn, "causal_conv1d_update": _hf_conv1d_update}
# The gated DeltaNet layers of Qwen3-Next, Qwen3.5 and their kin convolve q, k, v the same way before the delta rule
# (which stays transformers'): the conv goes through the same functions.
CONV_MIXERS = {
    ("lfm2", "Lfm2ShortConv"): _HF_SHORT_CONV_FUNCTIONS,
    ("lfm2_moe", "Lfm2MoeShortConv"): _HF_SHORT_CONV_FUNCTIONS,
    ("lfm3", "Lfm3ShortConv"): _HF_SHORT_CONV_FUNCTIONS,
    ("qwen3_next", "Qwen3NextGatedDeltaNet"): _HF_SHORT_CONV_FUNCTIONS,
    ("qwen3_5", "Qwen3_5GatedDeltaNet"): _HF_SHORT_CONV_FUNCTIONS,
    ("qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet"): _HF_SHORT_CONV_FUNCTIONS,
    ("olmo_hybrid", "OlmoHybridGatedDeltaNet"): _HF_SHORT_CONV_FUNCTIONS,
    ("lara_mini", "LaraMiniGatedDeltaNet"): _HF_SHORT_CONV_FUNCTIONS,
    ("kimi_linear", "KimiLinearDeltaAttention"): _HF_SHORT_CONV_FUNCTIONS,
}

def _hf_gated_norm(self, hidden_states, gate=None):
    """MambaRMSNormGated.forward and its copies: rms(x * silu(gate)) per group of group_size channels, times weight."""
    from ..ops.rmsnorm_gated import rmsnorm_fn

    if torch.promote_types(self.weight.dtype, hidden_states.dtype) != hidden_states.dtype:
        # (an fp32 weight on 16-bit activations, as under autocast: transformers' norm then returns fp32)
        return type(self).forward(self, hidden_states, gate)
    return rmsnorm_fn(hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon,
                      group_size=self.group_size, norm_before_gate=False)  # fmt: skip


def _hf_falcon_h1_gated_norm(self, hidden_states, gate=None):
    """FalconH1RMSNormGated.forward: n_groups groups, the gate before or after the norm."""
    from ..ops.rmsnorm_gated import rmsnorm_fn

    return rmsnorm_fn(hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon,
                      group_size=hidden_states.shape[-1] // self.n_groups, norm_before_gate=self.norm_before_gate)


# Named forward, as the patched mixers' forwards are: a bound method pickles as getattr(instance, its name), so a
# saved patched model loads (unpatched: its class's forward; patch_model again) instead of failing on the name.
_hf_gated_norm.__name__ = _hf_falcon_h1_gated_norm.__name__ = "forward"

# The gated RMS norms the Mamba-2 mixers call as self.norm(scan_output, gate) (~12 PyTorch ops each), patched with
# the mixer to the forward given here, which calls llmkernels.rmsnorm_fn. FalconH1's is mamba_ssm's norm (weight
# times the fp32 value, then the cast); the others cast the normalised value to the input's dtype first and multiply
# by the weight after, one 16-bit rounding more: rmsnorm_fn rounds once, as mamba_ssm and transformers' own fused
# training path (which hands the norm's weight to mamba_split_conv1d_scan_combined) do.
_GATED_NORMS = {
    ("mamba2", "MambaRMSNormGated"): _hf_gated_norm,
    ("bamba", "BambaRMSNormGated"): _hf_gated_norm,
    ("granitemoehybrid", "GraniteMoeHybridRMSNormGated"): _hf_gated_norm,
    ("nemotron_h", "NemotronHRMSNormGated"): _hf_gated_norm,
    ("zamba2", "Zamba2RMSNormGated"): _hf_gated_norm,
    ("falcon_h1", "FalconH1RMSNormGated"): _hf_falcon_h1_gated_norm,
}


def _patch_gated_norm(norm) -> None:
    """Routes a mixer's gated RMS norm (a _GATED_NORMS class whose forward transformers defines) to rmsnorm_fn."""
    import types

    found = _known_forward_owner(norm, _GATED_NORMS) if isinstance(norm, torch.nn.Module) else None
    if found is not None:
        norm.forward = types.MethodType(_GATED_NORMS[found[1]], norm)


# The names without which a forward would silently run transformers' own kernels: checked on each class patched.
_ESSENTIAL = {"causal_conv1d_fn", "causal_conv1d_update"}


def patch_model(model: torch.nn.Module, attention: bool = False) -> dict[str, int]:
    """Route every transformers Mamba-family mixer in `model` (Mamba, Mamba-2, FalconMamba, Jamba, Zamba, Zamba2,
    Bamba, GraniteMoeHybrid, NemotronH, FalconH1: MAMBA_MIXERS) through llmkernels' conv1d, scan and decode step (and
    a Mamba-2 mixer's gated RMS norm through rmsnorm_fn), in the forward pass, training (the unfused path) and
    generate(). Returns {mixer class name: count patched}, empty when the model has none. Attention layers are not
    touched unless attention=True: that registers the attention above and switches the loaded model to it
    (model.set_attn_implementation("llmkernels"), as attn_implementation="llmkernels" at load time would), counted
    under "attn_implementation". Packed (padding-free) batches: the mixers'
    seq_idx reaches our ops. A patched model saved whole (torch.save) loads unpatched: call patch_model again.

    LFM2-family models (Lfm2, Lfm2Moe, Lfm3) and gated-DeltaNet hybrids (Qwen3-Next, Qwen3.5, Qwen3.5-MoE,
    OlmoHybrid, LaraMini, Kimi Linear): CONV_MIXERS. Their short convolutions run llmkernels' causal_conv1d_fn and
    decode step (the conv state's length is the op's state_len); the rest of those layers (the delta rule) stays
    transformers'. Counted under the class name. A packed batch given by cu_seq_lens (transformers' collator with
    return_flash_attn_kwargs) or seq_idx is convolved per sequence, where transformers' convolution crosses the
    boundaries; position_ids alone do not reach these layers (then both cross them).

    BitNet models (BitNetForCausalLM, or any model transformers' BitNet quantizer converted): each BitLinear (packed
    offline weights) and AutoBitLinear with offline weights becomes a TernaryLinear with its weights, scale and bias
    (and its optional RMSNorm before), counted under its class name; AutoBitLinear with online quantisation (latent
    weights, for training) is left as is, as is a Mamba-1 mixer's dt_proj (the mixer reads its weight). Layers
    handled by accelerate's hooks (device_map) lose them: the model must sit on one device. The replacement
    quantises activations in fp32 and sums exactly in int32, where BitLinear does both in the model's dtype: in bf16
    their outputs differ by that rounding. In fp32 too, one activation can land one step apart: x * 127 / s (the
    BitNet formula, ours) and transformers' x * (127 / s) round an exact .5 tie differently, and one BitLinear's
    outputs, integer multiples of one scale, make such ties downstream."""
    counts = _patch_known_mixers(model, {**MAMBA_MIXERS, **CONV_MIXERS})
    counts.update(_replace_bitnet_linears(model))
    if attention:
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"llmkernels.patch_model: attention=True needs a transformers PreTrainedModel, got "
                            f"{type(model).__name__}")  # fmt: skip
        has_attention = any(type(m).__name__.endswith("Attention") for m in model.modules())
        if has_attention and not getattr(model, "_supports_flash_attn", False):
            # a model with attention that does not declare FlashAttention support: its masks may be more than
            # padding (Llama4's chunks, T5's position bias, image-token blocks, ...), which the 2-D padding mask
            # this attention takes would lose; transformers refuses flash_attention_2 for these models too.
            # (Attention-free models, Mamba's, declare nothing and have no attention module: they pass.)
            raise ValueError(f"llmkernels.patch_model: {type(model).__name__} does not declare FlashAttention "
                             "support (its masks may be more than padding): attention=True could change its "
                             "outputs")  # fmt: skip
        register()
        model.set_attn_implementation(NAME)
        counts["attn_implementation"] = 1
    return counts


def patch_mamba(model: torch.nn.Module) -> int:
    """patch_model for MambaMixer only; returns the number of mixers patched."""
    return _patch_known_mixers(model, {("mamba", "MambaMixer"): _HF_MAMBA_FUNCTIONS}).get("MambaMixer", 0)


def patch_mamba2(model: torch.nn.Module) -> int:
    """patch_model for Mamba2Mixer only; returns the number of mixers patched."""
    return _patch_known_mixers(model, {("mamba2", "Mamba2Mixer"): _HF_MAMBA2_FUNCTIONS}).get("Mamba2Mixer", 0)


def _known_forward_owner(module: torch.nn.Module, table: dict):
    """The class whose forward `module` runs, with its table key, when that class is one of table's; else None (a
    subclass that overrides forward runs code we have not read)."""
    owner = next(cls for cls in type(module).__mro__ if "forward" in cls.__dict__)
    prefix = "transformers.models."
    if not owner.__module__.startswith(prefix):
        return None
    key = (owner.__module__[len(prefix) :].split(".")[0], owner.__name__)
    return (owner, key) if key in table else None


def _patch_known_mixers(model: torch.nn.Module, table: dict) -> dict[str, int]:
    import types

    forwards, counts = {}, {}
    for module in model.modules():
        found = _known_forward_owner(module, table)
        if found is None:
            continue
        owner, key = found
        if owner not in forwards:
            forwards[owner] = _patched_forward(owner, table[key])
        module.forward = types.MethodType(forwards[owner], module)
        _patch_gated_norm(getattr(module, "norm", None))
        counts[owner.__name__] = counts.get(owner.__name__, 0) + 1
    return counts


def _patched_forward(mixer_class, functions: dict):
    """mixer_class.forward resolving the names of `functions` it uses to them; fails if it uses none of the essential
    ones (a transformers release that renamed them would otherwise leave the model on its own kernels unnoticed)."""
    inner = mixer_class.forward
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    missing = _ESSENTIAL - set(inner.__code__.co_names)
    if missing:
        raise RuntimeError(f"llmkernels: {mixer_class.__qualname__}.forward does not call {sorted(missing)}: this "
                           "transformers version is not one patch_model knows")  # fmt: skip
    used = {name: fn for name, fn in functions.items() if name in inner.__code__.co_names}
    return _with_globals(mixer_class.forward, used)


def _with_globals(fn, functions: dict):
    """A copy of fn whose innermost function (under functools.wraps decorators, such as transformers'
    force_accelerate_hooks) resolves the names in `functions` to them; each decorator layer is rebuilt around the
    copy through its closure cell that held the original."""
    import functools
    import types

    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is None:
        copy = types.FunctionType(fn.__code__, {**fn.__globals__, **functions}, fn.__name__, fn.__defaults__,
                                  fn.__closure__)  # fmt: skip
        copy.__kwdefaults__ = fn.__kwdefaults__
        return functools.update_wrapper(copy, fn, updated=())
    inner = _with_globals(wrapped, functions)
    cells, found = [], False
    for cell in fn.__closure__ or ():
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            held = None
        if held is wrapped:
            cell, found = types.CellType(inner), True
        cells.append(cell)
    if not found:
        raise RuntimeError(f"llmkernels: cannot patch {fn.__qualname__}: its decorator does not hold the function it "
                           "wraps in a closure cell")  # fmt: skip
    layer = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    layer.__kwdefaults__ = fn.__kwdefaults__
    functools.update_wrapper(layer, inner, updated=())
    return layer


# ----------------------------------------------------------------------------------------------------------------
# BitNet: transformers' ternary linear layers (transformers/integrations/bitnet.py) -> TernaryLinear
# ----------------------------------------------------------------------------------------------------------------
def _bitnet_classes() -> tuple[type, type] | None:
    try:
        from transformers.integrations.bitnet import AutoBitLinear, BitLinear
    except ImportError:  # (a transformers release without BitNet)
        return None
    return BitLinear, AutoBitLinear


def _replace_bitnet_linears(model: torch.nn.Module) -> dict[str, int]:
    from ..ops.ternary import _reads_weight_of

    classes = _bitnet_classes()
    if classes is None:
        return {}

    def convertible(module) -> bool:  # (exact types: a subclass may compute something else)
        return type(module) is classes[0] or (type(module) is classes[1] and not module.online_quant)

    if convertible(model):
        raise ValueError("llmkernels.patch_model: model is itself a BitNet linear layer; patch the model holding it")
    counts: dict[str, int] = {}
    swapped: dict[int, torch.nn.Module] = {}  # id(layer) -> its replacement: a layer under two names stays one
    for fqn, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            # (a Mamba-1 mixer reads dt_proj's weight itself, as quantize_ knows: that layer stays)
            if child is None or not convertible(child) or _reads_weight_of(parent, child_name):
                continue
            if id(child) not in swapped:
                name = f"{fqn}.{child_name}" if fqn else child_name
                swapped[id(child)] = _ternary_from_bitnet(name, child, packed=type(child) is classes[0])
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
            setattr(parent, child_name, swapped[id(child)])
    return counts


def _ternary_from_bitnet(name: str, module: torch.nn.Module, packed: bool) -> torch.nn.Module:
    """BitLinear: weight uint8 (out_features / 4, in_features), weight row r + i * rows holding output row
    r + i * rows in bits 2i..2i+1 as w + 1; y = (x_q @ W^T) / (act_scale * weight_scale), so gamma = 1 / weight_scale.
    AutoBitLinear (offline): weight (out_features, in_features) of ternary values,
    y = (x_q @ W^T + bias) * weight_scale."""
    w = module.weight.detach()
    norm_params = list(module.rms_norm.parameters()) if getattr(module, "rms_norm", None) is not None else []
    if w.is_meta or module.weight_scale.is_meta or any(p.is_meta for p in norm_params):
        raise ValueError(f"llmkernels.patch_model: {name}'s weights are on the meta device (not loaded, or "
                         "offloaded by accelerate): load them first")  # fmt: skip
    if packed:
        rows = w.shape[0]
        codes = torch.stack([(w >> (2 * i)) & 3 for i in range(4)])  # (4, rows, in): output row i * rows + r
        w_t = (codes.reshape(4 * rows, w.shape[1]).to(torch.int8) - 1)[: module.out_features]
        if w_t.shape[0] != module.out_features or (w_t > 1).any():
            raise ValueError(f"llmkernels.patch_model: {name}.weight is not a packed ternary weight of "
                             f"{module.out_features} rows (shape {tuple(w.shape)})")  # fmt: skip
    else:
        w_t = w.round().to(torch.int8)
        if not torch.equal(w_t.to(w.dtype), w) or (w_t.abs() > 1).any():
            raise ValueError(f"llmkernels.patch_model: {name}.weight holds values other than -1, 0, 1")
    scale = module.weight_scale.detach().float().reshape(())
    gamma = 1.0 / scale if packed else scale
    bias = getattr(module, "bias", None)
    norm = getattr(module, "rms_norm", None)
    args = dict(bias=bias is not None, act_bits=8, device=w.device, dtype=None if bias is None else bias.dtype)
    if norm is None:
        layer = TernaryLinear(module.in_features, module.out_features, **args)
    else:
        layer = NormedTernaryLinear(norm, module.in_features, module.out_features, **args)
    layer.w_packed.copy_(pack_ternary(w_t))
    layer.w_scale.copy_(gamma)
    if bias is not None:  # (AutoBitLinear scales its bias with the products: (x_q W^T + bias) * weight_scale)
        layer.bias.copy_(bias.detach() if packed else (bias.detach().float() * scale).to(bias.dtype))
    return layer


class NormedTernaryLinear(TernaryLinear):
    """TernaryLinear after the RMSNorm of a BitLinear built with use_rms_norm=True (kept as `rms_norm`)."""

    def __init__(self, rms_norm: torch.nn.Module, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rms_norm = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rms_norm(x))
