"""The absorbed decode: few new queries attend straight over a layer's slim tensor, keys and values never rebuilt.

The score bias of the step (the mask, a static layer's unwritten slots, the model's position term), the choice of
the fused kernel, and each cache mode's value projection after the weighted sum; the math is :mod:`hf_slim.absorbed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .absorbed import absorb_query, absorbed_attention, additive_bias, project_heads
from .dispatch import use_fused_kernel

if TYPE_CHECKING:
    from collections.abc import Callable

    from .cache_layers import SlimLayer
    from .projections import Projections


def use_absorbed(num_queries: int, head_dim: int) -> bool:
    """Whether the absorbed path is cheaper than rebuilding K/V for ``num_queries`` new tokens.

    Absorbed costs ``2*h*t*n*d`` per layer, rebuilding K and V costs ``2*n*d*e`` plus the attention: the absorbed
    path wins while ``t < 2 * head_dim``; we switch at ``head_dim`` to stay clear of the crossover.
    """
    return num_queries <= head_dim


def _bias_for_decode(mask: torch.Tensor | None, num_queries: int, seq_len: int, device) -> torch.Tensor | None:
    """Additive float32 bias ``(b|1, h|1, t, n)`` for the absorbed path from whatever mask the model prepared.

    ``None`` from transformers means "no padding, causal": with one query nothing is masked; with several queries on
    top of a cache the causal pattern is bottom-right aligned (query ``i`` sees keys ``<= past + i``).
    """
    if mask is not None:
        if mask.dim() == 2:  # (b, n) padding mask of 1/0 (flash-attention style)
            mask = mask[:, None, None, :].bool()
        return additive_bias(mask[..., :seq_len])
    if num_queries == 1:
        return None
    past = seq_len - num_queries
    key_pos = torch.arange(seq_len, device=device)
    query_pos = torch.arange(num_queries, device=device)[:, None] + past
    return additive_bias((key_pos[None, :] <= query_pos)[None, None])  # (1, 1, t, n)


def fused_kernel_enabled(cache: torch.Tensor) -> bool:
    """Whether decode over ``cache`` runs the Triton kernel: the measured rule of :mod:`hf_slim.dispatch`."""
    return use_fused_kernel(cache)


def attend(
    query: torch.Tensor,
    cache: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None,
    head_slice: bool = False,
    return_weights: bool = False,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~hf_slim.absorbed.absorbed_attention`, through the fused kernel where it applies (no weights asked)."""
    if not return_weights and fused_kernel_enabled(cache):
        from .kernels import slim_decode_attention

        mixed = slim_decode_attention(query, cache, scale=scale, bias=bias, head_slice=head_slice, values=values)
        return mixed, None
    return absorbed_attention(
        query, cache, scale=scale, bias=bias, head_slice=head_slice, return_weights=return_weights, values=values
    )


def _decode_input_mode(state, projections, query, states, bias, scale, want_weights):
    query_abs = absorb_query(query, projections.w_k, projections.k_low_rank)  # (b, h, t, d)
    mixed, weights = attend(query_abs, states, scale=scale, bias=bias, return_weights=want_weights)
    return project_heads(mixed, projections.w_v, projections.b_v, projections.v_low_rank), weights  # (b, h, t, dk)


def _decode_k_mode(module, query, states, bias, scale, want_weights, values=None):
    mixed, weights = attend(
        query, states, scale=scale, bias=bias, head_slice=True, return_weights=want_weights, values=values
    )  # (b, h, t, e)
    return project_heads(mixed, module.hf_slim_w_kv, module.hf_slim_v_offset), weights  # (b, h, t, dk)


def absorbed_decode(
    module: torch.nn.Module,
    projections: Projections,
    query: torch.Tensor,
    states: torch.Tensor,
    layer: SlimLayer,
    attention_mask: torch.Tensor | None,
    scale: float,
    *,
    position_bias: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor] | None,
    want_weights: bool,
    plain_keys: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode path of :func:`~hf_slim.attention.slim_self_attention`: ``query: (batch, heads, new, head_dim)``
    over the layer's whole slim tensor ``states: (batch, seq, width)``, just written to ``layer`` (a static layer's
    ``seq`` is ``max_cache_len``, its unwritten slots masked).

    ``attention_mask``, ``position_bias``, ``want_weights``: as :func:`~hf_slim.attention.slim_self_attention` got
    them; ``plain_keys``: a RoPE or key-scaled K layer's keys at the scale ``W_KV`` maps
    (:func:`~hf_slim.slim_tensor.keys_for_values`), which the values are mixed from, or None.

    Returns ``(batch, new, heads, head_dim)`` in the query dtype and the weights ``(batch, heads, new, seq)`` or None.
    """
    state = module.hf_slim
    num_queries = query.shape[2]
    if layer.is_compileable:
        bias = layer.causal_bias(num_queries)
        if attention_mask is not None:
            bias = bias + additive_bias(attention_mask[..., : states.shape[1]])
    else:
        bias = _bias_for_decode(attention_mask, num_queries, states.shape[1], states.device)
    if callable(position_bias):
        position_bias = position_bias(states.shape[1], layer.query_slots(num_queries))
    if position_bias is not None:
        bias = position_bias.float() if bias is None else bias + position_bias.float()
    if state.mode == "k":
        out, weights = _decode_k_mode(module, query, states, bias, scale, want_weights, plain_keys)
    else:
        out, weights = _decode_input_mode(state, projections, query, states, bias, scale, want_weights)
    return out.to(query.dtype).transpose(1, 2), weights
