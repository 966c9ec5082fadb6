"""Decoder attention over the encoder output E with no cross-attention cache, and the body BART-like classes share.

E is what generate() already holds; beams of one input share its copy (EL-attention). :func:`decoder_attention` is
the forward body of the encoder-decoder attention classes (BART and its copies, Whisper, TrOCR): self-attention over
a slim cache or cross-attention over E.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .absorbed import absorb_query, additive_bias, project_heads
from .attention import RunAttention, slim_self_attention
from .decode import attend, use_absorbed
from .slim_tensor import linear, split_heads

if TYPE_CHECKING:
    from .attention_state import SlimAttentionState


def encoder_cross_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    encoder_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool = False,
    position_bias: torch.Tensor | None = None,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention computed from the encoder output E at every step: no cross-attention cache.

    Beam search and ``num_return_sequences`` give ``batch = inputs * group`` query rows; when the encoder output is
    kept once per input (``encoder_states.shape[0] == inputs``), the group's queries are folded into the query axis
    so that one copy of E serves every beam (EL-attention). Beams never move between inputs, so E needs no reorder.

    Parameters
    ----------
    query:
        ``(batch, heads, new, head_dim)``.
    encoder_states:
        ``(inputs, frames, d_model)`` with ``batch % inputs == 0``.
    attention_mask:
        encoder padding mask as prepared by the model (bool or additive), broadcastable to
        ``(batch, 1, new, frames)``, or None.
    fresh:
        the keys and values of E the model's own forward computed this step, ``(inputs, heads, frames, head_dim)``
        each, if it did (its first step): a prefill over one copy of E per decoder row then runs the model's own
        attention on them, bit for bit.

    Returns
    -------
    ``(batch, new, heads, head_dim)`` in the query dtype, and the weights ``(batch, heads, new, frames)`` or None.
    """
    state: SlimAttentionState = module.hf_slim
    projections = state.current_projections(module)
    batch, heads, num_queries, head_dim = query.shape
    inputs = encoder_states.shape[0]
    if batch % inputs:
        raise ValueError(f"{batch} decoder rows cannot share {inputs} encoder outputs")
    group = batch // inputs
    if group == 1 and not use_absorbed(num_queries, head_dim):
        if fresh is not None:
            return run_attention(query, *fresh, attention_mask)
        keys = linear(encoder_states, projections.w_k, projections.b_k, projections.k_low_rank)  # (inputs, frames, e)
        values = linear(encoder_states, projections.w_v, projections.b_v, projections.v_low_rank)
        return run_attention(query, split_heads(keys, head_dim), split_heads(values, head_dim), attention_mask)

    bias = None if attention_mask is None else additive_bias(attention_mask)  # (b|1, 1|h, t|1, frames)
    if position_bias is not None:
        bias = position_bias.float() if bias is None else bias + position_bias.float()
    # fold the group into the query axis: (inputs*group, h, t, .) -> (inputs, h, group*t, .)
    grouped_query = query.view(inputs, group, heads, num_queries, head_dim).transpose(1, 2)
    grouped_query = grouped_query.reshape(inputs, heads, group * num_queries, head_dim)
    if bias is not None:
        bias = _fold_bias(bias, inputs, group, heads, num_queries)
    query_abs = absorb_query(grouped_query, projections.w_k, projections.k_low_rank)  # (inputs, h, g*t, d)
    mixed, weights = attend(
        query_abs, encoder_states, scale=scale, bias=bias, return_weights=want_weights
    )  # (inputs, h, g*t, d)
    out = project_heads(mixed, projections.w_v, projections.b_v, projections.v_low_rank)  # (inputs, h, g*t, dk)
    out = out.view(inputs, heads, group, num_queries, head_dim).transpose(1, 2)  # (inputs, g, h, t, dk)
    out = out.reshape(batch, heads, num_queries, head_dim).to(query.dtype).transpose(1, 2)  # (b, t, h, dk)
    if weights is not None:
        weights = weights.view(inputs, heads, group, num_queries, -1).transpose(1, 2)
        weights = weights.reshape(batch, heads, num_queries, -1)
    return out, weights


def grouped_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    run_attention: RunAttention,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention over explicit keys/values of one encoder copy per input, for ``inputs * group``
    decoder rows (beams kept on one encoder output, without a cache): each input's group is folded into the query
    axis, as :func:`encoder_cross_attention` does.

    ``query: (inputs * group, heads, new, head_dim)``, ``key``/``value``: ``(inputs, heads, frames, head_dim)``;
    returns ``(inputs * group, new, heads, head_dim)`` and the weights ``(inputs * group, heads, new, frames)`` or
    None.
    """
    batch, heads, num_queries, head_dim = query.shape
    inputs = key.shape[0]
    if batch % inputs:
        raise ValueError(f"{batch} decoder rows cannot share {inputs} encoder outputs")
    group = batch // inputs
    grouped = query.view(inputs, group, heads, num_queries, head_dim).transpose(1, 2)
    grouped = grouped.reshape(inputs, heads, group * num_queries, head_dim)  # (inputs, h, g*t, dk)
    mask = None if attention_mask is None else _fold_bias(attention_mask, inputs, group, heads, num_queries)
    out, weights = run_attention(grouped, key, value, mask)  # (inputs, g*t, h, dk)
    out = out.reshape(inputs, group, num_queries, heads, head_dim).reshape(batch, num_queries, heads, head_dim)
    if weights is not None:
        weights = weights.view(inputs, heads, group, num_queries, -1).transpose(1, 2)
        weights = weights.reshape(batch, heads, num_queries, -1)
    return out, weights


#: the module attributes :func:`decoder_attention` reads (for the forward contracts of the patches that call it)
DECODER_ATTENTION_READS = ("k_proj", "v_proj", "head_dim")


def decoder_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key_value_states: torch.Tensor | None,
    cache,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool,
    dropout: float,
    contiguous_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The body the encoder-decoder attention classes share (BART and its copies, Whisper, TrOCR): decoder
    self-attention over a slim cache, or cross-attention over the encoder output with no cache.

    Why one place: these classes differ only in how they scale the query, which attention call they make and their
    output projection, so their adapted forwards compute those and hand the rest here. The module's own ``k_proj`` /
    ``v_proj`` project the new tokens (self) or, when attention dropout is on (training), the encoder output, whose
    probabilities over explicit K/V the dropout needs.

    Parameters
    ----------
    hidden_states:
        ``(batch, new, d_model)``, the attention input.
    query:
        ``(batch, heads, new, head_dim)``, projected and scaled as the model does.
    key_value_states:
        the encoder output ``(inputs, frames, d_enc)`` for cross-attention (``batch % inputs == 0``), or None.
    contiguous_heads:
        make the split key/value heads contiguous, as the model's own forward does (Whisper): the attention kernels
        round differently on strided inputs, and the prefill must be the model's bit for bit.

    Returns
    -------
    ``(batch, new, heads, head_dim)`` and the weights ``(batch, heads, new, keys)`` or None.
    """

    def heads(states: torch.Tensor) -> torch.Tensor:
        split = split_heads(states, module.head_dim)  # (b, h, n, dk)
        return split.contiguous() if contiguous_heads else split

    if key_value_states is None:
        key, value = heads(module.k_proj(hidden_states)), heads(module.v_proj(hidden_states))  # (b, h, t, dk)
        return slim_self_attention(
            module,
            hidden_states,
            query,
            key,
            value,
            cache,
            attention_mask,
            scale,
            run_attention,
            want_weights=want_weights,
        )
    if dropout > 0.0:
        key, value = heads(module.k_proj(key_value_states)), heads(module.v_proj(key_value_states))  # (b, h, f, dk)
        return run_attention(query, key, value, attention_mask)
    return encoder_cross_attention(
        module, query, key_value_states, attention_mask, scale, run_attention, want_weights=want_weights
    )


def _fold_bias(bias: torch.Tensor, inputs: int, group: int, heads: int, num_queries: int) -> torch.Tensor:
    """Reshape a bias with one row per decoder row (``inputs*group``), per input (``inputs``, when the model built
    the encoder mask from the unexpanded encoder output) or shared (1) to ``(inputs, h|1, group*t, n)``."""
    frames = bias.shape[-1]
    if bias.shape[0] == inputs and group > 1:
        bias = bias.expand(inputs, bias.shape[1], num_queries, frames)[:, None]  # (inputs, 1, h|1, t, n)
        bias = bias.expand(inputs, group, *bias.shape[2:])
    else:
        bias = bias.expand(inputs * group, bias.shape[1], num_queries, frames)
        bias = bias.reshape(inputs, group, bias.shape[1], num_queries, frames)
    return bias.transpose(1, 2).reshape(inputs, -1, group * num_queries, frames)
