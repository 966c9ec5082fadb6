"""Phi-2 (``phi``) and StableLM (``stablelm``): RoPE on the first ``partial_rotary_factor`` of each head, separate
``q_proj``/``k_proj``/``v_proj`` with biases (StableLM: ``use_qkv_bias``).

The un-rotated tail of each head passes through the cache as it is. ``qk_layernorm`` normalises each head's keys per
token, so ``V = f(K)`` is not exact there: refused per layer (the layer keeps the model's own K and V).
"""

from __future__ import annotations

import sys

import torch
from transformers.models.phi.modeling_phi import PhiAttention, PhiModel, apply_rotary_pos_emb
from transformers.models.stablelm.modeling_stablelm import StableLmAttention, StableLmModel

from hf_slim._compat import forward_contracts
from hf_slim.attention import Projections, rope_self_attention
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (PhiAttention, StableLmAttention)
BASE_MODEL_CLASSES = (PhiModel, StableLmModel)


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj)


# Adapted from transformers 5.23.0, models/phi/modeling_phi.py, PhiAttention.forward (StableLmAttention.forward in
# models/stablelm/modeling_stablelm.py is the same computation; their qk_layernorm layers are never patched): the cache
# update and the attention call go through the slim cache; projections, partial RoPE and the output projection are the
# model's own.
def slim_partial_rotary_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    cos, sin = position_embeddings  # (b|1, t, r) each, r = rotary_ndims
    rotated = self.rotary_ndims
    query_rot, key_rot = apply_rotary_pos_emb(query[..., :rotated], key[..., :rotated], cos, sin)  # (b, h, t, r)
    query = torch.cat((query_rot, query[..., rotated:]), dim=-1)  # (b, h, t, dk)
    key = torch.cat((key_rot, key[..., rotated:]), dim=-1)  # (b, h, t, dk)
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
        eager=sys.modules[type(self).__module__].eager_attention_forward,  # the model file's own
        dropout=0.0 if not self.training else self.attention_dropout,
    )
    output_projection = self.dense if hasattr(self, "dense") else self.o_proj  # Phi: dense, StableLM: o_proj
    return output_projection(out), weights


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    if module.qk_layernorm:
        return "qk_layernorm normalises each head's keys per token, so V is not a linear function of the cached keys"
    return None


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The self-attention module of every decoder layer."""
    return rope_attention_sites(
        model,
        ATTENTION_CLASSES,
        _projections,
        slim_partial_rotary_attention_forward,
        RotaryLayout("half"),
        k_mode_refusal=_k_mode_refusal,
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The base model's forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(
    slim_partial_rotary_attention_forward,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
    alternatives=("dense", "o_proj"),
)
