"""GPT-2: learned absolute positions, fused ``c_attn`` Conv1D (``y = x @ W + b``, W: (d, 3d)).

Covers GPT2Model, GPT2LMHeadModel and the other GPT-2 heads, eager and SDPA attention,
``scale_attn_by_inverse_layer_idx`` and ``reorder_and_upcast_attn`` (both only change the prefill path, which stays
the model's own), and ``add_cross_attention`` (cross-attention reads the encoder output directly). No forward is
copied: GPT2Attention's own forward runs, served through the extension points (:mod:`hf_slim.interface`).
"""

from __future__ import annotations

import torch
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Model, eager_attention_forward

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    instances_of,
    modules_of_type,
    route_contracts,
)


def _self_projections(module: GPT2Attention) -> Projections:
    e = module.split_size
    return Projections.of(module.c_attn, module.c_attn, slice(e, 2 * e), slice(2 * e, None))  # c_attn: (d, 3e)


def _cross_projections(module: GPT2Attention) -> Projections:
    e = module.split_size
    return Projections.of(module.c_attn, module.c_attn, slice(None, e), slice(e, None))  # c_attn: (d, 2e)


def _upcast_and_reordered(module: GPT2Attention, query, key, value, attention_mask, **kwargs):
    """GPT-2's own eager attention with ``reorder_and_upcast_attn`` (float32 scores, scaled before the product)."""
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _eager(module: GPT2Attention):
    """What GPT2Attention.forward runs for ``attn_implementation="eager"``."""
    return _upcast_and_reordered if module.reorder_and_upcast_attn else eager_attention_forward


#: The model's own forward (fused c_attn, q_attn for cross-attention, c_proj) serves GPT2Attention (no copy); the
#: encoder output arrives as ``encoder_hidden_states``.
ROUTE = AttentionRoute(encoder_parameter="encoder_hidden_states", eager=_eager)


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Self-attention (and cross-attention, if the config adds it) of every GPT-2 block."""
    return [
        AttentionSite.of(module, "cross", _cross_projections, ROUTE)
        if module.is_cross_attention
        else AttentionSite.of(module, "self", _self_projections, ROUTE)
        for module in instances_of(model, (GPT2Attention,))
    ]


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(GPT2Model),  # GPT2Model.forward creates the cache when none is given
    contracts=route_contracts(
        ROUTE,
        attention=(GPT2Attention,),
        cache_owners=(GPT2Model,),
        attributes=("c_attn", "split_size", "head_dim", "num_heads", "layer_idx", "is_cross_attention", "config"),
    ),
    composite_decoder=True,
)
