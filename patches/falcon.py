"""Falcon-RW: the Falcon configs that are multi-head attention with ALiBi (``alibi=True``, ``multi_query=False``,
``new_decoder_architecture=False``); every other Falcon config is refused with its reason in
:data:`hf_slim.registry.CONFIG_REFUSALS` (multi-query, grouped-query, RoPE).

The fused ``query_key_value`` is laid out per head ``(heads, 3, head_dim)`` like BLOOM's
(:func:`hf_slim.projections.interleaved_qkv_projections`). FalconModel folds ``alibi / sqrt(head_dim)`` into the 4-D
float mask it hands every layer (with the padding and causal minimum filled in). What the layer does with it depends
on the release (:data:`ROUTED`, read from the installed forward):

* transformers >= 5.25: FalconAttention takes no ``alibi`` and calls the attention interface like Llama's; the mask
  alone carries ALiBi, for eager and SDPA alike. The model's own forward is served through the extension points
  (:data:`ROUTE`, no copy), and the slim decode adds the mask as it is (``ScoreBias.in_mask``);
* up to 5.24: the layer takes ``alibi`` and computes attention itself; with SDPA the mask alone carries positions,
  the eager path computes ``(q k^T + alibi) / sqrt(head_dim) + mask``, i.e. it adds the (scaled) ALiBi a second time
  on top of the mask's copy. :func:`slim_falcon_attention_forward` replaces that forward, and the absorbed decode
  adds ``alibi / sqrt(head_dim)`` once more for eager (``ScoreBias.argument``, :data:`ALIBI`).

Static caches (``generate(cache_implementation="static")``) give the tokens of the unpatched model with its default
*dynamic* cache; transformers' own static cache cannot be the reference, it fails for Falcon in 5.23.0 to 5.25.0
(FalconModel builds ALiBi from a 2-D mask, and generate() hands compileable caches the 4-D mask of
``create_masks_for_generate``). The slim model gets a per-instance ``create_masks_for_generate``
(:func:`masks_for_generate`, installed by :func:`extra_patches`) that keeps the 2-D mask and pads it to the cache
length, as transformers' BLOOM does for its own ALiBi: FalconModel then builds ALiBi and the 4-D mask over
``max_cache_len`` keys, and the slim attention slices them to the keys it attends over.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.generation import utils as generation_utils
from transformers.models.falcon.configuration_falcon import FalconConfig
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconForCausalLM, FalconModel

from hf_slim.toolkit import (
    CACHE,
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Contract,
    InstancePatch,
    PatchedMethod,
    ScoreBias,
    find_cache,
    forward_contracts,
    instances_of,
    interleaved_qkv_projections,
    modules_of_type,
    route_contracts,
    routes_attention,
    slim_self_attention,
    split_interleaved_qkv,
)

#: transformers >= 5.25: FalconAttention's own forward calls the attention interface, with ALiBi in the mask.
ROUTED = routes_attention(FalconAttention)
ROUTE = AttentionRoute(score_bias=ScoreBias.in_mask())


def _projections(module: FalconAttention):
    return interleaved_qkv_projections(module.query_key_value, module.num_heads, module.head_dim)


def _eager(module: FalconAttention, output_attentions: bool) -> bool:
    return module.config._attn_implementation != "sdpa" or output_attentions


def _eager_alibi(module: FalconAttention, alibi: torch.Tensor, key_length: int, query_slots=None) -> torch.Tensor:
    """The ALiBi copy the eager path (up to 5.24) adds on top of the mask's, as the scores see it: ``alibi / sqrt(dk)``
    ``(b, h, 1, key_length)`` (``alibi: (b * h, 1, n)``, n >= key_length for a static cache's prefill)."""
    return alibi.view(-1, module.num_heads, 1, alibi.shape[-1])[..., :key_length] * module.inv_norm_factor


#: up to 5.24: the eager layer adds ALiBi from its ``alibi`` argument (SDPA: the mask carries it, no term)
ALIBI = ScoreBias.argument("alibi", _eager_alibi)


# Adapted from transformers 5.23.0, models/falcon/modeling_falcon.py, FalconAttention.forward (the ALiBi branch, from
# the scores to the context). Used up to 5.24 (see ROUTED).
def _own_attention(module: FalconAttention, alibi: torch.Tensor, eager: bool, query, key, value, mask):
    """Falcon's ALiBi attention, SDPA (ALiBi inside ``mask``) or eager (ALiBi added again before the scaling).

    ``query: (b, h, t, dk)``, ``key, value: (b, h, n, dk)``, ``alibi: (b * h, 1, n)``; returns ``(b, t, h, dk)`` and
    the probabilities ``(b, h, t, n)`` (None for SDPA).
    """
    batch, heads, num_queries, _ = query.shape
    alibi = alibi[..., : key.shape[-2]]  # a static cache's prefill and chunks attend over the written keys only
    if not eager:
        dropout = module.attention_dropout.p if module.training else 0.0
        is_causal = mask is None and num_queries > 1
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return out.transpose(1, 2), None
    scores = query @ key.transpose(-1, -2)  # (b, h, t, n)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)
    logits = (scores + alibi.view(batch, heads, 1, -1)) * module.inv_norm_factor
    probs = F.softmax(logits + mask, dim=-1, dtype=query.dtype)
    dropped = module.attention_dropout(probs)
    return (dropped @ value).transpose(1, 2), probs  # (b, t, h, dk)


# Adapted from transformers 5.23.0, models/falcon/modeling_falcon.py, FalconAttention.forward (multi-head, ALiBi):
# the fused projection and the output projection are the model's own; the cache handling and the attention call change.
# Used up to 5.24 (see ROUTED).
def slim_falcon_attention_forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if alibi is None:  # refused by the registry; a config edited after slimify must not run silently wrong
        raise RuntimeError("hf_slim patched this Falcon layer for ALiBi but the model passed none (RoPE)")
    batch, num_queries, _ = hidden_states.shape
    query, key, value = split_interleaved_qkv(self.query_key_value(hidden_states), self.num_heads, self.head_dim)
    eager = _eager(self, output_attentions)
    attention = functools.partial(_own_attention, self, alibi, eager)
    bias = ALIBI.term(self, alibi) if eager else None  # SDPA: in the mask only
    scale = 1.0 / math.sqrt(self.head_dim)
    context, probs = slim_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        cache,
        attention_mask,
        scale,
        attention,
        want_weights=eager,
        position_bias=bias,
    )
    context = context.reshape(batch, num_queries, -1)  # (b, t, e)
    return self.dense(context), probs


def masks_for_generate(
    model: FalconForCausalLM,
    config: FalconConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args,
    **kwargs,
) -> torch.Tensor | None:
    """generate()'s mask for a compileable (static) cache: the 2-D padding mask ``(b, n)``, zero-padded to
    ``(b, max_cache_len)``, instead of transformers' 4-D one.

    Why: FalconModel builds ALiBi from a 2-D mask (a 4-D one is a ValueError) and then its own 4-D mask with ALiBi
    folded in; padded to the cache length, both have one column per cache slot, the shape a static cache needs (the
    padded slots are unwritten, masked as the future). What transformers' ``BloomForCausalLM.create_masks_for_generate``
    does for BLOOM's ALiBi, installed per instance by slimify (a :class:`~hf_slim.patching.PatchedMethod`).
    """
    if attention_mask is None or attention_mask.ndim == 4:
        return attention_mask
    cache = find_cache(args, kwargs)  # by type: whatever generate() names it
    padding = cache.get_max_length() - attention_mask.shape[-1]
    return F.pad(attention_mask, (0, padding)) if padding > 0 else attention_mask


def extra_patches(model: nn.Module) -> list[InstancePatch]:
    """The static-cache mask hook of :func:`masks_for_generate`, on a model that generates."""
    if not isinstance(model, GenerationMixin):
        return []
    hook = PatchedMethod(masks_for_generate, model, signature_of=masks_for_generate)
    return [InstancePatch(model, "create_masks_for_generate", hook)]


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every decoder layer."""
    serving = ROUTE if ROUTED else slim_falcon_attention_forward
    return [
        AttentionSite.of(module, "self", _projections, serving) for module in instances_of(model, (FalconAttention,))
    ]


#: What the routed or the adapted forward relies on in transformers. The routed forward must take no ``alibi`` (the
#: mask carries it). :func:`masks_for_generate` stands in for generate()'s default mask function, so it must take its
#: arguments.
_MASKS_CONTRACT = Contract(
    GenerationMixin,
    "create_masks_for_generate",
    parameters=("config", "inputs_embeds", "attention_mask", CACHE),
    where=generation_utils,
)
if ROUTED:
    _FORWARD_CONTRACTS = route_contracts(
        ROUTE,
        attention=(FalconAttention,),
        cache_owners=(FalconModel,),
        attributes=("query_key_value", "num_heads", "head_dim", "layer_idx", "config"),
        absent=("alibi",),
    )
else:
    _FORWARD_CONTRACTS = forward_contracts(
        slim_falcon_attention_forward, attention=(FalconAttention,), cache_owners=(FalconModel,)
    )

PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=modules_of_type(FalconModel),  # FalconModel.forward creates the cache when none is given
    contracts=(*_FORWARD_CONTRACTS, _MASKS_CONTRACT),
    extra_patches=extra_patches,
)
