"""OPT, XGLM and BioGPT: the "Attention Is All You Need" decoder attention with separate ``q_proj``/``k_proj``/
``v_proj``/``out_proj`` linears (biases optional), positions added to the embeddings before the first layer.

OPT and BioGPT dispatch through transformers' attention interfaces (eager, SDPA): their own forwards run, served
through the extension points (:data:`ROUTE`, no copy). XGLM has only its own eager bmm code (it supports no other
implementation): its forward is replaced by :func:`slim_opt_family_attention_forward`, which multiplies the query by
``head_dim ** -0.5`` right after ``q_proj`` and attends with scale 1.0 as XGLM does, with XGLM's attention reproduced
in :func:`_xglm_eager_attention`.

Positions never reach attention (OPT's learned positions with their offset of 2, BioGPT's learned positions, XGLM's
sinusoids are all added to the embeddings), so the input cache applies exactly. OPT-350m's ``project_in``/
``project_out`` (``word_embed_proj_dim != hidden_size``) and post-layer-norm (``do_layer_norm_before=False``) sit
outside attention: the cached tensor is whatever the attention module receives.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.models.biogpt.modeling_biogpt import BioGptAttention, BioGptModel
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoder
from transformers.models.xglm.modeling_xglm import XGLMAttention, XGLMModel

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    forward_contracts,
    instances_of,
    modules_of_type,
    route_contracts,
    slim_self_attention,
    split_heads,
)

#: OPT and BioGPT: the model's own forward, served through the extension points.
ROUTED = (OPTAttention, BioGptAttention)
#: XGLM: a replacement forward (XGLM computes attention itself).
REPLACED = (XGLMAttention,)
#: the modules whose forward creates the cache when none is given
CACHE_OWNERS = (OPTDecoder, XGLMModel, BioGptModel)
ROUTE = AttentionRoute()


def _projections(module: nn.Module):
    return Projections.of(module.k_proj, module.v_proj)


# Adapted from transformers 5.23.0, models/xglm/modeling_xglm.py, XGLMAttention.forward (the score/softmax part):
# scores of the prescaled query, additive mask clamped at the dtype minimum, softmax upcast to fp32 for fp16 only.
def _xglm_eager_attention(module: XGLMAttention, query, key, value, mask):
    """XGLM's own attention: ``query, key, value: (b, h, t|n, dk)`` -> ``((b, t, h, dk), weights (b, h, t, n))``."""
    weights = torch.matmul(query, key.transpose(-1, -2))  # (b, h, t, n)
    if mask is not None:
        weights = weights + mask
        weights = torch.max(weights, torch.full((), torch.finfo(weights.dtype).min, device=weights.device))
    if weights.dtype == torch.float16:
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(torch.float16)
    else:
        weights = nn.functional.softmax(weights, dim=-1)
    probs = nn.functional.dropout(weights, p=module.dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2), weights  # (b, t, h, dk)


# Adapted from transformers 5.23.0, models/xglm/modeling_xglm.py XGLMAttention.forward (self-attention branch): the
# projections and the output projection are the model's own; the cache handling and the attention call change.
def slim_opt_family_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor | None = None,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if key_value_states is not None:
        raise NotImplementedError(f"hf_slim patches {type(self).__name__} as causal self-attention only")
    query = self.q_proj(hidden_states) * self.scaling  # (b, t, e): XGLM scales the query, then attends with scale 1
    query, key, value = (
        split_heads(x, self.head_dim) for x in (query, self.k_proj(hidden_states), self.v_proj(hidden_states))
    )  # (b, h, t, dk)
    attention = functools.partial(_xglm_eager_attention, self)
    attn_output, attn_weights = slim_self_attention(
        self, hidden_states, query, key, value, cache, attention_mask, 1.0, attention, want_weights=True
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
    return self.out_proj(attn_output), attn_weights


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every decoder layer."""
    return [
        AttentionSite.of(
            module, "self", _projections, ROUTE if type(module) in ROUTED else slim_opt_family_attention_forward
        )
        for module in instances_of(model, ROUTED + REPLACED)
    ]


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(*CACHE_OWNERS),
    contracts=(
        *route_contracts(
            ROUTE, attention=ROUTED, cache_owners=CACHE_OWNERS, attributes=("k_proj", "v_proj", "head_dim", "layer_idx")
        ),
        *forward_contracts(slim_opt_family_attention_forward, attention=REPLACED),
    ),
)
