"""Falcon-RW: the Falcon configs that are multi-head attention with ALiBi (``alibi=True``, ``multi_query=False``,
``new_decoder_architecture=False``); every other Falcon config is refused with its reason in
:data:`hf_slim.registry.CONFIG_REFUSALS` (multi-query, grouped-query, RoPE).

The fused ``query_key_value`` is laid out per head ``(heads, 3, head_dim)`` like BLOOM's
(:func:`hf_slim.attention.interleaved_qkv_projections`). How ALiBi enters depends on the attention implementation, and
the slim path follows the model exactly:

* FalconModel folds ``alibi / sqrt(head_dim)`` into the 4-D float mask it hands to every layer (with the padding and
  causal minimum filled in), so with SDPA the mask alone carries positions;
* the eager path computes ``(q k^T + alibi) / sqrt(head_dim) + mask``, i.e. it adds the (scaled) ALiBi a second time
  on top of the mask's copy. The absorbed decode therefore adds ``alibi / sqrt(head_dim)`` once more for eager.

Static caches are refused: transformers' own Falcon fails with one in 5.23.0 (its ALiBi follows the 2-D mask length,
not the cache length), so there is no output to match.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconModel

from hf_slim._compat import forward_contracts
from hf_slim.attention import interleaved_qkv_projections, is_static_slim_cache, slim_self_attention
from hf_slim.sites import AttentionSite, token_calibration_inputs

#: why generate(cache_implementation="static") is refused (read by hf_slim.api)
STATIC_CACHE_REFUSAL = (
    "hf_slim does not support a static cache for Falcon: transformers' own Falcon fails with one (it builds ALiBi from "
    "a 2-D mask, and generate() hands it a 4-D one for static caches); use the default dynamic cache"
)


def _projections(module: FalconAttention):
    return interleaved_qkv_projections(module.query_key_value, module.num_heads, module.head_dim)


def _eager(module: FalconAttention, output_attentions: bool) -> bool:
    return module.config._attn_implementation != "sdpa" or output_attentions


# Adapted from transformers 5.23.0, models/falcon/modeling_falcon.py, FalconAttention.forward (the ALiBi branch, from
# the scores to the context).
def _own_attention(module: FalconAttention, alibi: torch.Tensor, eager: bool, query, key, value, mask):
    """Falcon's ALiBi attention, SDPA (ALiBi inside ``mask``) or eager (ALiBi added again before the scaling).

    ``query: (b, h, t, dk)``, ``key, value: (b, h, n, dk)``, ``alibi: (b * h, 1, n)``; returns ``(b, t, h, dk)`` and
    the probabilities ``(b, h, t, n)`` (None for SDPA).
    """
    batch, heads, num_queries, _ = query.shape
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
def slim_falcon_attention_forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if alibi is None:  # refused by the registry; a config edited after slimify must not run silently wrong
        raise RuntimeError("hf_slim patched this Falcon layer for ALiBi but the model passed none (RoPE)")
    if is_static_slim_cache(layer_past, self.layer_idx):
        raise NotImplementedError(STATIC_CACHE_REFUSAL)
    batch, num_queries, _ = hidden_states.shape
    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # (b, t, h, dk) each
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (b, h, t, dk)
    eager = _eager(self, output_attentions)
    # eager adds alibi / sqrt(dk) on top of the mask's own copy; SDPA has it in the mask only
    extra = alibi.view(batch, self.num_heads, 1, -1) * self.inv_norm_factor if eager else None  # (b, h, 1, n)
    context, probs = slim_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        layer_past,
        attention_mask,
        1.0 / math.sqrt(self.head_dim),
        functools.partial(_own_attention, self, alibi, eager),
        want_weights=eager,
        position_bias=extra,
    )
    context = context.reshape(batch, num_queries, -1)  # (b, t, e)
    return self.dense(context), probs


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every decoder layer."""
    return [
        AttentionSite.of(module, "self", _projections, slim_falcon_attention_forward)
        for module in model.modules()
        if isinstance(module, FalconAttention)
    ]


def cache_owners(model: nn.Module) -> list[nn.Module]:
    """FalconModel.forward creates the cache when none is given."""
    return [module for module in model.modules() if isinstance(module, FalconModel)]


#: token ids for the K-mode calibration when the user gives none
default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(slim_falcon_attention_forward, attention=(FalconAttention,), cache_owners=(FalconModel,))
