"""Phi-3 / Phi-3.5: RoPE (default or longrope with short/long factors), fused ``qkv_proj`` (rows ``[q | k | v]``).

Longrope switches from the short to the long factors once a forward sees a position past
``original_max_position_embeddings``; the slim cache keeps each token's cos/sin as it was written, so keys rotated
with the short factors stay un-rotated with them (:mod:`hf_slim.rope`). ``sliding_window`` is handled by the model's
own mask and attention interface.
"""

from __future__ import annotations

import torch
from transformers.models.phi3.modeling_phi3 import (
    Phi3Attention,
    Phi3Model,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from hf_slim._compat import forward_contracts
from hf_slim.attention import Projections, rope_self_attention
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (Phi3Attention,)
BASE_MODEL_CLASSES = (Phi3Model,)


def _projections(module: torch.nn.Module) -> Projections:
    e = module.config.num_attention_heads * module.head_dim
    return Projections.of(module.qkv_proj, module.qkv_proj, slice(e, 2 * e), slice(2 * e, None))  # qkv: [Q | K | V]


# Adapted from transformers 5.23.0, models/phi3/modeling_phi3.py, Phi3Attention.forward: the cache update and the
# attention call go through the slim cache; projections, RoPE and the output projection are the model's own.
def slim_phi3_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).chunk(3, dim=-1)  # (b, t, e) each (MHA: equal thirds)
    query, key, value = (x.reshape(hidden_shape).transpose(1, 2) for x in (query, key, value))  # (b, h, t, dk)
    cos, sin = position_embeddings  # (b|1, t, dk) each
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = rope_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        (cos, sin),
        attention_mask,
        past_key_values,
        kwargs,
        eager=eager_attention_forward,
        dropout=0.0 if not self.training else self.attention_dropout,
        sliding_window=getattr(self.config, "sliding_window", None),
    )
    return self.o_proj(out), weights


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The self-attention module of every decoder layer."""
    return rope_attention_sites(
        model, ATTENTION_CLASSES, _projections, slim_phi3_attention_forward, RotaryLayout("half")
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Phi3Model.forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(
    slim_phi3_attention_forward,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
)
