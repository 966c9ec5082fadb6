"""The slim self-attention step every patch calls: prefill, absorbed decode or chunked prefill over a slim cache.

A patch (``patches/<arch>.py``) computes the model's own query/key/value projections, then calls
:func:`slim_self_attention` for causal self-attention with a slim cache: prefill (empty cache) runs the model's
ordinary attention on the fresh K/V and stores only the slim tensor; decode (few queries over a cache) runs the
absorbed path over the slim tensor (:mod:`hf_slim.decode`); chunked prefill (many queries on top of a cache) rebuilds
K/V from the slim tensor (:mod:`hf_slim.slim_tensor`) and runs the ordinary attention again. Cross-attention over the
encoder output is :mod:`hf_slim.cross_attention`; the per-layer facts (mode, projection weights, head layout) live in
:class:`~hf_slim.attention_state.SlimAttentionState`, attached to the patched module as ``module.hf_slim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .cache import slim_cache_for
from .decode import absorbed_decode, use_absorbed
from .slim_tensor import k_cache_states, keys_for_values, rebuild_kv

if TYPE_CHECKING:
    from .attention_state import SlimAttentionState

# run_attention(query, key, value, mask) -> (output (b, t, h, dk), weights or None): the model's own attention call.
RunAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]


def slim_self_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool = False,
    position_bias: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    pre_norm_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One self-attention step with a slim cache.

    Parameters
    ----------
    module:
        the patched attention module (carries ``module.hf_slim``).
    hidden_states:
        ``(batch, new, d_model)``, the attention input X (after the layer norm).
    query, key, value:
        ``(batch, heads, new, head_dim)``, the model's own projections of the new tokens.
    cache:
        the cache handed to the layer (a :class:`~hf_slim.cache.SlimCache`, possibly inside an
        ``EncoderDecoderCache``), or None.
    attention_mask:
        the mask the model prepared for its attention implementation.
    scale:
        score scale the model uses.
    run_attention:
        the model's own attention call, used for prefill.
    want_weights:
        return attention probabilities from the absorbed path (eager ``output_attentions``).
    position_bias:
        additive score bias ``(1|b, 1|h, new|1, seq)`` (T5 relative positions, ALiBi, windowed masks), applied on
        both paths by the caller's ``run_attention`` and here on the absorbed path; or a function
        ``position_bias(seq, query_slots)`` returning that bias, for biases the model slices by key length or by the
        queries' cache slots: ``seq`` is the number of cache slots a step attends over (``max_cache_len`` for a
        static cache), ``query_slots: (new,)`` the slots the new tokens were written to (``seq - new ..`` for a
        dynamic cache, the written length less ``new`` for a static one). Where ``run_attention`` runs over a static
        cache (prefill, chunks) it gets the written slots only, K/V and mask as long as a dynamic cache's.
    rotary:
        ``(cos, sin)``, each ``(batch|1, new, rotary_dim)``, that rotated ``query`` and ``key`` (RoPE layers, whose
        ``key`` is the rotated one: :mod:`hf_slim.rope`).
    position_ids:
        ``(batch|1, new)``, the positions ``rotary`` was computed for (RoPE layers): the cache keeps them and
        recomputes cos/sin from them (:class:`~hf_slim.rotary_positions.RotaryPositions`).
    pre_norm_key:
        ``(batch, new, e)``, the keys before the model's per-token key norm (layers with a
        :class:`~hf_slim.projections.KeyNorm`, whose ``key`` is the normalised one), for the key scale the K cache
        keeps.

    Returns
    -------
    output:
        ``(batch, new, heads, head_dim)`` in the query dtype, as transformers' attention interfaces return it.
    weights:
        ``(batch, heads, new, seq)`` or None.
    """
    state: SlimAttentionState = module.hf_slim
    cache = slim_cache_for(cache, state.layer_idx, where=type(module).__name__)
    if cache is None:
        return run_attention(query, key, value, attention_mask)
    projections = state.live_projections(module)  # K mode: W_KV still fits the weights and dtype (raises otherwise)
    batch, _, num_queries, _ = query.shape
    if state.mode == "input":
        new_states = hidden_states  # (b, t, d)
    else:
        new_states = k_cache_states(module, hidden_states, key, projections.key_norm, pre_norm_key)  # (b, t, w)
    layer = cache.layers[state.layer_idx] if state.layer_idx < len(cache.layers) else None
    static = layer is not None and layer.is_compileable
    # A static layer decides by query count alone (its length is a tensor: no data-dependent branch under compile);
    # its unwritten slots are masked below.
    past = None if static else cache.get_seq_length(state.layer_idx)
    absorbed = use_absorbed(num_queries, state.head_dim) and (static or past > 0)
    if static and not absorbed:
        past = int(layer.get_seq_length())  # a static cache's prefill runs eagerly
    states = cache.update_slim(new_states, state.layer_idx, state.layout)  # (b, n, w)
    unrotation = None
    if state.rotary is not None:
        unrotation = cache.update_rotary(rotary, state.layer_idx, position_ids, state.rotary_source)
    if static and not absorbed:
        # The model's own attention gets the written slots only, as from a dynamic cache: models that slice a mask or
        # a bias by key length (GPT-Neo's window rows, ALiBi) then see the same lengths; later slots are unwritten.
        written = past + num_queries
        states = states[:, :written]  # (b, past + t, w)
        attention_mask = None if attention_mask is None else attention_mask[..., :written]
    if past == 0:
        return run_attention(query, key, value, attention_mask)
    plain_keys = keys_for_values(state, states, unrotation)  # (b, n, e + r) fp32, or None
    if not absorbed:
        full_key, full_value = rebuild_kv(module, states, projections, plain_keys)
        return run_attention(query, full_key, full_value, attention_mask)
    return absorbed_decode(
        module,
        projections,
        query,
        states,
        cache.layers[state.layer_idx],
        attention_mask,
        scale,
        position_bias=position_bias,
        want_weights=want_weights,
        plain_keys=plain_keys,
    )
