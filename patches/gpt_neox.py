"""GPT-NeoX (Pythia): RoPE on the first ``partial_rotary_factor`` (``rotary_pct``) of each head, one fused
``query_key_value`` projection whose output columns are laid out per head as ``[q_i | k_i | v_i]``."""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from hf_slim._compat import forward_contracts
from hf_slim.attention import Projections, interleaved_qkv_projections, rope_self_attention
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (GPTNeoXAttention,)
BASE_MODEL_CLASSES = (GPTNeoXModel,)


def _projections(module: torch.nn.Module) -> Projections:
    heads, head_dim = module.config.num_attention_heads, module.head_size
    return interleaved_qkv_projections(module.query_key_value, heads, head_dim)  # rows (h, q|k|v, dk)


# Adapted from transformers 5.23.0, models/gpt_neox/modeling_gpt_neox.py, GPTNeoXAttention.forward: the cache update
# and the attention call go through the slim cache; projections, RoPE and the output projection are the model's own.
def slim_gpt_neox_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_past=None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_shape = (*hidden_states.shape[:-1], -1, 3 * self.head_size)
    qkv = self.query_key_value(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, h, t, 3dk)
    query, key, value = qkv.chunk(3, dim=-1)  # (b, h, t, dk) each
    cos, sin = position_embeddings  # (b|1, t, r) each
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out, weights = rope_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        (cos, sin),
        attention_mask,
        layer_past,
        kwargs,
        eager=eager_attention_forward,
        dropout=0.0 if not self.training else self.attention_dropout,
    )
    return self.dense(out), weights


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The attention module of every layer."""
    return rope_attention_sites(
        model,
        ATTENTION_CLASSES,
        _projections,
        slim_gpt_neox_attention_forward,
        RotaryLayout("half"),
        head_dim=lambda module: module.head_size,
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """GPTNeoXModel.forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(
    slim_gpt_neox_attention_forward,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
)
